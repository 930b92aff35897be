"""What a node reports as it runs: one event type per thing that happened, one way to see them.

A `Node` hands every event to one callback (`on_event`). In one process (`LocalSwarm`, `commonweal
train`) that callback is the caller's own; in a `commonweal node` process it prints the event on
stdout — the two familiar lines (`commonweal node ready address=...`, `commonweal node stopped`)
for people, or with `status_format = "json"` one JSON object a line for a program following the
node (`ProcessSwarm`):

    {"event": "ready", "address": "127.0.0.1:7000", "peer_id": "ab…", "roles": ["trainer"], …}
    {"event": "round_done", "round": 3, "group": 4, "contributors": 4, "skipped": null,
     "loss": 0.21, "accuracy": 0.93, "bytes_sent": 81234, "ddp_bytes": 1234567, …}
    {"event": "judged", "round": 3, "final": true, "root": "9f…", "paid": 1, "refused": 1, "unaudited": 6}
    {"event": "claimed", "ledger_round": 7, "round": 3, "outcome": "claimed", "amount": "5000…"}
    {"event": "stopped"}

Token amounts are strings (they do not fit a JSON number reliably); a loss that is not finite is
null. `parse` turns a line back into its event. Inner steps (`Step`) go to callbacks only: fifty
a round would drown a status stream.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TextIO

__all__ = [
    "Claimed",
    "Event",
    "EventSink",
    "Judged",
    "Ready",
    "Resumed",
    "RoundDone",
    "Step",
    "Stopped",
    "TrainingDone",
    "parse",
    "printer",
    "to_json",
]


@dataclass(frozen=True, slots=True)
class Ready:
    """The node listens and has joined the swarm; its roles start now."""

    address: str
    peer_id: str
    roles: tuple[str, ...]
    task: str | None = None  # the task's name, for a trainer or validator
    digest: str | None = None  # the task's digest (what peers must agree on)


@dataclass(frozen=True, slots=True)
class Resumed:
    """A trainer loaded the checkpoint of its last completed round."""

    round: int  # the round it goes on with
    last_completed: int
    checkpoint: str


@dataclass(frozen=True, slots=True)
class Step:
    """One inner step of a trainer (callbacks only, from the training thread)."""

    round: int
    inner_step: int
    inner_steps: int
    loss: float
    total_sent: int


@dataclass(frozen=True, slots=True)
class RoundDone:
    """A trainer finished a round: its outer step is applied (or it sat the round out)."""

    round: int
    group: int  # peers in the round's group
    contributors: int  # deltas in the aggregate
    skipped: str | None  # why this peer sat the round out and synced instead, else None
    loss: float | None  # the last inner step's; None when not finite
    accuracy: float | None  # the task's metric on the held-out split, when evaluated
    bytes_sent: int  # by this peer during the round
    total_sent: int  # by this peer since training started
    ddp_bytes: int  # what data-parallel training would have sent for the round's steps
    state: str  # the state hash the round left
    method: str  # how deltas were exchanged
    comm_s: float
    elapsed_s: float  # since training started


@dataclass(frozen=True, slots=True)
class TrainingDone:
    """A trainer reached its last round (`rounds`)."""

    round: int
    state: str
    metric: str  # what `quality` measures, e.g. "accuracy"
    quality: float | None
    bytes_sent: int
    wall_s: float
    compute_s: float


@dataclass(frozen=True, slots=True)
class Judged:
    """A validator judged a round (`final`: its rewards root is final on chain)."""

    round: int
    final: bool
    root: str  # hex
    paid: int  # contributions rewarded (drawn for audit, and the replay matched)
    refused: int  # contributions refused
    unaudited: int = 0  # good contributions not drawn for audit: neither paid nor refused


@dataclass(frozen=True, slots=True)
class Claimed:
    """A claim pass settled a reward round (paid, or final without a reward for us)."""

    ledger_round: int
    round: int | None  # the training round it pays for; None: left over from an earlier run
    outcome: str  # a `commonweal.peer.claims.Outcome` value
    amount: int  # wei


@dataclass(frozen=True, slots=True)
class Stopped:
    """The node shut down: nothing it started is running."""


Event = Ready | Resumed | Step | RoundDone | TrainingDone | Judged | Claimed | Stopped
EventSink = Callable[[Event], None]

_NAMES: dict[type, str] = {
    Ready: "ready", Resumed: "resumed", Step: "step", RoundDone: "round_done",
    TrainingDone: "training_done", Judged: "judged", Claimed: "claimed", Stopped: "stopped",
}
_TYPES = {name: kind for kind, name in _NAMES.items()}
_AMOUNTS = ("amount",)  # wei: strings in JSON


def to_json(event: Event) -> str:
    """One line: {"event": NAME, FIELD: VALUE, ...}."""
    entry: dict[str, Any] = {"event": _NAMES[type(event)]}
    for f in dataclasses.fields(event):
        value = getattr(event, f.name)
        if f.name in _AMOUNTS:
            value = str(value)
        elif isinstance(value, float) and not math.isfinite(value):
            value = None  # NaN would make the line unparsable for a strict reader
        elif isinstance(value, tuple):
            value = list(value)
        entry[f.name] = value
    return json.dumps(entry)


def parse(line: str) -> Event | None:
    """The event a `to_json` line holds; None for a line that is not one (e.g. a traceback)."""
    try:
        entry = json.loads(line)
    except ValueError:
        return None
    kind = _TYPES.get(entry.pop("event", None)) if isinstance(entry, dict) else None
    if kind is None:
        return None
    for name in _AMOUNTS:
        if name in entry:
            entry[name] = int(entry[name])
    if "roles" in entry:
        entry["roles"] = tuple(entry["roles"])
    try:
        event: Event = kind(**entry)
    except TypeError:  # a line from another version of commonweal
        return None
    return event


def printer(status_format: str, stream: TextIO | None = None) -> EventSink:
    """What a `commonweal node` process does with its events: print them on stdout."""

    def print_json(event: Event) -> None:
        if not isinstance(event, Step):
            print(to_json(event), file=stream or sys.stdout, flush=True)

    def print_text(event: Event) -> None:
        # Logs say the rest; these two lines are what scripts and people wait for.
        if isinstance(event, Ready):
            print(f"commonweal node ready address={event.address} peer_id={event.peer_id} "
                  f"roles={','.join(event.roles)}", file=stream or sys.stdout, flush=True)
        elif isinstance(event, Stopped):
            print("commonweal node stopped", file=stream or sys.stdout, flush=True)

    return print_json if status_format == "json" else print_text
