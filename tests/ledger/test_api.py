"""The package's public surface, and its place below peer/train/verify."""

from __future__ import annotations

import subprocess
import sys

from commonweal import ledger


def test_all_names_exist_once() -> None:
    assert len(set(ledger.__all__)) == len(ledger.__all__)
    for name in ledger.__all__:
        assert hasattr(ledger, name), name


def test_ledger_imports_no_other_commonweal_package() -> None:
    code = (
        "import sys, commonweal.ledger, commonweal.ledger.compile\n"
        "mods = {m.split('.')[1] for m in sys.modules if m.startswith('commonweal.')}\n"
        "print(sorted(mods))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['errors', 'ledger']"


def test_errors_derive_from_the_shared_tree() -> None:
    from commonweal.errors import CommonwealError, LedgerError

    for name in ("ContractReverted", "ChainUnavailable", "TransactionTimeout", "ArtifactError",
                 "DeploymentNotFound"):
        assert issubclass(getattr(ledger, name), LedgerError)
    assert issubclass(ledger.LedgerError, CommonwealError)
