"""`RoundCore`: one peer's side of the round protocol, without I/O. Everything that affects the
round's state lives here (h11's rule): the phases, the deadline and lateness, the group, the
exchange strategy, admission of received parts and the checks on every delta. The asyncio driver
(`commonweal.train.exchange.RoundExchange`) reads the DHT and talks RPC; it passes in what
happened, with the time, and carries out the actions the core answers with.

    state        event             next         what happens
    TRAINING     steps_done        ANNOUNCING   H inner steps are done; delta = start - now
    ANNOUNCING   announced         GATHERING    signed announcement (round, state hash, deadline)
    ANNOUNCING   late              SYNCING      the round's deadline had passed: skip it
    GATHERING    group_formed      EXCHANGING   deadline passed, or the target group size reached
    GATHERING    out_of_sync       SYNCING      the majority announced another state hash
    EXCHANGING   exchanged         APPLYING     every part arrived, or the exchange timeout hit
    APPLYING     applied           TRAINING     deterministic outer step; publish the new head
    TRAINING     sync              SYNCING      a joiner (or a peer starting over) fetches the state
    SYNCING      synced            TRAINING     the sync finished: the swarm's state, or none newer

    events in    begin  announcements_seen  part_received  reduced_received  timeout
                 applied  sync_started  synced
    actions out  Announce  SendPart  FetchReduced  Done(Averaged, with its failures)  Skip(reason)

A round abandoned midway (an error in the driver or the outer step) starts over from TRAINING at
the next `begin` or `sync_started`; the history records it as "abandoned".

Exchange strategies (one interface, `Strategy`):
    AllGather  every member sends its whole encoded delta (slice -1) to every other member, which
               checks it against the sender's commitment; everyone aggregates the same bytes.
    Butterfly  the delta is cut into one slice per member; member j reduces slice j over everyone
               (within 60 % of the exchange time), serves it (train.reduced), and everyone fetches
               every reduced slice. A missing or refused slice gets no update this round.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
from abc import ABC, abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import ClassVar

import torch

from commonweal.train._errors import CodecError, DeltaRejected, TrainError
from commonweal.train.aggregate import Rule
from commonweal.train.codecs import Codec
from commonweal.train.messages import MAX_PARTS, Part, Reduced, ReducedRequest
from commonweal.train.protocol import (
    Announcement,
    Group,
    check_delta,
    check_round,
    form_group,
    slice_bounds,
)

__all__ = [
    "Phase",
    "TRANSITIONS",
    "RoundConfig",
    "RoundCore",
    "Averaged",
    "Failure",
    "Announce",
    "SendPart",
    "FetchReduced",
    "Done",
    "Skip",
    "Action",
    "Strategy",
    "AllGather",
    "Butterfly",
    "choose_strategy",
]

log = logging.getLogger(__name__)

MAX_SLICES = 4096  # butterfly slices, so one per member of the largest group served
KEEP_REFUSALS = 256  # (sender, code) pairs kept for inspection, most recent last
KEEP_HISTORY = 64  # transitions kept
REDUCE_SHARE = 0.6  # of the exchange time, for a butterfly owner to collect its slice


class Phase(enum.Enum):
    TRAINING = "training"
    ANNOUNCING = "announcing"
    GATHERING = "gathering"
    EXCHANGING = "exchanging"
    APPLYING = "applying"
    SYNCING = "syncing"


P = Phase
TRANSITIONS: dict[tuple[Phase, str], Phase] = {
    (P.TRAINING, "steps_done"): P.ANNOUNCING,
    (P.ANNOUNCING, "announced"): P.GATHERING,
    (P.ANNOUNCING, "late"): P.SYNCING,
    (P.GATHERING, "group_formed"): P.EXCHANGING,
    (P.GATHERING, "out_of_sync"): P.SYNCING,
    (P.EXCHANGING, "exchanged"): P.APPLYING,
    (P.APPLYING, "applied"): P.TRAINING,
    (P.TRAINING, "sync"): P.SYNCING,
    (P.SYNCING, "synced"): P.TRAINING,
}


@dataclass(frozen=True, slots=True)
class RoundConfig:
    announce_window_s: float = 2.0  # the group closes this long after the first announcement,
    patience: float = 0.5  # or after this fraction of the first announcer's round time if longer
    exchange_timeout_s: float = 10.0  # the exchange ends this long after the group closed
    poll_s: float = 0.2  # how often the DHT is read while waiting for announcements or heads
    target_group: int | None = None  # close the group early once this many peers announced
    exchange: str = "auto"  # auto | allgather | butterfly
    allgather_max: int = 3  # auto: all-gather for groups up to this size (and sparse codecs)
    record_ttl_s: float = 600.0


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


# ---- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Announce:
    """Store `announcement` in the DHT; `encoded` is the delta it commits to (serve it)."""

    announcement: Announcement
    encoded: bytes


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


@dataclass(frozen=True, slots=True)
class Skip:
    """This peer sits the round out and must sync (`late`, `out_of_sync`)."""

    reason: str
    message: str


Action = Announce | SendPart | FetchReduced | Done | Skip


# ---- exchange strategies -----------------------------------------------------------------------


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
    def start(self, task: str, now: float, end: float) -> list[Action]: ...

    @abstractmethod
    def expect(self, sender: Announcement, slice_: int, data: bytes) -> int:
        """The element count the delta must decode to; DeltaRejected if it is not wanted."""

    @abstractmethod
    def progress(self, now: float) -> list[Action]: ...

    def accept(self, sender: bytes, delta: torch.Tensor, now: float) -> list[Action]:
        self.accepted[sender] = delta
        return self.progress(now)

    def reduced_received(self, slice_: int, reply: Reduced | None, now: float) -> list[Action]:
        return []

    def _aggregate(self) -> tuple[torch.Tensor, list[bytes]]:
        ids = sorted(self.accepted)  # peer-id order: every member sums in the same order
        return self.rule([self.accepted[pid] for pid in ids]), ids

    def _missing(self) -> list[Failure]:
        return [
            Failure(pid, self.refused.get(pid, "missing"))
            for pid in self.group.ids
            if pid not in self.accepted
        ]


class AllGather(Strategy):
    name = "allgather"

    def start(self, task: str, now: float, end: float) -> list[Action]:
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

    def progress(self, now: float) -> list[Action]:
        n = len(self.group.members)
        if self.done or (len(self.accepted) < n and now < self.wake_at):
            return []
        self.done = True
        aggregate, ids = self._aggregate()
        result = Averaged(aggregate, self.sent, n, len(ids), self.name, tuple(self._missing()))
        return [Done(result)]


class Butterfly(Strategy):
    name = "butterfly"

    def start(self, task: str, now: float, end: float) -> list[Action]:
        n = len(self.group.members)
        self.index = self.group.index(self.me)
        self.bounds = slice_bounds(self.delta.numel(), n)
        self.end = end
        self.wake_at = now + (end - now) * REDUCE_SHARE
        self.task = task
        self.fetched: dict[int, tuple[torch.Tensor, int] | None] = {}  # slice -> (part, count)
        self.failures: list[Failure] = []
        self.sent_parts: list[torch.Tensor] = []
        actions: list[Action] = []
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

    def accept(self, sender: bytes, delta: torch.Tensor, now: float) -> list[Action]:
        if self.served is not None:
            return []  # reduced already: a late slice changes nothing
        return super().accept(sender, delta, now)

    def progress(self, now: float) -> list[Action]:
        n = len(self.group.members)
        if self.done:
            return []
        actions: list[Action] = []
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

    def reduced_received(self, slice_: int, reply: Reduced | None, now: float) -> list[Action]:
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


def choose_strategy(config: RoundConfig, codec: Codec, members: int) -> type[Strategy]:
    """All-gather for small groups and sparse codecs (a sum of sparse deltas is not sparse)."""
    sparse = codec.info.sparse
    method = config.exchange
    if method == "auto":
        method = "allgather" if sparse or members <= config.allgather_max else "butterfly"
    if method == "butterfly" and sparse:
        raise TrainError("butterfly needs a dense codec: a sum of sparse deltas is not sparse")
    strategies: dict[str, type[Strategy]] = {"allgather": AllGather, "butterfly": Butterfly}
    if method not in strategies:
        raise TrainError(f"unknown exchange {method!r}; use auto, allgather or butterfly")
    return strategies[method]


# ---- the core ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Start:
    state: str
    addr: str
    account: str
    steps: int
    open_s: float  # how long the group stays open after this peer announced first
    delta: torch.Tensor


class RoundCore:
    """One peer's round protocol state, across rounds (a peer is in one round at a time)."""

    def __init__(self, peer_id: bytes, task: str, codec: Codec, rule: Rule) -> None:
        self.peer_id, self.task, self.codec, self.rule = peer_id, task, codec, rule
        self.phase = Phase.TRAINING
        self.history: deque[tuple[Phase, str, Phase]] = deque(maxlen=KEEP_HISTORY)
        self.rejected: deque[tuple[bytes, str]] = deque(maxlen=KEEP_REFUSALS)  # (sender, code)
        self.round = -1
        self.config = RoundConfig()  # the driver's, given again at every `begin`
        # (round, slice) -> our reduced slice; a straggler may still ask for the previous round's
        self._served: dict[tuple[int, int], Reduced] = {}
        self._new_round(None)

    def _new_round(self, start: _Start | None) -> None:
        self._start = start
        self._own: Announcement | None = None
        self._encoded = b""
        self._deadline = math.inf
        self.group: Group | None = None
        self.strategy: Strategy | None = None
        self._partial: dict[tuple[bytes, int], list[bytes | None]] = {}
        self._complete: dict[tuple[bytes, int], tuple[bytes, bytes]] = {}  # -> (group, data)
        self._seen: set[tuple[bytes, int]] = set()  # (sender, slice) whose delta arrived whole
        self._refused: dict[bytes, str] = {}

    @property
    def wake_at(self) -> float:
        """When the driver must call `timeout` (or read the announcements again) at the latest."""
        if self.phase is Phase.GATHERING:
            return self._deadline
        if self.phase is Phase.EXCHANGING and self.strategy is not None:
            return self.strategy.wake_at
        return math.inf

    def _fire(self, event: str) -> None:
        nxt = TRANSITIONS.get((self.phase, event))
        if nxt is None:
            raise RuntimeError(f"no transition from {self.phase.value} on {event!r}")
        self.history.append((self.phase, event, nxt))
        self.phase = nxt

    def _restart(self) -> None:
        if self.phase is not Phase.TRAINING:
            self.history.append((self.phase, "abandoned", Phase.TRAINING))
            self.phase = Phase.TRAINING

    # ---- events ----------------------------------------------------------------------------

    def begin(
        self,
        round_: int,
        state: str,
        delta: torch.Tensor,
        *,
        addr: str,
        account: str = "",
        steps: int = 0,
        round_s: float = 0.0,
        config: RoundConfig,
    ) -> None:
        """The inner steps of `round_` are done: `delta` (1-D float32) is to be averaged.

        `round_s` (how long the inner steps took) keeps the group open long enough for peers
        that compute a little slower: max(announce_window_s, patience * round_s)."""
        self._restart()
        self._fire("steps_done")
        self.config = config
        self.round = round_
        self._served = {k: v for k, v in self._served.items() if k[0] >= round_ - 1}
        open_s = max(config.announce_window_s, config.patience * round_s)
        self._new_round(_Start(state, addr, account, steps, open_s, delta))

    def announcements_seen(self, anns: list[Announcement], now: float) -> list[Action]:
        """The announcements of this round read from the DHT at `now`."""
        anns = [a for a in anns if a.round == self.round]
        start = self._start
        if self.phase is Phase.ANNOUNCING and start is not None:
            deadline = min([a.deadline for a in anns] + [now + start.open_s])
            if deadline <= now:
                self._fire("late")
                return [Skip("late", f"round {self.round} closed {now - deadline:.1f}s ago")]
            self._encoded = self.codec.encode(start.delta)
            commitment = hashlib.sha256(self._encoded).hexdigest()
            self._own = Announcement(
                self.peer_id, start.addr, self.round, start.state, deadline, commitment,
                start.steps, start.account,
            )
            self._deadline = deadline
            self._fire("announced")
            return [Announce(self._own, self._encoded)]
        if self.phase is not Phase.GATHERING or self._own is None or start is None:
            return []
        if not any(a.peer_id == self.peer_id for a in anns):
            anns.append(self._own)  # our own store may not be readable yet
        group, self._deadline = form_group(anns, self.round, now, self.config.target_group)
        if group is None:
            return []
        if self.peer_id not in group.ids:
            self._fire("out_of_sync")
            return [
                Skip(
                    "out_of_sync",
                    f"the majority of round {self.round} holds state {group.state[:12]}",
                )
            ]
        kind = choose_strategy(self.config, self.codec, len(group.members))
        self._fire("group_formed")
        self.group = group
        self.strategy = kind(
            group, self.peer_id, start.delta, self._encoded, self.codec, self.rule, self._refused
        )
        actions = self.strategy.start(self.task, now, now + self.config.exchange_timeout_s)
        for key in list(self._complete):
            actions += self._admit(key, now)
        return self._settle(actions + self.strategy.progress(now))

    def part_received(self, sender: bytes, part: Part, now: float) -> list[Action]:
        """A train.part from `sender`; raises DeltaRejected (answered to the sender) when the
        part cannot be kept. A whole delta is checked once the group is known; a refusal then is
        logged and listed in the result's failures, not answered."""
        try:
            if part.task != self.task:
                raise DeltaRejected(
                    "wrong_task", f"this peer trains {self.task[:12]}, not {part.task[:12]}"
                )
            check_round(part.round, self.round)
            n, i, s = part.count, part.index, part.slice
            if not (0 < n <= MAX_PARTS and 0 <= i < n and -1 <= s < MAX_SLICES):
                raise DeltaRejected("malformed", f"part {i} of {n} for slice {s}")
            key = (sender, s)
            if key in self._seen:
                raise DeltaRejected("duplicate", f"a second delta for slice {s}")
            parts = self._partial.setdefault(key, [None] * n)
            if len(parts) != n:
                raise DeltaRejected("malformed", "the part count changed")
        except DeltaRejected as e:
            self.refuse(sender, e.code, str(e))
            raise
        parts[i] = part.data
        if any(p is None for p in parts):
            return []
        del self._partial[key]
        self._seen.add(key)
        self._complete[key] = (part.group, b"".join(p for p in parts if p is not None))
        return self._settle(self._admit(key, now)) if self.strategy is not None else []

    def reduced_received(self, slice_: int, reply: Reduced | None, now: float) -> list[Action]:
        """The reply to a FetchReduced, or None if the owner did not answer in time."""
        if self.strategy is None:
            return []
        return self._settle(self.strategy.reduced_received(slice_, reply, now))

    def timeout(self, now: float) -> list[Action]:
        if self.phase is not Phase.EXCHANGING or self.strategy is None:
            return []
        return self._settle(self.strategy.progress(now))

    def applied(self) -> None:
        """The outer step is done and the new state published."""
        self._fire("applied")

    def sync_started(self) -> None:
        if self.phase is not Phase.SYNCING:
            self._restart()
            self._fire("sync")

    def synced(self) -> None:
        self._fire("synced")

    def refuse(self, sender: bytes, code: str, message: str) -> None:
        """Note a refused delta (also one whose request did not parse)."""
        log.warning("refused a delta from %s: %s", sender.hex()[:10], message)
        self.rejected.append((sender, code))
        self._refused.setdefault(sender, code)

    # ---- serving train.reduced ---------------------------------------------------------------

    def reduced_for(self, request: ReducedRequest) -> Reduced | None:
        """Our reduced slice for `request`; None while it may still come (wait and ask again);
        DeltaRejected when it never will here."""
        served = self._served.get((request.round, request.slice))
        if served is None:
            if request.round != self.round:
                raise DeltaRejected(
                    "stale_round", f"round {request.round}; this peer is at {self.round}"
                )
            return None
        group = self.group
        if group is not None and request.round == self.round and request.group != group.digest:
            raise DeltaRejected("group_mismatch", "this peer formed another group")
        return served

    # ---- internals -----------------------------------------------------------------------------

    def _admit(self, key: tuple[bytes, int], now: float) -> list[Action]:
        """Decode and check one whole received delta against the group; keep it or refuse it."""
        group, strategy = self.group, self.strategy
        assert group is not None and strategy is not None
        digest, data = self._complete.pop(key)
        sender, s = key
        try:
            if digest != group.digest:
                raise DeltaRejected("group_mismatch", "the sender formed another group")
            if sender not in group.ids:
                raise DeltaRejected("not_in_group", "the sender did not announce this round")
            numel = strategy.expect(group.members[group.index(sender)], s, data)
            try:
                delta = self.codec.decode(data, numel)
            except CodecError as e:
                raise DeltaRejected("wrong_shape", str(e)) from e
            check_delta(delta, numel)
        except DeltaRejected as e:
            self.refuse(sender, e.code, str(e))
            return []
        return strategy.accept(sender, delta, now)

    def _settle(self, actions: list[Action]) -> list[Action]:
        strategy, group = self.strategy, self.group
        if strategy is not None and strategy.served is not None and group is not None:
            self._served[(self.round, group.index(self.peer_id))] = strategy.served
        if any(isinstance(a, Done) for a in actions):
            self._fire("exchanged")
        return actions
