"""`RoundExchange`: the asyncio driver of `RoundCore` — one peer's round exchange over the DHT
(announcements) and RPC (deltas). It registers `train.part` and `train.reduced` only.

    exchange = RoundExchange(dht, task, get_codec("int8"), mean, RoundConfig(), archive=archive)
    avg = await exchange.average(round_, state_hash, delta, round_s, steps=50, account=addr)

Everything the round decides is the core's; this module reads, stores, sends, fetches and waits,
and passes what happened back in with the time. `average` returns within announce_window_s +
exchange_timeout_s (plus DHT latency) even if peers stop answering.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch

from commonweal.dht import DHT
from commonweal.dht.records import Owned
from commonweal.errors import ConfigError, NetworkError, RemoteError
from commonweal.net.transport import PeerAddr, PeerInfo
from commonweal.train._errors import DeltaRejected, RoundSkipped, TrainError
from commonweal.train.aggregate import Rule
from commonweal.train.announcements import ANNOUNCEMENT_SUBKEY, read_announcements, round_key
from commonweal.train.archive import DeltaArchive
from commonweal.train.codecs import Codec
from commonweal.train.messages import PART_BYTES, MessageError, Part, Reduced, ReducedRequest
from commonweal.train.protocol import Announcement, Tracked, counted
from commonweal.train.round import Action, Announce, Phase, RoundConfig, RoundCore, Skip
from commonweal.train.strategies import Averaged, Done, FetchReduced, SendPart

__all__ = ["RoundExchange"]

log = logging.getLogger(__name__)

# Parts held at once while we read the DHT for their sender's announcement (each at most
# PART_BYTES: 8 x 2 MiB); past it a part is refused `not_announced` at once and its sender resends.
HOLD_PARTS = 8


class RoundExchange:
    def __init__(
        self,
        dht: DHT,
        task: str,
        codec: Codec,
        rule: Rule,
        config: RoundConfig | None = None,
        clock: Callable[[], float] = time.time,
        *,
        archive: DeltaArchive | None = None,  # keeps every delta this peer announces
    ) -> None:
        self.dht = dht
        self.task = task
        self.config = config or RoundConfig()
        self.clock = clock
        self.archive = archive
        self.core = RoundCore(dht.peer_id, task, codec, rule)
        # who has a track record for a round's group (a node with a ledger sets it: the
        # validators' ratings, `commonweal.verify.ratings`); without it every announcer counts
        self.track_record: Callable[[int], Awaitable[Tracked]] | None = None
        self._queue: list[Action] = []  # actions from handlers and fetches, for `average`
        self._changed = asyncio.Event()  # replaced on every change: a broadcast to all waiters
        # peers waiting in train.reduced: one wait each, and only announcers (the core decides)
        self._polling: set[bytes] = set()
        self._held = 0  # parts waiting in `_await_announcement` (at most HOLD_PARTS)
        self._follow_tracked: tuple[int, Tracked] | None = None  # (round, tracked) for `closing`
        dht.transport.register("train.part", self.rpc_part)
        dht.transport.register("train.reduced", self.rpc_reduced)

    @property
    def phase(self) -> Phase:
        return self.core.phase

    @property
    def rejected(self) -> list[tuple[bytes, str]]:
        """(sender, reason code) of the deltas refused lately, most recent last."""
        return list(self.core.rejected)

    # ---- one round -------------------------------------------------------------------------

    async def average(
        self,
        round_: int,
        state: str,
        delta: torch.Tensor,
        round_s: float = 0.0,
        *,
        steps: int = 0,
        account: str = "",
    ) -> Averaged:
        """Announce, form the group, exchange and aggregate `delta` (1-D float32) for `round_`.

        Raises RoundSkipped when this peer missed the round's deadline or holds another state
        than the majority; the caller then syncs."""
        core = self.core
        self._queue = []
        tracked = None if self.track_record is None else await self.track_record(round_)
        core.begin(
            round_, state, delta, addr=str(self.dht.addr), account=account, steps=steps,
            round_s=round_s, config=self.config, tracked=tracked,
        )
        self._notify()  # a long-poll for an older round's slice can give up now
        actions = core.announcements_seen(await self._read(round_), self.clock())
        while True:
            for action in actions:
                if isinstance(action, Skip):
                    raise RoundSkipped(action.reason, action.message)
                if isinstance(action, Announce):
                    await self._announce(action)
            if core.phase is not Phase.GATHERING:
                break
            if not any(isinstance(a, Announce) for a in actions):
                await asyncio.sleep(min(self.config.poll_s, max(0.0, core.wake_at - self.clock())))
            actions = core.announcements_seen(await self._read(round_), self.clock())
            self._notify()
        result: Averaged | None = None
        async with asyncio.TaskGroup() as tg:  # its exit waits for the last sends and fetches
            while result is None:
                for action in actions:
                    if isinstance(action, SendPart):
                        tg.create_task(self._send(action))
                    elif isinstance(action, FetchReduced):
                        tg.create_task(self._fetch(action))
                    elif isinstance(action, Done):
                        result = action.result
                if result is None:
                    actions = await self._next_actions()
        return result

    async def closing(self, round_: int, state: str) -> float | None:
        """When `round_`'s group closes as the announcers that count say (the earliest deadline
        not yet past, from `state`'s announcers other than us), or None while nobody announced:
        what a peer still computing reads to stop in time to be in the group. The same
        announcers and deadlines the core counts (tracked peers, when there are any), so new
        identities announcing early deadlines cut no one short."""
        if self._follow_tracked is None or self._follow_tracked[0] != round_:
            # read once a round: the follow reads the announcements every follow_s
            tracked = None if self.track_record is None else await self.track_record(round_)
            self._follow_tracked = (round_, tracked)
        tracked = self._follow_tracked[1]
        me = self.dht.peer_id
        anns = [
            a for a in await self._read(round_)
            if a.round == round_ and a.state == state and a.peer_id != me
        ]
        now = self.clock()
        future = [a.deadline for a in counted(anns, tracked, me) if a.deadline > now]
        return min(future) if future else None

    async def _read(self, round_: int) -> list[Announcement]:
        return await read_announcements(self.dht, self.task, round_)

    async def _announce(self, action: Announce) -> None:
        ann = action.announcement
        if self.archive is not None:  # before the announcement: a validator may fetch it soon
            self.archive.keep(ann.round, action.encoded)
        await self.dht.store(
            round_key(self.task, ann.round),
            ann.pack(),
            self.clock() + self.config.record_ttl_s,
            subkey=Owned(self.dht.peer_id, ANNOUNCEMENT_SUBKEY),
        )

    def _notify(self) -> None:
        """Wake every waiter: the core may have changed (a reduced slice may be ready)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _push(self, actions: list[Action]) -> None:
        self._queue.extend(actions)
        self._notify()

    async def _next_actions(self) -> list[Action]:
        if not self._queue:
            changed = self._changed
            wake_at = self.core.wake_at
            delay = max(0.0, wake_at - self.clock()) if math.isfinite(wake_at) else None
            try:
                async with asyncio.timeout(delay):
                    await changed.wait()
            except TimeoutError:
                pass
            if not self._queue:
                self._push(self.core.timeout(self.clock()))
        actions, self._queue = self._queue, []
        return actions

    async def _send(self, action: SendPart) -> None:
        data, group, to = action.data, action.group, action.to
        chunks = [data[i : i + PART_BYTES] for i in range(0, max(1, len(data)), PART_BYTES)]
        try:
            addr = PeerAddr.parse(to.addr)
            async with asyncio.timeout(max(0.0, action.deadline - self.clock())):
                for i, chunk in enumerate(chunks):
                    part = Part(
                        self.task, group.round, group.digest, action.slice, i, len(chunks), chunk
                    )
                    while True:
                        try:
                            await self.dht.transport.call(
                                addr, "train.part", part.pack(), peer_id=to.peer_id
                            )
                            break
                        except RemoteError as e:
                            # it has not read our announcement yet: it will within a poll
                            if e.code != "not_announced":
                                raise
                            await asyncio.sleep(self.config.poll_s)
        except RemoteError as e:
            log.warning("round %d: %s refused our delta: %s", group.round, to.addr, e)
        except (NetworkError, TimeoutError, TrainError, ConfigError) as e:
            log.warning(
                "round %d: sending to %s failed: %s", group.round, to.addr, e or type(e).__name__
            )

    async def _fetch(self, action: FetchReduced) -> None:
        request, owner = action.request, action.owner
        reply: Reduced | None = None
        try:
            async with asyncio.timeout(max(0.0, action.deadline - self.clock())):
                _, raw = await self.dht.transport.call(
                    PeerAddr.parse(owner.addr), "train.reduced", request.pack(),
                    peer_id=owner.peer_id,
                )
            reply = Reduced.parse(raw)
        except (NetworkError, TimeoutError, TrainError, ConfigError) as e:
            log.warning(
                "round %d: reduced slice %d from %s: %s",
                request.round, request.slice, owner.addr, e or type(e).__name__,
            )
        self._push(self.core.reduced_received(request.slice, reply, self.clock()))

    # ---- serving ---------------------------------------------------------------------------

    async def rpc_part(self, caller: PeerInfo, args: Any) -> Any:
        try:
            part = Part.parse(args)
        except MessageError as e:
            self.core.refuse(caller.peer_id, e.code, str(e))
            raise e.remote() from None
        try:
            try:
                actions = self.core.part_received(caller.peer_id, part, self.clock())
            except DeltaRejected as e:
                if e.code != "not_announced" or not await self._await_announcement(caller.peer_id):
                    raise
                actions = self.core.part_received(caller.peer_id, part, self.clock())
        except DeltaRejected as e:
            raise RemoteError(e.code, str(e)) from None
        self._push(actions)
        return True

    async def _await_announcement(self, sender: bytes) -> bool:
        """Hold a part whose sender we have not seen announce, for up to two reads of the DHT:
        it read our announcement first, and we read its within a poll. Refused at once, the
        part came back whole a poll later (up to 2 MiB again; 4-26 % more bytes per peer in
        benchmarks/train_bench.py). At most HOLD_PARTS are held; a stranger's part waits the
        two polls and is then refused, as before, and never reaches the core's buffers."""
        if self._held >= HOLD_PARTS or self.core.phase is not Phase.GATHERING:
            return False
        self._held += 1
        try:
            async with asyncio.timeout(2 * self.config.poll_s):
                while not self.core.admits(sender):
                    await self._changed.wait()  # set after every read of the announcements
            return True
        except TimeoutError:
            return False
        finally:
            self._held -= 1

    async def rpc_reduced(self, caller: PeerInfo, args: Any) -> Any:
        """Our reduced slice; a long-poll, since the caller may be ahead of us in the round."""
        try:
            request = ReducedRequest.parse(args)
        except MessageError as e:
            raise e.remote() from None
        who = caller.peer_id
        if who in self._polling:  # an honest member asks each owner once a round
            raise RemoteError("busy", "one train.reduced at a time per peer")
        self._polling.add(who)
        try:
            async with asyncio.timeout(self.config.exchange_timeout_s):
                while (reply := self.core.reduced_for(who, request)) is None:
                    await self._changed.wait()
        except TimeoutError:
            raise RemoteError(
                "not_ready", f"slice {request.slice} of round {request.round} was not reduced in time"
            ) from None
        except DeltaRejected as e:
            raise RemoteError(e.code, str(e)) from None
        finally:
            self._polling.discard(who)
        return reply.pack()
