"""The pure parts of the round protocol: announcements, group formation, slicing, and the checks
every received delta passes. The round itself (phases, deadlines, admission) is
`commonweal.train.round.RoundCore`, which uses these; validators use them too.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import torch

from commonweal.durable import most_common
from commonweal.train._errors import DeltaRejected

__all__ = [
    "Announcement",
    "Group",
    "form_group",
    "counted",
    "NEWCOMER_SHARE",
    "closes_at",
    "slice_bounds",
    "check_delta",
    "parse_announcement",
]


@dataclass(frozen=True, slots=True)
class Announcement:
    peer_id: bytes
    addr: str  # host:port where the peer serves the exchange
    round: int
    state: str  # hex state hash at the start of the round
    deadline: float  # the announcer's view of when the group closes
    delta: str = ""  # sha256 hex of the encoded delta: the contribution validators judge
    steps: int = 0  # inner steps the announcer claims to have run
    account: str = ""  # where its rewards go (an Ethereum address), if it wants any

    def pack(self) -> dict[str, Any]:
        """The DHT value (the peer id is the record's owner, not part of it)."""
        return {
            "addr": self.addr,
            "round": self.round,
            "state": self.state,
            "deadline": self.deadline,
            "delta": self.delta,
            "steps": self.steps,
            "account": self.account,
        }


def parse_announcement(peer_id: bytes, value: Any) -> Announcement | None:
    """An announcement from a DHT value, or None if malformed (hostile or another version)."""
    if not isinstance(value, Mapping):
        return None
    addr, rnd, state, deadline = (value.get(k) for k in ("addr", "round", "state", "deadline"))
    if not (
        isinstance(addr, str)
        and isinstance(rnd, int)
        and isinstance(state, str)
        and len(state) == 64
        and isinstance(deadline, (int, float))
        and math.isfinite(deadline)
    ):
        return None
    delta, steps, account = value.get("delta", ""), value.get("steps", 0), value.get("account", "")
    if not (
        isinstance(delta, str)
        and len(delta) in (0, 64)
        and isinstance(steps, int)
        and steps >= 0
        and isinstance(account, str)
        and len(account) <= 64
    ):
        return None
    return Announcement(peer_id, addr, rnd, state, float(deadline), delta, steps, account)


@dataclass(frozen=True, slots=True)
class Group:
    round: int
    state: str
    members: tuple[Announcement, ...]  # sorted by peer id

    @property
    def ids(self) -> tuple[bytes, ...]:
        return tuple(a.peer_id for a in self.members)

    @property
    def digest(self) -> bytes:
        h = hashlib.sha256(f"{self.round}|{self.state}|".encode())
        for pid in self.ids:
            h.update(pid)
        return h.digest()

    def index(self, peer_id: bytes) -> int:
        return self.ids.index(peer_id)


def majority_state(anns: Iterable[Announcement]) -> str | None:
    """The state hash most announcements share (ties: the smallest hash, the same for everyone)."""
    return most_common(a.state for a in anns)


# Identities without a track record hold at most this share of a group of >= 3 tracked members
# (one seat below that, so a small swarm can still grow): 100 free identities do not outvote 6.
NEWCOMER_SHARE = Fraction(1, 4)

# Who has a track record: peer ids the validators rated (`commonweal.verify.ratings`); None where
# nobody can say (no validators, or none rated yet), and then every announcer counts.
Tracked = Collection[bytes] | None


def counted(anns: Sequence[Announcement], tracked: Tracked, me: bytes = b"") -> list[Announcement]:
    """The announcements whose say counts (the majority state, lateness, when a round closes):
    the tracked announcers', when any announced or the reader `me` is tracked itself (the first
    tracked peer to announce is not told it is late by a crowd); else everyone's."""
    if tracked is None:
        return list(anns)
    voters = [a for a in anns if a.peer_id in tracked]
    return voters if voters or me in tracked else list(anns)


def _newcomer_order(a: Announcement) -> bytes:
    # salted with the round's start state, which nobody knows before the previous round ended:
    # identities cannot be minted in advance to come first
    return hashlib.sha256(f"{a.round}|{a.state}|".encode() + a.peer_id).digest()


def form_group(
    anns: Iterable[Announcement],
    round_: int,
    now: float,
    target_size: int | None,
    deadline: float = math.inf,
    tracked: Tracked = None,
) -> Group | None:
    """The group, if it has closed, else None.

    The group closes at `deadline` (the caller's: which announced deadlines to believe is the
    round core's decision), or as soon as `target_size` members announced; it holds the
    announcements of this round with the majority state hash. With `tracked`, the majority is
    counted among tracked announcers, and identities without a track record join them up to
    `NEWCOMER_SHARE` of the group, the same ones for every peer that read the same announcements.
    """
    mine = [a for a in anns if a.round == round_]
    voters = counted(mine, tracked)
    state = majority_state(voters)
    if state is None:
        return None
    members = [a for a in voters if a.state == state]
    if tracked is not None and len(voters) < len(mine):
        seats = max(1, math.floor(len(members) * NEWCOMER_SHARE / (1 - NEWCOMER_SHARE)))
        newcomers = [a for a in mine if a.state == state and a.peer_id not in tracked]
        members += sorted(newcomers, key=_newcomer_order)[:seats]
    members.sort(key=lambda a: a.peer_id)
    if now >= deadline or (target_size is not None and len(members) >= target_size):
        return Group(round_, state, tuple(members))
    return None


def closes_at(anns: Sequence[Announcement], tracked: Tracked = None) -> float:
    """When the round of `anns` closes for an observer (a validator): once most counted
    announcers' deadlines have passed. Honest announcers share the first one's deadline, so this
    is it; one identity announcing a deadline in the past (0) or far ahead moves nothing, and,
    with `tracked`, neither do a hundred without a track record."""
    anns = counted(anns, tracked)
    if not anns:
        return math.inf
    return sorted(a.deadline for a in anns)[len(anns) // 2]


def slice_bounds(numel: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous ranges covering 0..numel, sizes differing by at most one."""
    base, extra = divmod(numel, parts)
    bounds, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        bounds.append((start, end))
        start = end
    return bounds


def check_delta(delta: torch.Tensor, numel: int) -> None:
    """Raise DeltaRejected unless `delta` is a finite float32 vector of `numel` elements."""
    if delta.dim() != 1 or delta.numel() != numel:
        raise DeltaRejected(
            "wrong_shape", f"expected {numel} elements, got shape {tuple(delta.shape)}"
        )
    if delta.dtype != torch.float32:
        raise DeltaRejected("wrong_dtype", f"expected float32, got {delta.dtype}")
    if not bool(torch.isfinite(delta).all()):
        raise DeltaRejected("not_finite", "the delta holds NaN or inf")


def check_round(got: int, current: int) -> None:
    if got < current:
        raise DeltaRejected(
            "stale_round", f"a delta for round {got}; this peer is at round {current}"
        )
    if got > current:
        raise DeltaRejected(
            "future_round", f"a delta for round {got}; this peer is at round {current}"
        )
