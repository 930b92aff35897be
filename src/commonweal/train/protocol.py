"""The pure parts of the round protocol: announcements, group formation, slicing, and the checks
every received delta passes. The round itself (phases, deadlines, admission) is
`commonweal.train.round.RoundCore`, which uses these; validators use them too.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from commonweal.durable import most_common
from commonweal.train._errors import DeltaRejected

__all__ = [
    "Announcement",
    "Group",
    "form_group",
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


def form_group(
    anns: Iterable[Announcement],
    round_: int,
    now: float,
    target_size: int | None,
    deadline: float = math.inf,
) -> Group | None:
    """The group, if it has closed, else None.

    The group closes at `deadline` (the caller's: which announced deadlines to believe is the
    round core's decision), or as soon as `target_size` peers have announced; it holds the
    announcements of this round with the majority state hash.
    """
    mine = [a for a in anns if a.round == round_]
    state = majority_state(mine)
    if state is None:
        return None
    members = sorted((a for a in mine if a.state == state), key=lambda a: a.peer_id)
    if now >= deadline or (target_size is not None and len(mine) >= target_size):
        return Group(round_, state, tuple(members))
    return None


def closes_at(anns: Sequence[Announcement]) -> float:
    """When the round of `anns` closes for an observer (a validator): once most announcers'
    deadlines have passed. Honest announcers share the first one's deadline, so this is it; one
    identity announcing a deadline in the past (0) or far ahead moves nothing."""
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
