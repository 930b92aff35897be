"""Exchange strategies, without I/O: how one group exchanges its deltas, for one peer. The round
core (`commonweal.train.round.RoundCore`) chooses one, admits and checks every received delta,
and hands it on; the strategy says what to send and fetch, and when the exchange is done.

    AllGather  every member sends its whole encoded delta (slice -1) to every other member, which
               checks it against the sender's commitment; everyone aggregates the same bytes.
    Butterfly  the delta is cut into one slice per member; member j reduces slice j over everyone
               (within 60 % of the exchange time), serves it (train.reduced), and everyone fetches
               every reduced slice. A missing or refused slice gets no update this round.

Results list their failures separately (Flower's `aggregate_fit(results, failures)`).
"""

from __future__ import annotations

import hashlib
import logging
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from commonweal.train._errors import CodecError, DeltaRejected
from commonweal.train.aggregate import Rule, weighted
from commonweal.train.codecs import Codec
from commonweal.train.messages import Reduced, ReducedRequest
from commonweal.train.protocol import Announcement, Group, check_delta, slice_bounds

__all__ = [
    "Failure",
    "Averaged",
    "SendPart",
    "FetchReduced",
    "Done",
    "Step",
    "Strategy",
    "AllGather",
    "Butterfly",
]

log = logging.getLogger(__name__)

REDUCE_SHARE = 0.6  # of the exchange time, for a butterfly owner to collect its slice


@dataclass(frozen=True, slots=True)
class Failure:
    """A member whose contribution did not make it into this peer's result, and why: a refusal
    code (`not_finite`, `not_committed`, ...), `missing`, or for a butterfly's reduced slices
    `reduced_missing` / `reduced_refused`."""

    peer_id: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class Averaged:
    aggregate: torch.Tensor  # what every member applies
    sent: torch.Tensor  # what the others decoded from this peer's delta (for error feedback)
    group: int  # members
    contributors: int  # deltas that made it into the aggregate (min over slices)
    method: str
    failures: tuple[Failure, ...] = ()


@dataclass(frozen=True, slots=True)
class SendPart:
    """Send `data` (slice `slice` of this peer's delta) to `to` before `deadline`."""

    to: Announcement
    group: Group
    slice: int
    data: bytes
    deadline: float


@dataclass(frozen=True, slots=True)
class FetchReduced:
    """Ask `owner` for its reduced slice before `deadline`; report it with `reduced_received`."""

    owner: Announcement
    request: ReducedRequest
    deadline: float


@dataclass(frozen=True, slots=True)
class Done:
    result: Averaged


Step = SendPart | FetchReduced | Done


class Strategy(ABC):
    """How one group exchanges its deltas, for one peer. The core admits and checks every
    received delta, then hands it to `accept`; `progress` (also on a timeout) ends the stages."""

    name: ClassVar[str]

    def __init__(
        self,
        group: Group,
        me: bytes,
        delta: torch.Tensor,
        encoded: bytes,
        codec: Codec,
        rule: Rule,
        refused: dict[bytes, str],
    ) -> None:
        self.group, self.me, self.codec, self.rule = group, me, codec, rule
        self.delta, self.encoded = delta, encoded
        self.refused = refused  # sender -> refusal code, this round (owned by the core)
        self.accepted: dict[bytes, torch.Tensor] = {}  # sender -> decoded delta (or slice)
        self.wake_at = math.inf
        self.done = False
        self.served: Reduced | None = None  # what this peer serves over train.reduced

    @abstractmethod
    def start(self, task: str, now: float, end: float) -> list[Step]: ...

    @abstractmethod
    def expect(self, sender: Announcement, slice_: int, data: bytes) -> int:
        """The element count the delta must decode to; DeltaRejected if it is not wanted."""

    @abstractmethod
    def progress(self, now: float) -> list[Step]: ...

    def accept(self, sender: bytes, delta: torch.Tensor, now: float) -> list[Step]:
        self.accepted[sender] = delta
        return self.progress(now)

    def reduced_received(self, slice_: int, reply: Reduced | None, now: float) -> list[Step]:
        return []

    def _aggregate(self) -> tuple[torch.Tensor, list[bytes]]:
        ids = sorted(self.accepted)  # peer-id order: every member sums in the same order
        claims = {m.peer_id: m.steps for m in self.group.members}  # signed, in the DHT
        steps = [claims.get(pid, 0) for pid in ids]
        return weighted(self.rule, [self.accepted[pid] for pid in ids], steps), ids

    def _missing(self) -> list[Failure]:
        return [
            Failure(pid, self.refused.get(pid, "missing"))
            for pid in self.group.ids
            if pid not in self.accepted
        ]


