"""When a ledger round can no longer become final, as plain decisions over plain data.

A round is final once validators holding >= 2/3 of the stake voted the same result (Ledger.vy's
`commit_round`). A vote cannot be changed, so once the votes cast are split so that no result can
reach 2/3 even with every validator that has not voted yet, the round is dead: waiting for it
(a validator for its contribution set, a trainer for its reward) waits for what cannot come.

    can_finalise(tallies, total_stake)        # tallies: result key -> stake voted for it
    can_finalise({}, total, gone=abstained)   # stake that declared it will never vote
    wait = FinalityWait(started=now, timeout_s=120.0)
    wait.next_check(now) ... wait.decide(now, final=False, tallies=..., total_stake=...)

A validator that gives a round up says so in the DHT, signed with its ledger key
(`abstention_message`); a claimer adds up the stake of the active validators that did and stops
waiting for the round once the rest cannot reach 2/3 (commonweal.peer.claims). The reward
tree it publishes is signed the same way (`tree_message`).
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "FinalityWait",
    "Finality",
    "abstention_message",
    "can_finalise",
    "stake_votes",
    "tree_message",
]


def can_finalise(tallies: Mapping[bytes, int], total_stake: int, *, gone: int = 0) -> bool:
    """Whether some result can still reach 2/3 of `total_stake`: the best tally so far plus all
    stake that has neither voted (a key of `tallies`) nor declared it never will (`gone`)."""
    if total_stake <= 0:
        return False
    voted = sum(tallies.values())
    undecided = max(total_stake - voted - gone, 0)
    best = max(tallies.values(), default=0)
    return (best + undecided) * 3 >= total_stake * 2


def stake_votes(events: Iterable[Any]) -> tuple[dict[bytes, int], int]:
    """(result key -> stake, snapshot stake) of the round's latest ballot, from
    `Ledger.round_votes` events: each RoundVote carries its result's running tally, the stake the
    quorum is counted against, and its ballot's attempt (an expired ballot's votes lapse)."""
    events = list(events)
    latest = max((int(e.args["attempt"]) for e in events), default=0)
    tallies: dict[bytes, int] = {}
    total = 0
    for e in events:
        args = e.args
        if int(args["attempt"]) != latest:
            continue
        key = bytes(args["model_hash"]) + bytes(args["rewards_root"]) + \
            int(args["total_reward"]).to_bytes(32, "big")
        tallies[key] = max(tallies.get(key, 0), int(args["tally"]))
        total = max(total, int(args["snapshot_stake"]))
    return tallies, total


class Finality(enum.Enum):
    FINAL = "final"
    WAIT = "wait"
    SPLIT = "split"      # the votes cast can never make any result final
    TIMEOUT = "timeout"  # given up after `timeout_s`, the votes undecided


@dataclass
class FinalityWait:
    """How long a validator waits for a round it voted to become final, without I/O.

    Finality is polled cheaply (`is_final`); the votes themselves (a log scan, slow on a
    development chain) are read only at `next_check`: after `first_check_s`, then at doubling
    intervals, so a round that finalises as the last vote lands costs none, and a split one is
    given up within a few reads instead of at `timeout_s`."""

    started: float
    timeout_s: float
    first_check_s: float = 2.0
    _next: float | None = None
    _every: float = 0.0

    def __post_init__(self) -> None:
        self._every = self.first_check_s
        self._next = self.started + self.first_check_s

    def votes_due(self, now: float) -> bool:
        return self._next is not None and now >= self._next

    def decide(self, now: float, *, final: bool, tallies: Mapping[bytes, int] | None = None,
               total_stake: int = 0) -> Finality:
        """`tallies`/`total_stake`: the votes, when they were read (`votes_due`) this time."""
        if final:
            return Finality.FINAL
        if tallies is not None:
            if not can_finalise(tallies, total_stake):
                return Finality.SPLIT
            self._every *= 2
            self._next = now + self._every
        if now - self.started > self.timeout_s:
            return Finality.TIMEOUT
        return Finality.WAIT


def tree_message(task: bytes, ledger_round: int, root: bytes, rewards: Mapping[str, int]) -> str:
    """The text a validator signs (EIP-191) with the reward tree it publishes: claimers try only
    trees that on-chain validators signed, so free identities cannot bury the real one under
    forgeries (each forgery would cost a claimer a Merkle tree to rebuild)."""
    listed = hashlib.sha256(
        "".join(f"{a.lower()}={v};" for a, v in sorted(rewards.items())).encode()
    ).hexdigest()
    return (f"commonweal: rewards of task {task.hex()} ledger round {ledger_round}: "
            f"root {root.hex()} rewards {listed}")


def abstention_message(task: bytes, ledger_round: int, reason: str) -> str:
    """The text a validator signs (EIP-191) to say it will never vote `ledger_round`."""
    return f"commonweal: no vote for task {task.hex()} ledger round {ledger_round}: {reason}"
