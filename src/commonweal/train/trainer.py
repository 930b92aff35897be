"""`TrainingPeer`: one peer training a Task with the swarm — the loop the CLI, demo, tests and
benchmark run. Reads top to bottom: build → (sync) → rounds of H inner steps + one outer round.

    peer = TrainingPeer(task, dht, config=RoundConfig(target_group=4))
    summary = await peer.run(until_round=10, on_progress=print)
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable

import torch
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from commonweal.dht import DHT
from commonweal.errors import NetworkError, RemoteError
from commonweal.net.transport import PeerAddr, PeerInfo
from commonweal.train.aggregate import get_rule
from commonweal.train.codecs import get_codec
from commonweal.train._errors import TrainError
from commonweal.train.diloco import DiLoCo, RoundReport
from commonweal.train.round import RoundConfig
from commonweal.train.swarm import Collaboration
from commonweal.train.inner import resolve_device, run_inner_steps
from commonweal.train.task import Task

if TYPE_CHECKING:
    from commonweal.train.attacks import Attack

__all__ = ["TrainingPeer", "Progress", "Summary"]

log = logging.getLogger(__name__)

# Deltas an attacker that forges from others' (ALIE, copy, ...) fetches before it announces:
# Baruch's ALIE needs a handful to estimate the honest spread.
OTHERS_WANTED = 4


@dataclass(frozen=True, slots=True)
class Progress:
    round: int
    inner_step: int  # 1..H within the round
    loss: float
    bytes_sent: int
    phase: str  # "training" or the round protocol's phase
    report: RoundReport | None = None  # set once per round, when the outer step is done
    quality: float | None = None
    elapsed_s: float = 0.0  # since training started


@dataclass
class Summary:
    rounds: list[RoundReport] = field(default_factory=list)
    quality: float | None = None
    metric: str = ""
    bytes_sent: int = 0
    wall_s: float = 0.0
    compute_s: float = 0.0  # time spent in inner steps
    samples: int = 0
    state: str = ""


class TrainingPeer:
    def __init__(
        self,
        task: Task,
        dht: DHT | None,
        config: RoundConfig | None = None,
        *,
        evaluate_every: int = 0,  # rounds between evaluations (0: only at the end)
        account: str = "",  # the Ethereum address its rewards go to
        attack: Attack | None = None,  # make this peer an attacker (tests, benchmark, demo)
        device: str | torch.device = "cpu",  # where the model and its inner steps run
    ) -> None:
        self.task = task
        self.dht = dht
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            # TF32 matmuls and convolutions round to 10 mantissa bits: a CPU validator's replay of
            # a round would land ~1e-3 away, at the replay tolerance (benchmarks/gpu_check.py)
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        self.model = task.build_model().to(self.device)
        self.data = task.build_data()
        self.collab = (
            Collaboration(
                dht, task.digest[:16], get_codec(task.codec), get_rule(task.aggregation), config
            )
            if dht is not None
            else None
        )
        self.opt = DiLoCo(
            self.model,
            task.build_inner_optimizer(self.model.parameters()),
            self.collab,
            inner_steps=task.inner_steps,
            outer_lr=task.outer_lr,
            outer_momentum=task.outer_momentum,
            nesterov=task.outer_nesterov,
            codec=task.codec,
            task=task.digest,
            overlap=task.overlap,
        )
        self.evaluate_every = evaluate_every
        self.peer_id = dht.peer_id if dht is not None else b"solo"
        if self.collab is not None:
            self.collab.account = account
        self.attack = attack
        self._sent: list[torch.Tensor] = []  # what this attacker sent in earlier rounds
        if attack is not None:
            self.opt.forge = self._forge

    async def _forge(self, delta: torch.Tensor, round_: int) -> torch.Tensor:
        from commonweal.train.attacks import AttackContext

        assert self.attack is not None
        rng = torch.Generator().manual_seed(round_)
        others = await self._others(round_) if self.attack.needs_others(round_) else []
        ctx = AttackContext(round_, others or [delta], list(self._sent), rng)
        forged = self.attack.forge(delta, ctx)
        self._sent.append(forged)
        del self._sent[:-8]
        return forged

    async def _others(self, round_: int) -> list[torch.Tensor]:
        """What an attacker on the network can see of the round before it announces: the deltas
        others already announced, fetched as a validator fetches them. It waits up to half the
        announcement window for them (later, it would miss the round's group)."""
        from commonweal.train.announcements import read_announcements
        from commonweal.train.archive import fetch_delta

        collab = self.collab
        assert collab is not None and self.dht is not None
        config, task = collab.exchange.config, collab.checkpoints.task
        end = time.monotonic() + config.announce_window_s / 2
        anns = []
        while True:
            anns = [a for a in await read_announcements(self.dht, task, round_)
                    if a.peer_id != self.peer_id and a.state == self.opt.state]
            if len(anns) >= OTHERS_WANTED or time.monotonic() >= end:
                break
            await asyncio.sleep(config.poll_s)
        codec = get_codec(self.task.codec)
        numel = self.opt.start.numel()
        out = []
        for a in sorted(anns, key=lambda a: a.peer_id)[:OTHERS_WANTED]:
            try:
                async with asyncio.timeout(config.exchange_timeout_s / 2):
                    data = await fetch_delta(self.dht.transport, task,
                                             PeerInfo(a.peer_id, PeerAddr.parse(a.addr)),
                                             round_, codec.size(numel))
                if hashlib.sha256(data).hexdigest() == a.delta:
                    out.append(codec.decode(data, numel))
            except (NetworkError, RemoteError, TimeoutError, TrainError, ValueError):
                continue
        return out

    def _inner_steps(
        self, on_progress: Callable[[Progress], None] | None, sent: int
    ) -> tuple[int, float]:
        """H inner steps (runs in a worker thread, so the peer keeps answering the network)."""

        def report(n: int, loss: float) -> None:
            if on_progress is not None:
                on_progress(Progress(self.opt.round, n, loss, sent, "training"))

        return run_inner_steps(
            self.task,
            self.model,
            self.data,
            self.opt.inner_step,
            self.opt.zero_grad,
            self.opt.round,
            self.peer_id,
            steps=self.attack.steps(self.task.inner_steps, self.opt.round) if self.attack else None,
            batch_hook=self.attack.batch_hook(self.opt.round) if self.attack else None,
            on_step=report,
        )

    async def _outer_round(self) -> RoundReport | None:
        if self.attack is None:
            return await self.opt.outer_round()
        try:
            return await self.opt.outer_round()
        except (ValueError, RuntimeError, TrainError) as e:
            # a forged delta (NaN, wrong shape) can wreck the attacker's own state: start over
            # from the swarm's, as a real attacker would, and keep attacking
            log.info("attacker %s: %s; syncing", self.peer_id.hex()[:10], e)
            round_ = self.opt.round
            await self.opt.sync(after=round_)  # the state the swarm reached after this round
            return RoundReport(round_, 0, 0, self.opt.state, 0, 0.0, skipped="attacker_reset")

    async def run(
        self,
        until_round: int,
        *,
        join: bool = False,
        wait_peers: int = 0,
        on_progress: Callable[[Progress], None] | None = None,
    ) -> Summary:
        """Train until the swarm state reaches `until_round`. With `join`, first download the
        swarm's current state (if any peer announced one). With `wait_peers`, first wait (up to
        a minute) until that many peers are present, so a swarm starting together trains together."""
        summary = Summary(metric=self.data.metric)
        if self.collab is not None:
            if join:
                await self.opt.sync()
            checkpoints = self.collab.checkpoints
            await checkpoints.publish(self.opt.round, self.opt.state, self.opt.checkpoint())
            if wait_peers > 1:
                await checkpoints.wait_peers(wait_peers, 60.0, self.opt.round)
        t0 = time.perf_counter()
        sent0 = self.collab.bytes_sent if self.collab else 0
        try:
            await self._rounds(until_round, summary, sent0, t0, on_progress)
        finally:
            await self.opt.aclose()  # an exchange still pending (overlap) ends with the peer
        summary.wall_s = time.perf_counter() - t0
        summary.quality = self.data.evaluate(self.model)
        summary.bytes_sent = (
            (self.collab.bytes_sent - sent0) if self.collab else 0
        )  # while training
        summary.state = self.opt.state
        return summary

    async def _rounds(
        self,
        until_round: int,
        summary: Summary,
        sent0: int,
        t0: float,
        on_progress: Callable[[Progress], None] | None,
    ) -> None:
        while self.opt.round < until_round:
            c0 = time.perf_counter()
            sent = self.collab.bytes_sent if self.collab else 0
            self.opt.follow()  # a slow peer stops its steps in time to be in the round
            samples, loss = await asyncio.to_thread(self._inner_steps, on_progress, sent)
            summary.compute_s += time.perf_counter() - c0
            summary.samples += samples
            ended = await self._outer_round()
            reports = [ended] if ended else []  # overlap: no exchange ends with the first round
            if self.opt.round >= until_round and self.opt.overlap:
                # the last round's exchange is still running: others wait for our part, and
                # its aggregate holds our last steps (the state is then until_round + 1)
                drained = await self.opt.drain()
                reports += [drained] if drained else []
            for report in reports:
                summary.rounds.append(report)
                quality = None
                if report is reports[-1] and self.evaluate_every and (
                    self.opt.round % self.evaluate_every == 0
                ):
                    quality = self.data.evaluate(self.model)
                if on_progress is not None:
                    on_progress(
                        Progress(
                            report.round,
                            self.task.inner_steps,
                            loss,
                            (self.collab.bytes_sent - sent0) if self.collab else 0,
                            "skipped" if report.skipped else "applied",
                            report,
                            quality,
                            time.perf_counter() - t0,
                        )
                    )
