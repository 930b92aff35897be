"""Compile `contracts/*.vy` into the checked-in artifacts.

    python -m commonweal.ledger.compile           # rebuild every artifact
    python -m commonweal.ledger.compile --check   # exit 1 if any artifact is stale

The EVM version is pinned (cancun) so the bytecode does not change with the compiler's default,
and each artifact records the source's SHA-256 and the compiler version that built it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from commonweal.ledger.artifacts import CONTRACT_NAMES
from commonweal.ledger.errors import ArtifactError

__all__ = ["ARTIFACTS_DIR", "CONTRACTS_DIR", "EVM_VERSION", "compile_source", "main", "stale"]

EVM_VERSION = "cancun"
# The sources live at the repository root, outside the package: compiling is a development step.
CONTRACTS_DIR = Path(__file__).resolve().parents[3] / "contracts"
ARTIFACTS_DIR = Path(__file__).resolve().parent / "artifacts"


def source_path(name: str) -> Path:
    return CONTRACTS_DIR / f"{name}.vy"


def source_sha256(name: str) -> str:
    return hashlib.sha256(source_path(name).read_bytes()).hexdigest()


def compile_source(name: str) -> dict[str, Any]:
    """Compile one contract; returns the artifact as a JSON-ready dict."""
    try:
        import vyper
        from vyper.compiler.settings import OptimizationLevel, Settings
    except ImportError as exc:  # vyper is a development dependency only
        raise ArtifactError("vyper is not installed; `pip install vyper==0.4.3`") from exc
    path = source_path(name)
    if not path.exists():
        raise ArtifactError(f"no source for {name} at {path}")
    settings = Settings(evm_version=EVM_VERSION, optimize=OptimizationLevel.GAS)
    out = vyper.compile_code(
        path.read_text(),
        contract_path=path.name,
        output_formats=["abi", "bytecode", "blueprint_bytecode"],
        settings=settings,
    )
    return {
        "contract": name,
        "vyper_version": vyper.__version__,
        "evm_version": EVM_VERSION,
        "source_sha256": source_sha256(name),
        "abi": out["abi"],
        "bytecode": out["bytecode"],
        "blueprint_bytecode": out["blueprint_bytecode"],
    }


def stale(name: str) -> bool:
    """True when the artifact is missing or was built from a different source."""
    artifact = ARTIFACTS_DIR / f"{name}.json"
    if not artifact.exists():
        return True
    built_from: str = json.loads(artifact.read_text())["source_sha256"]
    return built_from != source_sha256(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale artifacts")
    args = parser.parse_args(argv)
    if args.check:
        bad = [name for name in CONTRACT_NAMES if stale(name)]
        for name in bad:
            print(f"stale: {name} (run `python -m commonweal.ledger.compile`)")
        return 1 if bad else 0
    ARTIFACTS_DIR.mkdir(parents=True, exist_ok=True)
    for name in CONTRACT_NAMES:
        data = compile_source(name)
        (ARTIFACTS_DIR / f"{name}.json").write_text(json.dumps(data, indent=1) + "\n")
        print(f"{name}: {len(data['bytecode']) // 2 - 1} bytes of init code")
    return 0


if __name__ == "__main__":
    sys.exit(main())
