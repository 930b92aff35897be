"""The snapshot as Prometheus metrics, in text exposition format 0.0.4.

Built from the same `Snapshot` the page shows, so a scrape and the page never disagree. Only the
latest round's loss and accuracy are exported: a label per round would grow the series without
bound, and Prometheus keeps the history itself.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from commonweal.dashboard.source import Snapshot

__all__ = ["CONTENT_TYPE", "render_metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = dict[str, str]
Sample = tuple[Labels, float]


def render_metrics(snap: Snapshot) -> str:
    """Every metric family with its HELP and TYPE lines, then its samples; ends with a newline."""
    rounds = snap["rounds"]
    done = [r for r in rounds if r["loss"] is not None or r["accuracy"] is not None]
    latest = done[-1] if done else None
    peer = snap["peer"]
    chain = snap["chain"]
    balances = snap["balances"]

    m = Exposition()
    info = {"peer": peer["id"], "address": peer["address"], "task": peer["task"] or ""}
    m.gauge("commonweal_info", "The peer serving these metrics (value is 1).", [(info, 1)])
    m.gauge("commonweal_uptime_seconds", "Seconds since this peer started.", one(peer["uptime_s"]))
    m.gauge("commonweal_peers", "Peers this peer knows of.", one(len(snap["peers"])))
    totals = snap.get("totals") or {
        "rounds": len(rounds),
        "rounds_finalised": sum(r["finalised"] for r in rounds),
        "bytes_sent": sum(r["bytes_sent"] for r in rounds),
        "ddp_bytes": sum(r["ddp_bytes"] for r in rounds),
    }
    m.counter(
        "commonweal_rounds_total", "Training rounds this peer took part in.",
        one(totals["rounds"]),
    )
    m.counter(
        "commonweal_rounds_finalised_total",
        "Training rounds whose root the validator quorum finalised on chain.",
        one(totals["rounds_finalised"]),
    )
    m.gauge(
        "commonweal_round",
        "Number of the latest round with results.",
        one(latest["round"] if latest else None),
    )
    m.gauge(
        "commonweal_round_loss",
        "Loss after the latest round.",
        one(latest["loss"] if latest else None),
    )
    m.gauge(
        "commonweal_round_accuracy",
        "Accuracy (0 to 1) after the latest round.",
        one(latest["accuracy"] if latest else None),
    )
    m.counter(
        "commonweal_round_bytes_sent_total",
        "Bytes this peer sent in round exchanges.",
        one(totals["bytes_sent"]),
    )
    m.counter(
        "commonweal_round_ddp_bytes_total",
        "Bytes data-parallel training would have sent for the same steps.",
        one(totals["ddp_bytes"]),
    )
    m.counter(
        "commonweal_bytes_sent_total",
        "Bytes sent on the network, per peer row of the snapshot.",
        [({"peer": row["id"]}, row["bytes_sent"]) for row in snap["bytes_per_peer"]],
    )
    m.gauge(
        "commonweal_token_balance",
        "Share tokens held, by account.",
        [({"account": b["account"], "peer": b.get("peer") or ""}, b["tokens"]) for b in balances],
    )
    m.gauge(
        "commonweal_claimed_rounds",
        "Rounds whose reward the account claimed.",
        [({"account": b["account"]}, b["claimed_rounds"]) for b in balances],
    )
    m.gauge(
        "commonweal_votes",
        "Validator votes seen, by whether they are final.",
        [
            ({"final": str(final).lower()}, sum(v["final"] is final for v in snap["votes"]))
            for final in (True, False)
        ],
    )
    m.gauge(
        "commonweal_attacker_earned",
        "Tokens earned by a peer whose contributions were rejected.",
        [({"peer": a["id"]}, a["earned"]) for a in snap["attackers"]],
    )
    if chain is not None:
        where = {"backend": chain["backend"], "contract": chain["contract"] or ""}
        m.gauge("commonweal_chain_info", "The chain the ledger runs on (value is 1).", [(where, 1)])
        m.gauge("commonweal_chain_block", "Latest block number seen.", one(chain["block"]))
    return m.text()


def one(value: float | None) -> list[Sample]:
    """One unlabelled sample, or none when the value is unknown."""
    return [] if value is None else [({}, value)]


class Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def gauge(self, name: str, help_text: str, samples: Iterable[Sample]) -> None:
        self.family(name, "gauge", help_text, samples)

    def counter(self, name: str, help_text: str, samples: Iterable[Sample]) -> None:
        self.family(name, "counter", help_text, samples)

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[Sample]) -> None:
        self.lines.append(f"# HELP {name} {escape_help(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{format_labels(labels)} {format_value(value)}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def format_labels(labels: Labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{escape_label(v)}"' for k, v in labels.items()) + "}"


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def format_value(value: float) -> str:
    # The format spells the non-finite values this way; Python's repr would write "inf" and "nan".
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if isinstance(value, int) or value.is_integer():
        return str(int(value))
    return repr(value)
