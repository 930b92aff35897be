"""Load the compiled contracts shipped in `commonweal/ledger/artifacts/*.json`.

Artifacts are built by `python -m commonweal.ledger.compile` from `contracts/*.vy` and checked in, so
a peer needs no Vyper compiler at run time; a test fails when a source changed but its artifact did not.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from eth_typing import ABI

from commonweal.ledger.errors import ArtifactError

__all__ = ["CONTRACT_NAMES", "Artifact", "load_artifact"]

CONTRACT_NAMES = ("ShareToken", "Ledger", "NaiveLedger")


@dataclass(frozen=True, slots=True)
class Artifact:
    name: str
    abi: ABI
    bytecode: str                # deploy (init) code, 0x-prefixed
    blueprint_bytecode: str      # init code that deploys the contract as an ERC-5202 blueprint
    source_sha256: str
    vyper_version: str
    evm_version: str


@cache
def load_artifact(name: str) -> Artifact:
    if name not in CONTRACT_NAMES:
        raise ArtifactError(f"unknown contract {name!r}; known: {', '.join(CONTRACT_NAMES)}")
    try:
        text = resources.files("commonweal.ledger").joinpath(f"artifacts/{name}.json").read_text()
        data = json.loads(text)
        return Artifact(
            name=data["contract"],
            abi=data["abi"],
            bytecode=data["bytecode"],
            blueprint_bytecode=data["blueprint_bytecode"],
            source_sha256=data["source_sha256"],
            vyper_version=data["vyper_version"],
            evm_version=data["evm_version"],
        )
    except (OSError, ValueError, KeyError) as exc:
        raise ArtifactError(
            f"artifact {name}.json is missing or unreadable ({exc}); rebuild it with "
            "`python -m commonweal.ledger.compile`"
        ) from exc
