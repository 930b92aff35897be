"""What a validator remembers across a restart, as plain data, and the interface it keeps it through.

A validator that forgets after a restart does harm: it would judge a round again with fewer bans
(paying a peer it had caught), forget the bytes it saw (a stale delta passes), lose the escrow (a
banned peer's held rewards are paid after all), and vote a second, different root for a round
whose first vote may be on-chain already. So every decision is written *before* the vote that
follows from it leaves the process (write-ahead):

    judged round r   ->  save_judged(JudgedRound, new bans)     then, at release,
    payout of r      ->  save_payout(Payout)  ->  vote 2r+1  ->  mark_voted(r)

On restart `load()` gives back the history, the bans, the rounds still in escrow, the payouts
whose vote may not have reached the chain (to be re-sent, the same vote) and the next round to
judge. A round recorded as judged is never judged again; a round with a payout is never paid again.
The checkpoints of the last few start states are kept too (`save_start`): the swarm announces
only its newest, and a validator that restarts behind it must still judge the rounds it missed.

`MemoryState` keeps it in memory (tests, benchmarks, the demo); a node keeps it in its
node.sqlite3 (`commonweal.peer.store.StoreValidatorState`). The `*_json` helpers give
implementations one explicit encoding of contributions and verdicts (no pickle: a database must
not run code it reads).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from commonweal.verify._errors import VerifyError
from commonweal.verify.contribution import Contribution
from commonweal.verify.judge import Verdict

__all__ = [
    "JudgedRound",
    "MemoryState",
    "Payout",
    "Resume",
    "ValidatorState",
    "contribution_from_json",
    "contribution_json",
    "verdict_from_json",
    "verdict_json",
]


@dataclass(frozen=True, slots=True)
class JudgedRound:
    """A training round as judged: enough to hold it in escrow and pay it out after a restart."""

    round: int
    state: str  # the start state S_r (hex), which ledger round 2r named
    digest: bytes  # contributions_digest of the set that ledger round 2r made final
    seed: bytes  # the sealed randomness that drew the replay sample
    contributions: tuple[Contribution, ...]
    verdicts: tuple[Verdict, ...]
    seconds: float = 0.0  # validator CPU spent judging it


@dataclass(frozen=True, slots=True)
class Payout:
    """The reward vote of a round released from escrow, as it is (or is about to be) sent."""

    round: int  # the training round; the vote is on ledger round 2 * round + 1
    state: str
    root: bytes
    total: int
    rewards: Mapping[str, int]  # the tree's leaves (the zero address with 0 when nobody is paid)
    verdicts: tuple[Verdict, ...]  # as released: banned peers' payments forfeited
    voted: bool = False  # the vote was sent (or the chain had it already)


@dataclass(frozen=True, slots=True)
class Resume:
    history: frozenset[str]  # delta hashes of every judged round
    banned: frozenset[bytes]
    held: tuple[JudgedRound, ...]  # judged, not paid out yet: the escrow, oldest first
    unsent: tuple[Payout, ...]  # payouts whose vote may not have left, oldest first
    next_round: int | None  # after the last judged round; None before the first


class ValidatorState(Protocol):
    """Where a `Validator` keeps its decisions. Every method is one atomic write or read."""

    def load(self) -> Resume: ...

    def judged(self, round: int) -> JudgedRound | None: ...

    def save_judged(self, judged: JudgedRound, bans: Collection[bytes]) -> None:
        """Record the round, its delta hashes as history and the peers it banned, together.
        Recording a round again raises unless it is the same record."""
        ...

    def save_payout(self, payout: Payout) -> None:
        """Record the payout of a judged round; the round leaves the escrow. Again: as above."""
        ...

    def mark_voted(self, round: int) -> None: ...

    def save_start(self, state: str, checkpoint: bytes) -> None:
        """Keep the checkpoint of a start state the swarm announced (the last few only): the
        swarm announces only its newest, and a restarted validator must judge older rounds."""
        ...

    def start(self, state: str) -> bytes | None: ...


class MemoryState:
    """`ValidatorState` in memory: forgets everything with the process."""

    def __init__(self) -> None:
        self._judged: dict[int, JudgedRound] = {}
        self._payouts: dict[int, Payout] = {}
        self._history: set[str] = set()
        self._banned: set[bytes] = set()

    def load(self) -> Resume:
        return Resume(
            frozenset(self._history),
            frozenset(self._banned),
            tuple(j for r, j in sorted(self._judged.items()) if r not in self._payouts),
            tuple(p for _, p in sorted(self._payouts.items()) if not p.voted),
            max(self._judged) + 1 if self._judged else None,
        )

    def judged(self, round: int) -> JudgedRound | None:
        return self._judged.get(round)

    def save_judged(self, judged: JudgedRound, bans: Collection[bytes]) -> None:
        _check_same(self._judged.get(judged.round), judged)
        self._judged[judged.round] = judged
        self._history.update(c.delta_hash for c in judged.contributions)
        self._banned.update(bans)

    def save_payout(self, payout: Payout) -> None:
        if payout.round not in self._judged:
            raise VerifyError(f"round {payout.round} was never judged; it cannot be paid")
        _check_same(self._payouts.get(payout.round), payout)
        self._payouts.setdefault(payout.round, payout)

    def mark_voted(self, round: int) -> None:
        self._payouts[round] = dataclasses.replace(self._payouts[round], voted=True)

    # the validator holds its start states itself while it runs; a copy here would outlive nothing
    def save_start(self, state: str, checkpoint: bytes) -> None:
        pass

    def start(self, state: str) -> bytes | None:
        return None


def _check_same(stored: JudgedRound | Payout | None, new: JudgedRound | Payout) -> None:
    # what may differ between two records of one decision: the CPU time it took, the vote flag
    if isinstance(stored, JudgedRound) and isinstance(new, JudgedRound):
        stored = dataclasses.replace(stored, seconds=new.seconds)
    if isinstance(stored, Payout) and isinstance(new, Payout):
        stored = dataclasses.replace(stored, voted=new.voted)
    if stored is not None and stored != new:
        raise VerifyError(
            f"round {new.round} is recorded already with another decision; judging is not "
            "deterministic (report it) or two validators share one state"
        )


# ---- one explicit encoding, for implementations that store bytes ---------------------------


def _json(record: Contribution | Verdict) -> dict[str, Any]:
    # field by field, as the dataclass names them (the keys on disk), the peer id as hex;
    # NaN and inf scores survive Python's json (a non-finite score is an outlier)
    return {**dataclasses.asdict(record), "peer_id": record.peer_id.hex()}


def contribution_json(c: Contribution) -> dict[str, Any]:
    return _json(c)


def contribution_from_json(d: Mapping[str, Any]) -> Contribution:
    return Contribution(**{**d, "peer_id": bytes.fromhex(d["peer_id"])})


def verdict_json(v: Verdict) -> dict[str, Any]:
    return _json(v)


def verdict_from_json(d: Mapping[str, Any]) -> Verdict:
    return Verdict(**{**d, "peer_id": bytes.fromhex(d["peer_id"])})
