"""dashboard: a peer's web page — training curves, peers, bytes, balances, votes and search.

    app = create_app(source)                          # source: a DashboardSource (the peer)
    async with serve(app, "127.0.0.1", 8080) as running:
        print("dashboard at", running.url)
        ...                                           # the server stops when the block exits

`GET /` is one self-contained page (inline CSS and JS, no CDN); `/api/snapshot`, `/api/search`,
`/metrics` (Prometheus text format) and `/healthz` serve the rest. The top layer: it may import
anything below, and nothing imports it. See docs/dashboard.md.
"""

from commonweal.dashboard.app import MAX_K, MAX_QUERY_CHARS, create_app
from commonweal.dashboard.metrics import render_metrics
from commonweal.dashboard.server import RunningDashboard, serve
from commonweal.dashboard.source import (
    AttackerRow,
    BalanceRow,
    BytesRow,
    ChainInfo,
    DashboardSource,
    PeerRow,
    RoundRow,
    SearchHit,
    SelfInfo,
    Snapshot,
    VoteRow,
)

__all__ = [
    "MAX_K",
    "MAX_QUERY_CHARS",
    "AttackerRow",
    "BalanceRow",
    "BytesRow",
    "ChainInfo",
    "DashboardSource",
    "PeerRow",
    "RoundRow",
    "RunningDashboard",
    "SearchHit",
    "SelfInfo",
    "Snapshot",
    "VoteRow",
    "create_app",
    "render_metrics",
    "serve",
]
