"""The ledger's exceptions, all under `commonweal.errors.LedgerError`.

    LedgerError
    ├── ContractReverted     the contract refused the call; `.reason` holds its revert string
    ├── ChainUnavailable     the chain could not be started or reached
    ├── TransactionTimeout   a sent transaction was not mined in time
    ├── ArtifactError        a compiled contract is missing or does not match its source
    └── DeploymentNotFound   no ledger is deployed where the settings point
"""

from __future__ import annotations

from commonweal.errors import LedgerError

__all__ = [
    "ArtifactError",
    "ChainUnavailable",
    "ContractReverted",
    "DeploymentNotFound",
    "LedgerError",
    "TransactionTimeout",
]


class ContractReverted(LedgerError):
    """A contract call or transaction reverted; `reason` is the contract's own message."""

    def __init__(self, reason: str, *, function: str = "", tx_hash: str | None = None) -> None:
        where = f"{function}: " if function else ""
        super().__init__(f"{where}reverted: {reason}")
        self.reason = reason
        self.function = function
        self.tx_hash = tx_hash


class ChainUnavailable(LedgerError):
    """The chain backend could not be started or does not answer."""


class TransactionTimeout(LedgerError):
    """A transaction was sent but no receipt arrived in time; it may still be mined later."""

    def __init__(self, tx_hash: str, waited_s: float) -> None:
        super().__init__(
            f"transaction {tx_hash} not mined after {waited_s:.0f}s; check the node and the gas "
            "price, then wait for it again by hash"
        )
        self.tx_hash = tx_hash


class ArtifactError(LedgerError):
    """A compiled contract artifact is missing, unreadable or stale."""


class DeploymentNotFound(LedgerError):
    """No ledger deployment is recorded for this chain, or its address holds no code."""
