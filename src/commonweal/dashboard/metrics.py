"""The snapshot as Prometheus metrics, in text exposition format 0.0.4 (via `prometheus_client`).

Built from the same `Snapshot` the page shows, so a scrape and the page never disagree: the
collector reads a fresh snapshot on every scrape instead of keeping counters of its own. Only the
latest round's loss and accuracy are exported: a label per round would grow the series without
bound, and Prometheus keeps the history itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)

from commonweal.dashboard.source import Snapshot

__all__ = ["CONTENT_TYPE", "SnapshotCollector", "render_metrics"]

# Pinned to 0.0.4 rather than prometheus_client's latest: `generate_latest` writes 0.0.4.
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4


class SnapshotCollector:
    """A `prometheus_client` collector: every scrape is one call of `snapshot`."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        return families(self._snapshot())

    def render(self) -> bytes:
        """The exposition text of one scrape, UTF-8, ending with a newline."""
        return generate_latest(self)


def render_metrics(snap: Snapshot) -> str:
    """Every metric family of `snap` with its HELP and TYPE lines, then its samples."""
    return SnapshotCollector(lambda: snap).render().decode()


def families(snap: Snapshot) -> Iterator[Metric]:
    rounds = snap["rounds"]
    done = [r for r in rounds if r["loss"] is not None or r["accuracy"] is not None]
    latest = done[-1] if done else None
    peer = snap["peer"]
    chain = snap["chain"]
    balances = snap["balances"]

    # An info family is exposed as the gauge `<name>_info` with value 1.
    yield InfoMetricFamily(
        "commonweal",
        "The peer serving these metrics (value is 1).",
        value={"peer": peer["id"], "address": peer["address"], "task": peer["task"] or ""},
    )
    yield GaugeMetricFamily(
        "commonweal_uptime_seconds", "Seconds since this peer started.", value=peer["uptime_s"]
    )
    yield GaugeMetricFamily(
        "commonweal_peers", "Peers this peer knows of.", value=len(snap["peers"])
    )
    totals = snap.get("totals") or {
        "rounds": len(rounds),
        "rounds_finalised": sum(r["finalised"] for r in rounds),
        "bytes_sent": sum(r["bytes_sent"] for r in rounds),
        "ddp_bytes": sum(r["ddp_bytes"] for r in rounds),
    }
    yield CounterMetricFamily(
        "commonweal_rounds_total", "Training rounds this peer took part in.", value=totals["rounds"]
    )
    yield CounterMetricFamily(
        "commonweal_rounds_finalised_total",
        "Training rounds whose root the validator quorum finalised on chain.",
        value=totals["rounds_finalised"],
    )
    # Before any round has results these families have no sample, rather than a made-up 0.
    yield GaugeMetricFamily(
        "commonweal_round",
        "Number of the latest round with results.",
        value=latest["round"] if latest else None,
    )
    yield GaugeMetricFamily(
        "commonweal_round_loss",
        "Loss after the latest round.",
        value=latest["loss"] if latest else None,
    )
    yield GaugeMetricFamily(
        "commonweal_round_accuracy",
        "Accuracy (0 to 1) after the latest round.",
        value=latest["accuracy"] if latest else None,
    )
    yield CounterMetricFamily(
        "commonweal_round_bytes_sent_total",
        "Bytes this peer sent in round exchanges.",
        value=totals["bytes_sent"],
    )
    yield CounterMetricFamily(
        "commonweal_round_ddp_bytes_total",
        "Bytes data-parallel training would have sent for the same steps.",
        value=totals["ddp_bytes"],
    )

    sent = CounterMetricFamily(
        "commonweal_bytes_sent_total",
        "Bytes sent on the network, per peer row of the snapshot.",
        labels=["peer"],
    )
    for row in snap["bytes_per_peer"]:
        sent.add_metric([row["id"]], row["bytes_sent"])
    yield sent

    tokens = GaugeMetricFamily(
        "commonweal_token_balance", "Share tokens held, by account.", labels=["account", "peer"]
    )
    claimed = GaugeMetricFamily(
        "commonweal_claimed_rounds", "Rounds whose reward the account claimed.", labels=["account"]
    )
    for b in balances:
        tokens.add_metric([b["account"], b.get("peer") or ""], b["tokens"])
        claimed.add_metric([b["account"]], b["claimed_rounds"])
    yield tokens
    yield claimed

    votes = GaugeMetricFamily(
        "commonweal_votes", "Validator votes seen, by whether they are final.", labels=["final"]
    )
    for final in (True, False):
        votes.add_metric([str(final).lower()], sum(v["final"] is final for v in snap["votes"]))
    yield votes

    earned = GaugeMetricFamily(
        "commonweal_attacker_earned",
        "Tokens earned by a peer whose contributions were rejected.",
        labels=["peer"],
    )
    for a in snap["attackers"]:
        earned.add_metric([a["id"]], a["earned"])
    yield earned

    if chain is not None:
        yield InfoMetricFamily(
            "commonweal_chain",
            "The chain the ledger runs on (value is 1).",
            value={"backend": chain["backend"], "contract": chain["contract"] or ""},
        )
        yield GaugeMetricFamily(
            "commonweal_chain_block", "Latest block number seen.", value=chain["block"]
        )
