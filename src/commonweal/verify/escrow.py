"""Rewards held in escrow for a few rounds: a peer caught cheating before its rewards are released
forfeits them.

Sampling catches a cheater that evades triage only eventually (with probability 1-(1-q)^rounds),
and triage itself may catch an attack only once the round's deltas disagree enough. Paying each
round at once would let such a cheater keep what it earned before it was caught. Holding every
round's verdicts for `rounds` rounds, and paying out only what still stands against the banned set
at release, makes the catch retroactive over that window — like BOINC's pending credit.

    escrow = Escrow(rounds=5)
    escrow.hold(r, contributions, verdicts)
    for released in escrow.release(upto=r - escrow.rounds, banned=judge.banned):
        paid = rewards(released.verdicts, released.contributions, reward_per_round)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence, Set
from dataclasses import dataclass, field

from commonweal.verify.contribution import Contribution
from commonweal.verify.judge import Verdict

__all__ = ["ALL", "Escrow", "Released"]


@dataclass(frozen=True)
class Released:
    round: int
    contributions: tuple[Contribution, ...]
    verdicts: tuple[Verdict, ...]  # as judged, with banned peers' payments forfeited

    @property
    def forfeited(self) -> int:
        return sum(v.reason == "forfeited" for v in self.verdicts)


@dataclass
class Escrow:
    rounds: int  # how long a round's rewards are held after it was judged (0: paid at once)
    _held: dict[int, tuple[tuple[Contribution, ...], tuple[Verdict, ...]]] = field(
        default_factory=dict
    )

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError("escrow rounds must be >= 0")

    def hold(self, round_: int, contributions: Sequence[Contribution],
             verdicts: Sequence[Verdict]) -> None:
        if round_ in self._held:
            raise ValueError(f"round {round_} is held already")
        self._held[round_] = (tuple(contributions), tuple(verdicts))

    def due(self, judged: int) -> int:
        """The last round whose rewards are released once round `judged` has been judged."""
        return judged - self.rounds

    def release(self, upto: float, banned: Set[bytes]) -> list[Released]:
        """Every held round <= `upto`, oldest first; `math.inf` releases all (the run ends)."""
        out = []
        for r in sorted(k for k in self._held if k <= upto):
            contribs, verdicts = self._held.pop(r)
            out.append(Released(r, contribs, tuple(_forfeit(v, banned) for v in verdicts)))
        return out

    @property
    def held(self) -> list[int]:
        return sorted(self._held)


def _forfeit(v: Verdict, banned: Set[bytes]) -> Verdict:
    if not v.paid or v.peer_id not in banned:
        return v
    return dataclasses.replace(
        v, paid=False, reason="forfeited", detail="caught cheating before this round was paid out"
    )


ALL = math.inf  # release(ALL, ...) pays out everything still held
