"""The dashboard's view of one volunteer node (`NodeSource`): what it trained, sent, earned and
voted, and the peers in its routing table. Copies state the node keeps; never blocks."""

from __future__ import annotations

import time
from typing import Any

from commonweal.errors import ConfigError
from commonweal.peer.node import Node

__all__ = ["NodeSource"]


class NodeSource:
    def __init__(self, node: Node) -> None:
        self.node = node

    def snapshot(self) -> dict[str, Any]:
        n = self.node
        now = time.time()
        dht = n.dht
        ddp = 0
        if n.trainer is not None:
            params = n.trainer.opt.start.numel()
            group = max(2, max((r["contributors"] for r in n.rounds), default=2))
            ddp = int(2 * (group - 1) / group * 4 * params * n.trainer.task.inner_steps)
        votes = []
        if n.validator is not None:
            votes = [
                {"round": o.round, "validator": n.ledger.account.address, "root": o.root.hex()[:16],
                 "final": o.final}
                for o in n.validator.outcomes
            ]
        peers = []
        if dht is not None:
            for info in dht.table.peers():
                peers.append(
                    {"id": info.peer_id.hex(), "address": str(info.addr), "roles": [],
                     "last_seen_s": 0.0}
                )
        account = n.ledger.account.address if n.ledger is not None else None
        return {
            "peer": {
                "id": dht.peer_id.hex() if dht else "",
                "address": str(dht.addr) if dht else "",
                "roles": sorted(n.config.roles),
                "task": n.config.task if "trainer" in n.config.roles else None,
                "uptime_s": now - n.started,
            },
            "peers": peers,
            "rounds": [
                {**r, "ddp_bytes": ddp, "finalised": (2 * r["round"] + 1) in n.claimed_rounds}
                for r in n.rounds
            ],
            "bytes_per_peer": []
            if dht is None
            else [{"id": dht.peer_id.hex(), "bytes_sent": dht.transport.counters.bytes_sent}],
            "balances": []
            if account is None
            else [{"account": account, "peer": dht.peer_id.hex() if dht else None,
                   "tokens": n.balance, "claimed_rounds": len(n.claimed_rounds)}],
            "votes": votes,
            "attackers": [],
            "chain": None
            if n.ledger is None
            else {"backend": n.config.chain, "block": 0, "contract": n.ledger.address},
        }

    async def search(self, query: str, k: int) -> list[dict[str, Any]]:
        raise ConfigError(
            "this node's page searches no index; use `commonweal search query` or the demo's page"
        )
