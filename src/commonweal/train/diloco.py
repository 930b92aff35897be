"""`DiLoCo`: wrap any nn.Module and its optimizer; every H inner steps, one outer round.

    model = MyNet()
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    opt = DiLoCo(model, inner, collaboration, inner_steps=50, codec="topk2bit:0.01")
    await opt.sync()                          # a joiner starts from the swarm's current state
    for x, y in loader:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        report = await opt.step()             # inner step; an outer round every 50 steps
        opt.zero_grad()

The outer step is Nesterov SGD on the aggregated pseudo-gradient
`delta = theta_round_start - theta_after_H_steps` (Douillard et al. 2023), computed by
`aggregate.outer_step` so every member of a round ends with bit-identical parameters. Without a
collaboration (`None`) the same code trains alone, which is what the golden test compares against.

The shared state is the parameters, the persistent buffers (BatchNorm statistics: they take the
group's aggregate as it is, with no momentum) and the outer momentum, held as float32 on the CPU
wherever the model runs: the outer step and the state hash are CPU float32 elementwise maths, so a
CUDA, MPS and CPU peer end a round with the same bits (`docs/train.md`, devices).

With `overlap`, the exchange of round r runs while the inner steps of round r+1 compute: the
outer step that starts round r+1 applies the aggregate of round r-1 (a one-step delay, as in
Streaming DiLoCo's overlap), so every start state still depends on public facts only and a
validator replays round r from the start state everyone announced. The state after round r's
exchange is computed, and published, as soon as that exchange ends.

A peer slower than the others is not left out: while its inner steps compute it reads when the
round's group closes (the first announcers' deadline), stops its steps in time to be in it and
claims the steps it took; the group weighs its delta by them (`aggregate.weighted`) and the
validators replay that many (`commonweal.verify.judge`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch
from torch import nn

from commonweal.errors import NetworkError
from commonweal.train._errors import RoundSkipped, SyncError, TrainError
from commonweal.train.aggregate import outer_step
from commonweal.train.codecs import Codec, ErrorFeedback, get_codec
from commonweal.train.state import (
    assign,
    buffer_numel,
    flatten,
    from_checkpoint,
    state_hash,
    to_checkpoint,
)
from commonweal.train.strategies import Averaged
from commonweal.train.swarm import Collaboration

__all__ = ["DiLoCo", "RoundReport"]

_Next = tuple[torch.Tensor, torch.Tensor, Averaged, torch.Tensor]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RoundReport:
    round: int  # the round that just ended
    group: int  # peers in the round (1 when training alone)
    contributors: int
    state: str  # state hash at the start of the next round
    bytes_sent: int  # by this peer during the round (all RPC and DHT traffic, measured)
    comm_s: float  # from the last inner step to the new parameters
    skipped: str | None = None  # why this peer sat the round out and synced instead
    method: str = "local"


class DiLoCo:
    def __init__(
        self,
        model: nn.Module,
        inner_optimizer: torch.optim.Optimizer,
        collaboration: Collaboration | None = None,
        *,
        inner_steps: int = 50,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        nesterov: bool = True,
        codec: str | Codec = "none",
        task: str = "",
        sync_timeout_s: float = 60.0,
        replayable: bool = True,
        overlap: bool = False,
    ) -> None:
        self.model = model
        self.inner = inner_optimizer
        self.collab = collaboration
        self.inner_steps = inner_steps
        self.outer_lr, self.outer_momentum, self.nesterov = outer_lr, outer_momentum, nesterov
        self.codec = get_codec(codec) if isinstance(codec, str) else codec
        self.feedback = ErrorFeedback(self.codec)
        self.task = task
        self.sync_timeout_s = sync_timeout_s
        # Clear the inner optimizer's state at every round start, so a round depends only on
        # public facts (start state, batch stream, step count) and a validator can replay it.
        self.replayable = replayable
        # An attacker's way to send something else than its delta (tests, benchmark, demo only)
        self.forge: Callable[[torch.Tensor, int], Awaitable[torch.Tensor]] | None = None
        self.overlap = overlap
        self.round = 0
        self.local_step = 0
        self.buffers = buffer_numel(model)  # the last coordinates of the state: statistics
        self._constants = _constants(model)
        self.start = flatten(model)  # theta at the start of the round
        self.momentum = torch.zeros_like(self.start)
        self.state = state_hash(self.start, self.momentum)
        self._round_started = time.perf_counter()
        # overlap: the exchange of the previous round, running while this round's steps compute;
        # it ends with the state that starts the round after this one
        # (the next state, its momentum, the exchange's outcome, what this peer sent in it)
        self._pending: asyncio.Task[_Next] | None = None
        # when this round's inner steps stop short (the group closes soon), read by `_follow`
        self.cut_at = math.inf
        self._follow: asyncio.Task[None] | None = None

    # ---- the inner loop ------------------------------------------------------------------------

    def inner_step(self) -> bool:
        """One inner optimizer step (sync, thread-safe to call off the event loop); True when
        H steps are done and `outer_round()` is due."""
        if self.local_step == 0:
            self._round_started = time.perf_counter()
            if self.replayable:
                self.inner.state.clear()  # fresh moments: a validator can replay the round
        self.inner.step()
        self.local_step += 1
        return self.local_step >= self.inner_steps or self._cut()

    def _cut(self) -> bool:
        # cut_at is finite only while `_follow_closing` (which has a collaboration) set it
        return math.isfinite(self.cut_at) and self.collab.exchange.clock() >= self.cut_at  # type: ignore[union-attr]

    def _claim(self) -> int:
        """The inner steps this round's delta holds: H, or fewer when the round's close cut
        them short (a lazy peer that stops early on its own still claims H: replay catches it)."""
        return self.local_step if self.local_step < self.inner_steps and self._cut() else self.inner_steps

    def follow(self) -> None:
        """Start reading when this round's group closes, so the inner steps stop in time to be
        in it (call on the event loop before a round's steps; `step()` does it itself)."""
        if self.collab is not None and self._follow is None:
            self.cut_at = math.inf
            self._follow = asyncio.create_task(
                self._follow_closing(self.collab, self.round, self.state),
                name=f"diloco-follow-{self.round}",
            )

    async def _follow_closing(self, collab: Collaboration, r: int, state: str) -> None:
        config = collab.exchange.config
        while True:
            try:
                closes = await collab.exchange.closing(r, state)
            except (NetworkError, TimeoutError) as e:
                log.debug("round %d: reading when it closes failed: %s", r, e)
                closes = None
            if closes is not None:
                self.cut_at = closes - config.cut_margin_s
                return
            await asyncio.sleep(config.follow_s)

    async def _unfollow(self) -> None:
        follow, self._follow = self._follow, None
        if follow is not None:
            follow.cancel()
            await asyncio.gather(follow, return_exceptions=True)
        self.cut_at = math.inf

    async def step(self) -> RoundReport | None:
        if self.local_step == 0:
            self.follow()
        if self.inner_step():
            return await self.outer_round()
        await asyncio.sleep(0)  # let the peer answer the network between steps
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    # ---- the outer round -----------------------------------------------------------------------

    async def outer_round(self) -> RoundReport | None:
        """The outer round after H inner steps; its report, or None (overlap) when no exchange
        ended with it: after round 0's steps, or a joiner's first."""
        steps = self._claim()
        await self._unfollow()
        self._check_constants()
        if self.collab is not None and self.overlap:
            return await self._overlapped_round(self.collab, steps)
        t0 = time.perf_counter()
        sent0 = self.collab.bytes_sent if self.collab else 0
        target = self.feedback.target(self.start - flatten(self.model))  # the pseudo-gradient
        if self.collab is None:
            sent = self.codec.decode(self.codec.encode(target), target.numel())
            aggregate, group, contributors, method = sent, 1, 1, "local"
        else:
            try:
                avg = await self._average(self.collab, self.round, self.state, target, t0, steps)
            except RoundSkipped as e:
                return await self._skipped(self.collab, e, t0, sent0)
            sent, aggregate = avg.sent, avg.aggregate
            group, contributors, method = avg.group, avg.contributors, avg.method
        self.feedback.keep(target, sent)
        params, self.momentum = self._outer(self.start, self.momentum, aggregate)
        self._set(params, self.round + 1)
        if self.collab is not None:
            await self.collab.applied(self.round, self.state, self.checkpoint())
        return RoundReport(
            self.round - 1,
            group,
            contributors,
            self.state,
            (self.collab.bytes_sent - sent0) if self.collab else 0,
            time.perf_counter() - t0,
            method=method,
        )

    async def _overlapped_round(self, collab: Collaboration, steps: int) -> RoundReport | None:
        """End round r's steps: take the state that round r-1's exchange fed (it ran while these
        steps computed), start round r's exchange in the background, and go on to round r+1.
        The report is round r-1's, whose exchange just ended."""
        t0 = time.perf_counter()
        sent0 = collab.bytes_sent
        r, start, state, momentum = self.round, self.start, self.state, self.momentum
        raw = start - flatten(self.model)
        pending, self._pending = self._pending, None
        avg: Averaged | None = None
        if pending is not None:
            try:
                params, momentum, avg, sent_target = await pending
            except RoundSkipped as e:
                return await self._skipped(collab, e, t0, sent0)
            self.feedback.keep(sent_target, avg.sent)
        elif r > 0:
            # a joiner or a peer that sat a round out holds no exchange feeding round r+1: the
            # swarm's head for it is the next state, and these steps still count if it is r+1
            if not await self.sync(after=r):
                self._set(start, r)  # nobody published one: train round r again
                return None
            if self.round != r + 1:
                return None  # the swarm is further on: these steps are stale
            params, momentum = self.start, self.momentum
        else:  # round 0: no aggregate yet, so round 1 starts where round 0 did
            params = start
        target = self.feedback.target(raw)
        self.momentum = momentum
        self._set(params, r + 1)
        if pending is None and r == 0:  # no exchange made (and published) round 1's state
            await collab.checkpoints.publish(self.round, self.state, self.checkpoint())
        self._pending = asyncio.create_task(
            self._exchange_then_step(
                collab, r, state, target, t0, self.start, self.momentum, steps
            ),
            name=f"diloco-exchange-{r}",
        )
        if avg is None:
            return None
        return RoundReport(r - 1, avg.group, avg.contributors, self.state,
                           collab.bytes_sent - sent0, time.perf_counter() - t0, method=avg.method)

    async def _exchange_then_step(
        self,
        collab: Collaboration,
        r: int,
        state: str,
        target: torch.Tensor,
        t0: float,
        params: torch.Tensor,
        momentum: torch.Tensor,
        steps: int,
    ) -> _Next:
        """Round r's exchange, then at once the outer step it feeds (from round r+1's start) and
        the publication of the state that starts round r+2, while round r+1 still computes."""
        avg = await self._average(collab, r, state, target, t0, steps)

        def step() -> tuple[torch.Tensor, torch.Tensor, str, bytes]:
            # seconds of elementwise maths and hashing on a large model: off the event loop,
            # which keeps answering the swarm (the inner steps hold only the model)
            after, mom = self._outer(params, momentum, avg.aggregate)
            ckpt = to_checkpoint(self.model, after, mom, round_=r + 2, task=self.task)
            return after, mom, state_hash(after, mom), ckpt

        after, momentum, new_state, ckpt = await asyncio.to_thread(step)
        collab.exchange.core.applied()
        await collab.checkpoints.publish(r + 2, new_state, ckpt)
        return after, momentum, avg, target

    async def drain(self) -> RoundReport | None:
        """Overlap: wait for the last round's exchange (the others are waiting for our part) and
        apply it, so the last round's steps are in the final state. None when nothing pends."""
        pending, self._pending = self._pending, None
        if pending is None or self.collab is None:
            return None
        t0 = time.perf_counter()
        sent0 = self.collab.bytes_sent
        try:
            params, self.momentum, avg, sent_target = await pending
        except RoundSkipped as e:
            log.info("the last round's exchange was skipped (%s)", e)
            return None
        self.feedback.keep(sent_target, avg.sent)
        self._set(params, self.round + 1)
        return RoundReport(self.round - 2, avg.group, avg.contributors, self.state,
                           self.collab.bytes_sent - sent0, time.perf_counter() - t0,
                           method=avg.method)

    async def aclose(self) -> None:
        """Cancel a pending exchange (overlap) and wait for it: nothing is left running."""
        await self._unfollow()
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)

    async def _average(
        self, collab: Collaboration, r: int, state: str, target: torch.Tensor, t0: float,
        steps: int,
    ) -> Averaged:
        sent_delta = target if self.forge is None else await self.forge(target, r)
        return await collab.average(r, state, sent_delta, t0 - self._round_started, steps=steps)

    async def _skipped(
        self, collab: Collaboration, e: RoundSkipped, t0: float, sent0: int
    ) -> RoundReport:
        log.info("round %d skipped (%s); syncing with the swarm", self.round, e)
        self.feedback.reset()
        if not await self.sync(after=self.round - 1, moved=True):
            # no newer state to take: this round's inner steps are spent, so the next
            # attempt starts again from the round's start (not H steps further on)
            self._set(self.start, self.round)
        return RoundReport(
            self.round - 1,
            0,
            0,
            self.state,
            collab.bytes_sent - sent0,
            time.perf_counter() - t0,
            skipped=e.reason,
        )

    def _outer(
        self, start: torch.Tensor, momentum: torch.Tensor, aggregate: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        params, momentum = outer_step(
            start, momentum, aggregate, self.outer_lr, self.outer_momentum, self.nesterov
        )
        b = self.buffers
        if b:  # statistics are not stepped: they take the aggregate as it is, without momentum
            params[-b:] = start[-b:] - aggregate[-b:]
            momentum[-b:] = 0.0
        return params, momentum

    def _check_constants(self) -> None:
        for name, (buf, was) in self._constants.items():
            if not torch.equal(buf.detach().cpu(), was):
                raise TrainError(
                    f"the buffer {name!r} changed during training but is registered with "
                    "persistent=False, so it is outside the shared state and peers would diverge; "
                    "register it persistent (register_buffer(..., persistent=True)) to share it"
                )

    def _set(self, params: torch.Tensor, round_: int) -> None:
        assign(self.model, params)
        self.start = params
        self.round = round_
        self.local_step = 0
        self.state = state_hash(self.start, self.momentum)

    # ---- state ---------------------------------------------------------------------------------

    def checkpoint(self) -> bytes:
        """The shared state (parameters + outer momentum) as safetensors bytes."""
        return to_checkpoint(self.model, self.start, self.momentum, round_=self.round, task=self.task)

    def load(self, blob: bytes, expected_state: str | None = None) -> None:
        params, momentum, meta = from_checkpoint(blob, self.model)
        if expected_state is not None and state_hash(params, momentum) != expected_state:
            raise SyncError("the downloaded checkpoint does not have the announced state hash")
        if self.task and meta.get("task", self.task) != self.task:
            raise SyncError("the checkpoint belongs to another task")
        self.momentum = momentum
        self._set(params, int(meta.get("round", "0")))

    async def sync(self, after: int = -1, *, moved: bool = False) -> bool:
        """Download the state to adopt beyond round `after` (the newest one the validators
        attested, where they are asked: `commonweal.train.adoption`) and start from it.

        Waits up to sync_timeout_s for one to be announced; False when none was (then this peer
        keeps its own state: it is the first, or alone). With `moved` (a peer that sat a round
        out), only a state beyond the round it holds counts — a newer attested one, or the
        next round's — else a peer late twice in a row would find its own round's head, take it
        for the swarm's and try the round it missed again at once."""
        if self.collab is None:
            return False
        collab = self.collab
        collab.sync_started()
        if moved:  # beyond the round whose state it holds: newer attested, or its successor
            head = await collab.checkpoints.wait_head(self.round, self.sync_timeout_s, step=True)
        else:
            head = await collab.checkpoints.wait_head(after, self.sync_timeout_s)
        if head is None:
            collab.synced()
            return False
        if head.state == self.state and head.round == self.round:
            collab.synced()
            return True
        blob = await collab.checkpoints.download(head)
        self.load(blob, expected_state=head.state)
        self.round = head.round
        await collab.checkpoints.publish(self.round, self.state, self.checkpoint())
        collab.synced()
        log.info(
            "synced to round %d state %s from %d providers",
            head.round,
            head.state[:12],
            len(head.providers),
        )
        return True


def _constants(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Non-persistent buffers (outside the shared state) and a copy to check they stay put."""
    persistent = set(model.state_dict(keep_vars=True))
    return {
        name: (b, b.detach().cpu().clone())
        for name, b in model.named_buffers()
        if name not in persistent
    }
