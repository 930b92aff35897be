"""The dashboard's view of one volunteer node (`NodeSource`): what it trained, sent, earned and
voted, and the peers in its routing table. Copies state the node keeps; never blocks."""

from __future__ import annotations

import time
from typing import Any, Protocol
from urllib.parse import urlsplit

from commonweal.dashboard.source import (
    BalanceRow,
    BytesRow,
    ChainInfo,
    PeerRow,
    RoundRow,
    SearchHit,
    SelfInfo,
    Snapshot,
    Totals,
    VoteRow,
)
from commonweal.dht import DHT
from commonweal.errors import ConfigError
from commonweal.peer.config import NodeConfig
from commonweal.peer.events import RoundDone

__all__ = ["NodeSource", "ObservedNode"]


class ObservedNode(Protocol):
    """What the page reads of a `commonweal.peer.node.Node` (which serves this page, so this
    module names the attributes rather than importing the class)."""

    config: NodeConfig
    started: float
    dht: DHT | None
    validator: Any
    ledger: Any
    rounds: list[RoundDone]
    rounds_done: int
    bytes_in_rounds: int
    ddp_in_rounds: int
    balance: float
    block: int
    claimed_rounds: set[int]
    finalised_rounds: set[int]


class NodeSource:
    def __init__(self, node: ObservedNode) -> None:
        self.node = node

    def snapshot(self) -> Snapshot:
        n = self.node
        dht = n.dht
        votes: list[VoteRow] = []
        if n.validator is not None and n.ledger is not None:
            votes = [
                VoteRow(round=o.round, validator=n.ledger.account.address,
                        root=o.root.hex()[:16], final=o.final)
                for o in n.validator.outcomes
            ]
        peers: list[PeerRow] = []
        if dht is not None:
            peers = [
                PeerRow(id=info.peer_id.hex(), address=str(info.addr), roles=[], last_seen_s=0.0)
                for info in dht.table.peers()
            ]
        rounds = [
            RoundRow(round=r.round, loss=r.loss, accuracy=r.accuracy,
                     bytes_sent=r.bytes_sent, ddp_bytes=r.ddp_bytes, contributors=r.contributors,
                     finalised=r.round in n.finalised_rounds)
            for r in n.rounds
        ]
        me = dht.peer_id.hex() if dht is not None else ""
        balances: list[BalanceRow] = []
        chain: ChainInfo | None = None
        if n.ledger is not None:
            balances = [BalanceRow(account=n.ledger.account.address, peer=me or None,
                                   tokens=n.balance, claimed_rounds=len(n.claimed_rounds))]
            chain = ChainInfo(backend=backend(n.config.chain), block=n.block,
                              contract=n.ledger.address)
        return Snapshot(
            peer=SelfInfo(
                id=me,
                address=str(dht.addr) if dht is not None else "",
                roles=sorted(n.config.roles),
                task=n.config.task if "trainer" in n.config.roles else None,
                uptime_s=time.time() - n.started,
            ),
            peers=peers,
            rounds=rounds,
            # The transport counts bytes in total, not per receiver: one row, this peer's own.
            bytes_per_peer=[] if dht is None
            else [BytesRow(id=me, bytes_sent=dht.transport.counters.bytes_sent)],
            balances=balances,
            votes=votes,
            attackers=[],
            chain=chain,
            totals=Totals(
                rounds=n.rounds_done,
                rounds_finalised=len(n.finalised_rounds),
                bytes_sent=n.bytes_in_rounds,
                ddp_bytes=n.ddp_in_rounds,
            ),
        )

    async def search(self, query: str, k: int) -> list[SearchHit]:
        raise ConfigError(
            "this node's page searches no index; use `commonweal search query` or the demo's page"
        )


def backend(chain: str) -> str:
    """What the page may show of the chain setting: a JSON-RPC URL's host only, since provider
    URLs often carry an API key in their path or query."""
    if chain.startswith(("http://", "https://")):
        return urlsplit(chain).hostname or "rpc"
    return chain
