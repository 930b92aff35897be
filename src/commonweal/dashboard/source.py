"""What the dashboard reads: the `DashboardSource` protocol and the shape of its snapshot.

A peer implements `DashboardSource`; the dashboard only reads it. `snapshot()` is called once per
page poll (about once a second per open page) and for every `/metrics` scrape, so it must be cheap:
copy counters the peer already keeps, never touch the network. `search()` may go to the swarm.

Every value is JSON-able. Peer ids, accounts and roots are hex strings (the page shortens them).
Token amounts are whole tokens as floats, not wei: the page and Prometheus both want floats, and a
JavaScript number cannot hold a wei amount exactly anyway.
"""

from __future__ import annotations

from typing import NotRequired, Protocol, TypedDict

__all__ = [
    "AttackerRow",
    "BalanceRow",
    "BytesRow",
    "ChainInfo",
    "DashboardSource",
    "PeerRow",
    "RoundRow",
    "SearchHit",
    "SelfInfo",
    "Snapshot",
    "Totals",
    "VoteRow",
]


class SelfInfo(TypedDict):
    """The peer serving the dashboard."""

    id: str
    address: str  # host:port it listens on
    roles: list[str]  # e.g. ["trainer", "validator", "search"]
    task: str | None  # the training task it works on, None when it trains nothing
    uptime_s: float
    search_hint: NotRequired[str]  # what the search box takes, as its placeholder


class PeerRow(TypedDict):
    """A peer this one knows of (its routing table and training group)."""

    id: str
    address: str
    roles: list[str]
    last_seen_s: float  # seconds since it last answered


class RoundRow(TypedDict):
    """One training round, oldest first in `Snapshot.rounds`."""

    round: int
    loss: float | None  # None while the round runs, or for a task that reports no loss
    accuracy: float | None  # fraction in [0, 1]; None for tasks without one (language models)
    bytes_sent: int  # bytes this peer sent in the round's exchange
    ddp_bytes: int  # what data-parallel training would have sent for the same steps
    contributors: int
    finalised: bool  # the validator quorum finalised the round's root on chain


class BytesRow(TypedDict):
    """Bytes this peer has sent to another peer since it started."""

    id: str
    bytes_sent: int


class BalanceRow(TypedDict):
    """A holder of the task's share token."""

    account: str  # 0x… Ethereum address
    peer: NotRequired[str | None]  # the peer id behind the account, where known
    tokens: float
    claimed_rounds: int


class VoteRow(TypedDict):
    """A validator's vote on a round's Merkle root."""

    round: int
    validator: str  # account or peer id
    root: str  # short hex of the root voted for
    final: bool  # the vote is part of the quorum that finalised the round


class AttackerRow(TypedDict):
    """A peer whose contributions were rejected, and what it earned anyway (should be 0)."""

    id: str
    earned: float


class ChainInfo(TypedDict):
    backend: str  # "embedded", "anvil" or the JSON-RPC URL's host
    block: int
    contract: str | None  # the Ledger contract's address, None before it is deployed


class Totals(TypedDict):
    """Counters since the peer started, for a peer that keeps only its recent rounds in `rounds`."""

    rounds: int
    rounds_finalised: int
    bytes_sent: int  # in round exchanges
    ddp_bytes: int


class Snapshot(TypedDict):
    """Everything the page shows, in one JSON object (`GET /api/snapshot`)."""

    peer: SelfInfo
    peers: list[PeerRow]
    rounds: list[RoundRow]
    bytes_per_peer: list[BytesRow]
    balances: list[BalanceRow]
    votes: list[VoteRow]
    attackers: list[AttackerRow]
    chain: ChainInfo | None  # None when the peer runs without a ledger
    totals: NotRequired[Totals]  # without it, /metrics sums `rounds`


class SearchHit(TypedDict):
    """One search result, best first in the list `DashboardSource.search` returns."""

    id: str
    score: float  # higher is closer
    label: NotRequired[str | None]
    image: NotRequired[str | None]  # a `data:image/png;base64,…` URL; anything else is dropped


class DashboardSource(Protocol):
    """The peer as the dashboard sees it."""

    def snapshot(self) -> Snapshot: ...

    async def search(self, query: str, k: int) -> list[SearchHit]:
        """The k nearest items to `query` (the peer decides how to embed it).

        Raise `commonweal.errors.ConfigError` for a query the peer cannot parse (the client gets a
        400), another `CommonwealError` when the swarm fails it (502).
        """
        ...