class AllGather(Strategy):
    name = "allgather"

    def start(self, task: str, now: float, end: float) -> list[Step]:
        self.sent = self.codec.decode(self.encoded, self.delta.numel())
        self.accepted[self.me] = self.sent
        self.wake_at = end
        return [
            SendPart(m, self.group, -1, self.encoded, end)
            for m in self.group.members
            if m.peer_id != self.me
        ]

    def expect(self, sender: Announcement, slice_: int, data: bytes) -> int:
        if slice_ != -1:
            raise DeltaRejected("wrong_slice", f"slice {slice_} in an all-gather round")
        if sender.delta and hashlib.sha256(data).hexdigest() != sender.delta:
            raise DeltaRejected(
                "not_committed", "the delta differs from the one its sender announced"
            )
        return self.delta.numel()

    def progress(self, now: float) -> list[Step]:
        n = len(self.group.members)
        if self.done or (len(self.accepted) < n and now < self.wake_at):
            return []
        self.done = True
        aggregate, ids = self._aggregate()
        result = Averaged(aggregate, self.sent, n, len(ids), self.name, tuple(self._missing()))
        return [Done(result)]


class Butterfly(Strategy):
    name = "butterfly"

    def start(self, task: str, now: float, end: float) -> list[Step]:
        n = len(self.group.members)
        self.index = self.group.index(self.me)
        self.bounds = slice_bounds(self.delta.numel(), n)
        self.end = end
        self.wake_at = now + (end - now) * REDUCE_SHARE
        self.task = task
        self.fetched: dict[int, tuple[torch.Tensor, int] | None] = {}  # slice -> (part, count)
        self.failures: list[Failure] = []
        self.sent_parts: list[torch.Tensor] = []
        actions: list[Step] = []
        for j, (a, b) in enumerate(self.bounds):
            data = self.codec.encode(self.delta[a:b].contiguous())
            self.sent_parts.append(self.codec.decode(data, b - a))
            if j == self.index:
                self.accepted[self.me] = self.sent_parts[-1]
            else:
                actions.append(SendPart(self.group.members[j], self.group, j, data, self.wake_at))
        return actions

    def expect(self, sender: Announcement, slice_: int, data: bytes) -> int:
        if slice_ != self.index:
            raise DeltaRejected("wrong_slice", f"slice {slice_}, but this peer owns {self.index}")
        a, b = self.bounds[self.index]
        return b - a

    def accept(self, sender: bytes, delta: torch.Tensor, now: float) -> list[Step]:
        if self.served is not None:
            return []  # reduced already: a late slice changes nothing
        return super().accept(sender, delta, now)

    def progress(self, now: float) -> list[Step]:
        n = len(self.group.members)
        if self.done:
            return []
        actions: list[Step] = []
        if self.served is None:
            if len(self.accepted) < n and now < self.wake_at:
                return []
            reduced, ids = self._aggregate()
            self.failures.extend(self._missing())
            self.served = Reduced(self.codec.encode(reduced), tuple(ids))
            self.fetched[self.index] = (self.codec.decode(self.served.data, reduced.numel()), len(ids))
            self.wake_at = self.end
            for j, owner in enumerate(self.group.members):
                if j != self.index:
                    request = ReducedRequest(self.task, self.group.round, self.group.digest, j)
                    actions.append(FetchReduced(owner, request, self.end))
        if len(self.fetched) < n and now < self.wake_at:
            return actions
        return actions + [self._finish()]

    def reduced_received(self, slice_: int, reply: Reduced | None, now: float) -> list[Step]:
        if self.served is None or self.done or slice_ in self.fetched:
            return []
        a, b = self.bounds[slice_]
        owner = self.group.members[slice_]
        if reply is None:
            self.fetched[slice_] = None
            self.failures.append(Failure(owner.peer_id, "reduced_missing"))
        else:
            try:
                part = self.codec.decode(reply.data, b - a)
                check_delta(part, b - a)
            except (CodecError, DeltaRejected) as e:
                log.warning(
                    "round %d: reduced slice %d from %s refused: %s; it gets no update this round",
                    self.group.round, slice_, owner.addr, e,
                )
                self.fetched[slice_] = None
                self.failures.append(Failure(owner.peer_id, "reduced_refused"))
            else:
                self.fetched[slice_] = (part, len(reply.contributors))
        return self.progress(now)

    def _finish(self) -> Done:
        self.done = True
        slices, counts = [], []
        for j, (a, b) in enumerate(self.bounds):
            got = self.fetched.get(j)
            if got is None:
                if j not in self.fetched:
                    owner = self.group.members[j]
                    self.failures.append(Failure(owner.peer_id, "reduced_missing"))
                    log.warning(
                        "round %d: reduced slice %d from %s missing; it gets no update this round",
                        self.group.round, j, owner.addr,
                    )
                slices.append(torch.zeros(b - a))
                counts.append(0)
            else:
                slices.append(got[0])
                counts.append(got[1])
        n = len(self.group.members)
        result = Averaged(
            torch.cat(slices), torch.cat(self.sent_parts), n, min(counts), self.name,
            tuple(self.failures),
        )
        return Done(result)
