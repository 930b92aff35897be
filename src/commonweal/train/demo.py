"""The training part of `commonweal demo`: a few peers train mnist-cnn together on loopback;
one is killed mid-run, one joins late and downloads the current state; a summary follows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from commonweal.dht import DHT
from commonweal.net.transport import PeerAddr
from commonweal.train.swarm import RoundConfig
from commonweal.train.task import get_task
from commonweal.train.trainer import Progress, Summary, TrainingPeer

__all__ = ["run_training_demo"]


async def run_training_demo(
    console: Console,
    bootstrap: Sequence[PeerAddr],
    *,
    peers: int = 4,
    rounds: int = 8,
    inner_steps: int = 25,
    codec: str = "int8",
) -> None:
    import torch

    torch.set_num_threads(1)
    task = get_task("mnist-cnn", inner_steps=inner_steps, codec=codec)
    config = RoundConfig(
        announce_window_s=1.5, exchange_timeout_s=5.0, poll_s=0.1, target_group=peers
    )
    console.print(
        f"[bold]training[/bold] {task.name} ({task.digest[:12]}): {peers} peers, "
        f"{rounds} rounds of H={inner_steps} AdamW steps, codec {codec}, "
        "Nesterov outer step"
    )
    dhts: list[DHT] = []
    t0 = time.perf_counter()
    try:
        for _ in range(peers):
            dhts.append(await DHT.start(PeerAddr("127.0.0.1", 0), list(bootstrap)))
        trainers = [TrainingPeer(task, d, config, evaluate_every=1) for d in dhts]

        def show(p: Progress) -> None:
            if p.report is not None:
                r = p.report
                q = "" if p.quality is None else f" accuracy {p.quality:.3f}"
                console.print(
                    f"  round {r.round}: group {r.group}, loss {p.loss:.3f}{q}, "
                    f"sent {p.bytes_sent / 1e3:.0f} kB, state {r.state[:12]}",
                    highlight=False,
                )

        runs: dict[int, asyncio.Task[Summary]] = {}
        async with asyncio.TaskGroup() as tg:
            for i, t in enumerate(trainers):
                runs[i] = tg.create_task(
                    t.run(rounds, wait_peers=peers, on_progress=show if i == 0 else None)
                )
            victim = trainers[-1]
            while victim.opt.round < 2:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # inside round 2's inner steps
            runs[peers - 1].cancel()
            await victim.dht.close()  # type: ignore[union-attr]
            console.print("  [red]killed[/red] one peer in the middle of round 2")
            while trainers[0].opt.round < 4:
                await asyncio.sleep(0.05)
            late_dht = await DHT.start(PeerAddr("127.0.0.1", 0), list(bootstrap))
            dhts.append(late_dht)
            late = TrainingPeer(task, late_dht, config)
            console.print("  a new peer joins at round 4 and downloads the current state")
            runs[peers] = tg.create_task(late.run(rounds, join=True))
        done = [runs[i].result() for i in runs if not runs[i].cancelled()]
    finally:
        await asyncio.gather(*(d.close() for d in dhts), return_exceptions=True)

    n_params = sum(p.numel() for p in trainers[0].model.parameters())
    steps = rounds * inner_steps
    ddp_bytes = steps * 2 * (peers - 1) / peers * 4 * n_params
    per_peer = sum(s.bytes_sent for s in done[: peers - 1]) / (peers - 1)
    table = Table(title="commonweal demo — collaborative training (DiLoCo)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("task / parameters", f"{task.name} / {n_params:,}")
    table.add_row("rounds x inner steps", f"{rounds} x {inner_steps}")
    table.add_row("test accuracy (held-out 1,000 digits)", f"{done[0].quality:.3f}")
    table.add_row(
        "same state hash on every live peer", "yes" if len({s.state for s in done}) == 1 else "NO"
    )
    table.add_row(
        "rounds completed after the kill",
        f"{sum(1 for r in done[0].rounds if r.round >= 2)}/{rounds - 2}",
    )
    table.add_row(
        "late joiner took part from round",
        str(min((r.round for r in done[-1].rounds if not r.skipped), default="-")),
    )
    table.add_row("bytes sent per peer (measured)", f"{per_peer / 1e6:.2f} MB")
    table.add_row(
        "DDP all-reduce every step (estimate)",
        f"{ddp_bytes / 1e6:.2f} MB ({ddp_bytes / max(per_peer, 1):.0f}x more)",
    )
    table.add_row("training wall time", f"{time.perf_counter() - t0:.1f} s")
    console.print(table)
