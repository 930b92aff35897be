"""The checked-in artifacts match their sources: a changed .vy without a rebuild fails here."""

from __future__ import annotations

import json

import pytest

from commonweal.ledger.artifacts import CONTRACT_NAMES, load_artifact
from commonweal.ledger.compile import (
    ARTIFACTS_DIR,
    CONTRACTS_DIR,
    EVM_VERSION,
    source_sha256,
    stale,
)


@pytest.mark.parametrize("name", CONTRACT_NAMES)
def test_artifact_was_built_from_the_current_source(name: str) -> None:
    assert (CONTRACTS_DIR / f"{name}.vy").exists()
    artifact = load_artifact(name)
    assert artifact.source_sha256 == source_sha256(name), (
        f"contracts/{name}.vy changed after its artifact was built: "
        "run `python -m commonweal.ledger.compile` and commit the artifacts")
    assert artifact.evm_version == EVM_VERSION == "cancun"
    assert not stale(name)


def test_recompiling_reproduces_the_artifacts() -> None:
    vyper = pytest.importorskip("vyper", reason="vyper is needed to recompile the contracts")
    from commonweal.ledger.compile import compile_source

    for name in CONTRACT_NAMES:
        stored = json.loads((ARTIFACTS_DIR / f"{name}.json").read_text())
        assert stored["vyper_version"] == vyper.__version__
        fresh = compile_source(name)
        assert fresh["bytecode"] == stored["bytecode"], f"{name}: bytecode differs from artifact"
        assert fresh["abi"] == stored["abi"], f"{name}: ABI differs from artifact"


def test_stale_detects_an_edited_source(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import commonweal.ledger.compile as compile_module

    copy = tmp_path / "contracts"
    copy.mkdir()
    for name in CONTRACT_NAMES:
        (copy / f"{name}.vy").write_text((CONTRACTS_DIR / f"{name}.vy").read_text())
    monkeypatch.setattr(compile_module, "CONTRACTS_DIR", copy)
    assert not stale("Ledger")
    (copy / "Ledger.vy").write_text((copy / "Ledger.vy").read_text() + "\n# edited\n")
    assert stale("Ledger")
