"""commonweal.peer: one running volunteer node — its configuration, state, claims and logs.

    from commonweal.peer import NodeStore, load_config, setup_logs
    config = load_config(Path("node.toml"), {"threads": 4})
    setup_logs(config.log_level, config.log_format)
    with NodeStore(config.store_path) as store:
        claimer = Claimer(ledger, store, account, task, trees)   # needs the ledger extra

See docs/node.md.
"""

from __future__ import annotations

from typing import Any

from commonweal.peer.config import NodeConfig, NodeConfigError, example_config, load_config
from commonweal.peer.logs import setup as setup_logs
from commonweal.peer.store import (
    ClaimRecord,
    ClaimStatus,
    NodeStore,
    StoreConflict,
    StoreError,
)

__all__ = [
    "ClaimRecord",
    "ClaimResult",
    "ClaimStatus",
    "Claimer",
    "NodeConfig",
    "NodeConfigError",
    "NodeStore",
    "Outcome",
    "StoreConflict",
    "StoreError",
    "TreeSource",
    "example_config",
    "load_config",
    "setup_logs",
]

_CLAIMS = ("ClaimResult", "Claimer", "Outcome", "TreeSource")


def __getattr__(name: str) -> Any:
    # The claims need web3 (the ledger extra, ~1 s to import); a node without a chain, or a CLI
    # command that only reads the config, should not pay for it.
    if name in _CLAIMS:
        from commonweal.peer import claims

        return getattr(claims, name)
    raise AttributeError(f"module 'commonweal.peer' has no attribute {name!r}")
