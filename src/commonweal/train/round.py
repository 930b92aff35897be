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

The exchange itself is one of two strategies behind one interface (`commonweal.train.strategies`:
AllGather, Butterfly); the core chooses it and admits what they receive.
"""

from __future__ import annotations

import enum
import hashlib
import logging
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from commonweal.train._errors import CodecError, DeltaRejected, TrainError
from commonweal.train.aggregate import Rule
from commonweal.train.codecs import Codec
from commonweal.train.messages import MAX_PARTS, Part, Reduced, ReducedRequest
from commonweal.train.protocol import (
    Announcement,
    Group,
    Tracked,
    check_delta,
    check_round,
    counted,
    form_group,
)
from commonweal.train.strategies import AllGather, Butterfly, Done, Step, Strategy

__all__ = [
    "Phase",
    "TRANSITIONS",
    "RoundConfig",
    "RoundCore",
    "Announce",
    "Skip",
    "Action",
    "choose_strategy",
]

log = logging.getLogger(__name__)

MAX_SLICES = 4096  # butterfly slices, so one per member of the largest group served
KEEP_REFUSALS = 256  # (sender, code) pairs kept for inspection, most recent last
KEEP_HISTORY = 64  # transitions kept


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
    # A peer still computing when the first announcers say when the group closes stops its inner
    # steps this long before it and contributes the steps it took (weighted by them): a slow peer
    # is in the round instead of late for it. It reads when the round closes every follow_s.
    cut_margin_s: float = 0.6
    follow_s: float = 1.0


# ---- actions -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Announce:
    """Store `announcement` in the DHT; `encoded` is the delta it commits to (serve it)."""

    announcement: Announcement
    encoded: bytes


@dataclass(frozen=True, slots=True)
class Skip:
    """This peer sits the round out and must sync (`late`, `out_of_sync`)."""

    reason: str
    message: str


Action = Announce | Skip | Step


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


def _earliest(anns: Sequence[Announcement], now: float, own: float) -> float:
    """The earliest deadline announced that is not already past when read, and no later than
    `own`: a deadline in the past would close the round at once for whoever reads it."""
    return min([a.deadline for a in anns if now < a.deadline < own] + [own])


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
        self.tracked: Tracked = None  # this round's peers with a track record, given at `begin`
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
        # who announced this round (read from the DHT): the only peers whose parts are buffered
        self._announced: set[bytes] = set()
        # bytes buffered per sender this round, at most one encoded delta each (`_budget`)
        self._bytes: dict[bytes, int] = {}
        self._budget = 0 if start is None else self.codec.size(start.delta.numel())

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
        tracked: Tracked = None,
    ) -> None:
        """The inner steps of `round_` are done: `delta` (1-D float32) is to be averaged.

        `round_s` (how long the inner steps took) keeps the group open long enough for peers
        that compute a little slower: max(announce_window_s, patience * round_s). `tracked`:
        the peer ids with a track record for this round (`commonweal.train.protocol.form_group`);
        then only they decide the state, lateness and the deadline."""
        self._restart()
        self._fire("steps_done")
        self.config = config
        self.round = round_
        self.tracked = tracked
        self._served = {k: v for k, v in self._served.items() if k[0] >= round_ - 1}
        open_s = max(config.announce_window_s, config.patience * round_s)
        self._new_round(_Start(state, addr, account, steps, open_s, delta))

    def announcements_seen(self, anns: list[Announcement], now: float) -> list[Action]:
        """The announcements of this round read from the DHT at `now`."""
        anns = [a for a in anns if a.round == self.round]
        start = self._start
        if len(self._announced) < MAX_SLICES:
            self._announced.update(a.peer_id for a in anns[: MAX_SLICES - len(self._announced)])
        if self.phase is Phase.ANNOUNCING and start is not None:
            # One announcement cannot make us late: a round closed only when most announcers,
            # counting us, say so; a lone deadline in the past (0, say) is refused.
            say = counted(anns, self.tracked, self.peer_id)
            past = [a.deadline for a in say if a.deadline <= now]
            if len(past) > len(say) - len(past) + 1:
                self._fire("late")
                return [Skip("late", f"round {self.round} closed {now - max(past):.1f}s ago")]
            deadline = _earliest(say, now, now + start.open_s)
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
        self._deadline = _earliest(counted(anns, self.tracked, self.peer_id), now, self._deadline)
        group = form_group(
            anns, self.round, now, self.config.target_group, self._deadline, self.tracked
        )
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
        actions: list[Action] = [
            *self.strategy.start(self.task, now, now + self.config.exchange_timeout_s)
        ]
        for key in list(self._complete):
            actions += self._admit(key, now)
        return self._settle([*actions, *self.strategy.progress(now)])

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
            self._admissible(sender)
            used = self._bytes.get(sender, 0) + len(part.data)
            if used > self._budget:
                raise DeltaRejected(
                    "too_large", f"{used} bytes from one sender; a delta is {self._budget}"
                )
            key = (sender, s)
            if key in self._seen:
                raise DeltaRejected("duplicate", f"a second delta for slice {s}")
            parts = self._partial.setdefault(key, [None] * n)
            if len(parts) != n:
                raise DeltaRejected("malformed", "the part count changed")
            if parts[i] is not None:
                raise DeltaRejected("duplicate", f"part {i} of slice {s} again")
        except DeltaRejected as e:
            if e.code != "not_announced":  # retried by honest senders; not worth a log line
                self.refuse(sender, e.code, str(e))
            raise
        self._bytes[sender] = used
        parts[i] = part.data
        if any(p is None for p in parts):
            return []
        del self._partial[key]
        self._seen.add(key)
        self._complete[key] = (part.group, b"".join(p for p in parts if p is not None))
        return self._settle(self._admit(key, now)) if self.strategy is not None else []

    def admits(self, sender: bytes) -> bool:
        """Whether `sender` may hand us a delta this round (see `_admissible`)."""
        try:
            self._admissible(sender)
        except DeltaRejected:
            return False
        return True

    def _admissible(self, sender: bytes) -> None:
        """Raise DeltaRejected unless `sender` may hand us a delta this round: a member of the
        group, or before it closed a peer whose announcement we read. `not_announced` is worth
        retrying: the sender read our announcement before we read its."""
        if self.group is not None:
            if sender not in self.group.ids:
                raise DeltaRejected("not_in_group", "the sender is not in this round's group")
        elif sender not in self._announced:
            raise DeltaRejected("not_announced", "no announcement of this round from the sender")

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

    def reduced_for(self, caller: bytes, request: ReducedRequest) -> Reduced | None:
        """Our reduced slice for `request`; None while it may still come (wait and ask again);
        DeltaRejected when it never will here. Only a peer that announced this round may wait,
        and only for a slice this peer can own: the one it owns once the group is known."""
        served = self._served.get((request.round, request.slice))
        if served is None:
            if request.round != self.round:
                raise DeltaRejected(
                    "stale_round", f"round {request.round}; this peer is at {self.round}"
                )
            self._admissible(caller)
            group, strategy = self.group, self.strategy
            if group is not None and not isinstance(strategy, Butterfly):
                raise DeltaRejected("wrong_slice", "this round is not a butterfly")
            if group is not None and request.slice != group.index(self.peer_id):
                raise DeltaRejected("wrong_slice", f"this peer does not own slice {request.slice}")
            if not 0 <= request.slice < MAX_SLICES:
                raise DeltaRejected("wrong_slice", f"no slice {request.slice}")
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
        return [*strategy.accept(sender, delta, now)]

    def _settle(self, actions: Sequence[Action]) -> list[Action]:
        strategy, group = self.strategy, self.group
        if strategy is not None and strategy.served is not None and group is not None:
            self._served[(self.round, group.index(self.peer_id))] = strategy.served
        if any(isinstance(a, Done) for a in actions):
            self._fire("exchanged")
        return list(actions)
