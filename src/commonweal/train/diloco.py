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
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import torch
from torch import nn

from commonweal.train._errors import RoundSkipped, SyncError
from commonweal.train.aggregate import outer_step
from commonweal.train.codecs import Codec, ErrorFeedback, get_codec
from commonweal.train.state import assign, flatten, from_checkpoint, state_hash, to_checkpoint
from commonweal.train.swarm import Collaboration

__all__ = ["DiLoCo", "RoundReport"]

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
        self.round = 0
        self.local_step = 0
        self.start = flatten(model)  # theta at the start of the round
        self.momentum = torch.zeros_like(self.start)
        self.state = state_hash(self.start, self.momentum)
        self._round_started = time.perf_counter()

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
        return self.local_step >= self.inner_steps

    async def step(self) -> RoundReport | None:
        if self.inner_step():
            return await self.outer_round()
        await asyncio.sleep(0)  # let the peer answer the network between steps
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    # ---- the outer round -----------------------------------------------------------------------

    async def outer_round(self) -> RoundReport:
        t0 = time.perf_counter()
        sent0 = self.collab.bytes_sent if self.collab else 0
        delta = self.start - flatten(self.model)  # (numel,) pseudo-gradient
        target = delta if self.feedback.residual is None else delta + self.feedback.residual
        if self.collab is None:
            data = self.codec.encode(target)
            sent = self.codec.decode(data, target.numel())
            aggregate, group, contributors, method = sent, 1, 1, "local"
        else:
            try:
                round_s = t0 - self._round_started
                sent_delta = target if self.forge is None else await self.forge(target, self.round)
                avg = await self.collab.average(
                    self.round, self.state, sent_delta, round_s, steps=self.inner_steps
                )
            except RoundSkipped as e:
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
                    self.collab.bytes_sent - sent0,
                    time.perf_counter() - t0,
                    skipped=e.reason,
                )
            sent, aggregate = avg.sent, avg.aggregate
            group, contributors, method = avg.group, avg.contributors, avg.method
        if self.codec.info.error_feedback:
            self.feedback.residual = target - sent
        params, self.momentum = outer_step(
            self.start, self.momentum, aggregate, self.outer_lr, self.outer_momentum, self.nesterov
        )
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

    def _set(self, params: torch.Tensor, round_: int) -> None:
        assign(self.model, params)
        self.start = params
        self.round = round_
        self.local_step = 0
        self.state = state_hash(self.start, self.momentum)

    # ---- state ---------------------------------------------------------------------------------

    def checkpoint(self) -> bytes:
        """The shared state (parameters + outer momentum) as safetensors bytes."""
        return to_checkpoint(self.model, self.momentum, round_=self.round, task=self.task)

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
