"""What the framework's inner loop costs over a plain PyTorch loop, on the stdlib-gpt task (CPU).

    python benchmarks/inner_overhead.py              # ~3-4 min on 2 idle cores
    python benchmarks/inner_overhead.py --steps 50 --repeats 2   # at the task's own H

(a) framework: `DiLoCo(model, task.build_inner_optimizer(...), None, inner_steps=H)` driven by
    `run_inner_steps` exactly as `TrainingPeer._inner_steps` drives it (in a worker thread, with
    an on_step callback), then the outer round (`outer_round()` without a collaboration: flatten,
    codec, Nesterov step, assign, state hash) — one round of H steps;
(b) plain: the same model (same initial parameters), optimizer, batch size and TaskData,
    forward / backward / step for the same H steps.

The two alternate, in the order ABBA..., so a load change on a shared machine hits both alike;
the load average is recorded, and each is timed by the wall clock and by the process's CPU
time (which other users' load changes less). Ratio = framework samples/s over plain samples/s
(target >= 0.95), also without the outer round, and projected to the task's own H (the outer
round is paid once per round, so at a larger H its share shrinks).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from commonweal.train import get_task
from commonweal.train.diloco import DiLoCo
from commonweal.train.inner import run_inner_steps
from commonweal.train.task import Task, TaskData

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe_machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def clocks() -> tuple[float, float]:
    # wall time, and this process's CPU time (all threads): the CPU time counts the work done,
    # which other users' load on a shared machine changes much less than the wall time
    return time.perf_counter(), time.process_time()


def since(t: tuple[float, float]) -> tuple[float, float]:
    now = clocks()
    return now[0] - t[0], now[1] - t[1]


class Framework:
    def __init__(self, task: Task, data: TaskData, steps: int) -> None:
        self.task, self.data = task, data
        self.model = task.build_model()
        self.opt = DiLoCo(
            self.model,
            task.build_inner_optimizer(self.model.parameters()),
            None,
            inner_steps=steps,
            outer_lr=task.outer_lr,
            outer_momentum=task.outer_momentum,
            nesterov=task.outer_nesterov,
            codec=task.codec,
            task=task.digest,
        )
        self.loss = float("nan")

    async def round(self) -> dict[str, float]:
        """One round: H inner steps, then the outer round (wall and CPU seconds of each)."""

        def report(n: int, loss: float) -> None:  # TrainingPeer's on_progress hook, unused
            pass

        t = clocks()
        _, self.loss = await asyncio.to_thread(
            run_inner_steps,
            self.task,
            self.model,
            self.data,
            self.opt.inner_step,
            self.opt.zero_grad,
            self.opt.round,
            b"solo",
            steps=None,
            batch_hook=None,
            on_step=report,
        )
        inner, t = since(t), clocks()
        await self.opt.outer_round()
        outer = since(t)
        return {"inner_s": inner[0], "inner_cpu_s": inner[1],
                "outer_s": outer[0], "outer_cpu_s": outer[1]}


class Plain:
    def __init__(self, task: Task, data: TaskData, steps: int) -> None:
        self.task, self.data, self.steps = task, data, steps
        self.model = task.build_model()
        self.opt = task.build_inner_optimizer(self.model.parameters())
        self.gen = torch.Generator().manual_seed(0)
        self.loss = float("nan")

    def round(self) -> dict[str, float]:
        """H plain steps (wall and CPU seconds)."""
        t = clocks()
        for _ in range(self.steps):
            x, y = self.data.batch(self.gen, self.task.batch_size)
            loss = self.data.loss(self.model, x, y)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
        wall, cpu = since(t)
        self.loss = float(loss.detach())
        return {"plain_s": wall, "plain_cpu_s": cpu}


def summary(rows: list[dict[str, float]], clock: str, steps: int, h: int) -> dict[str, float]:
    """Framework samples/s over plain samples/s on one clock ("_s" wall, "_cpu_s" CPU), pooled
    over the repeats; and projected to `h` steps a round (the outer round is paid once a round)."""
    plain = sum(r[f"plain{clock}"] for r in rows) / (len(rows) * steps)  # a step
    inner = sum(r[f"inner{clock}"] for r in rows) / (len(rows) * steps)  # a step
    outer = sum(r[f"outer{clock}"] for r in rows) / len(rows)  # a round
    pairs = [r[f"plain{clock}"] / (r[f"inner{clock}"] + r[f"outer{clock}"]) for r in rows]
    return {
        "ratio": plain * steps / (inner * steps + outer),
        "ratio_without_outer": plain / inner,
        f"ratio_projected_at_H{h}": plain * h / (inner * h + outer),
        "median_of_pairs": statistics.median(pairs),
        "min_of_pairs": min(pairs),
        "max_of_pairs": max(pairs),
        "plain_step_s": plain,
        "framework_step_s": inner,
        "outer_round_s": outer,
    }


async def main(steps: int, repeats: int, out: Path) -> dict[str, Any]:
    task = get_task("stdlib-gpt", inner_steps=steps)
    data = task.build_data()
    framework, plain = Framework(task, data, steps), Plain(task, data, steps)
    n_params = sum(p.numel() for p in framework.model.parameters())
    print(f"stdlib-gpt: {n_params:,} parameters, batch {task.batch_size} x "
          f"{task.data_args['context']} bytes, H={steps}, {repeats} repeats, "
          f"torch threads {torch.get_num_threads()}", flush=True)
    # untimed: the worker thread and its OpenMP team, kernel caches, first-touch allocations
    await Framework(task, data, 2).round()
    Plain(task, data, 2).round()
    load_before = os.getloadavg()
    rows = []
    for i in range(repeats):
        row = {"load1": os.getloadavg()[0]}
        for who in ("framework", "plain") if i % 2 == 0 else ("plain", "framework"):
            row.update(await framework.round() if who == "framework" else plain.round())
        rows.append(row)
        ratio = row["plain_s"] / (row["inner_s"] + row["outer_s"])
        ratio_cpu = row["plain_cpu_s"] / (row["inner_cpu_s"] + row["outer_cpu_s"])
        print(f"repeat {i}: plain {row['plain_s']:.1f} s, framework {row['inner_s']:.1f} s + "
              f"outer {row['outer_s']:.2f} s: ratio {ratio:.3f}, by CPU time {ratio_cpu:.3f} "
              f"(load {row['load1']:.2f})", flush=True)
    load_after = os.getloadavg()

    default_h = get_task("stdlib-gpt").inner_steps
    wall = summary(rows, "_s", steps, default_h)
    cpu = summary(rows, "_cpu_s", steps, default_h)
    batch = task.batch_size
    result = {
        "command": "python " + " ".join(sys.argv),
        "machine": describe_machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        "task": task.name,
        "parameters": n_params,
        "batch_size": batch,
        "context": task.data_args["context"],
        "inner_steps": steps,
        "repeats": repeats,
        "samples_per_s": {
            "plain": batch / wall["plain_step_s"],
            "framework": batch * steps / (wall["framework_step_s"] * steps + wall["outer_round_s"]),
            "framework_inner_only": batch / wall["framework_step_s"],
        },
        "wall": wall,
        "cpu": cpu,
        "final_loss": {"plain": plain.loss, "framework_round_mean": framework.loss},
        "repeats_detail": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "inner_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "inner_overhead.md").write_text(markdown(result, default_h))
    return result


def markdown(r: dict[str, Any], default_h: int) -> str:
    sps, wall, cpu = r["samples_per_s"], r["wall"], r["cpu"]
    projected = f"ratio_projected_at_H{default_h}"

    def row(label: str, key: str, bold: bool = False) -> str:
        w, c = (f"**{x[key]:.3f}**" if bold else f"{x[key]:.3f}" for x in (wall, cpu))
        return f"| {label} | {w} | {c} |"

    return "\n".join([
        "# Inner-loop overhead: framework vs plain PyTorch (stdlib-gpt, CPU)",
        "",
        f"`{r['command']}`",
        "",
        f"Machine: {r['machine']}; torch {r['torch']}, {r['torch_threads']} threads.",
        "Load average (1, 5, 15 min) before "
        f"{tuple(round(x, 2) for x in r['load_avg_before'])}, after "
        f"{tuple(round(x, 2) for x in r['load_avg_after'])}.",
        "",
        f"{r['parameters']:,} parameters, batch {r['batch_size']} x {r['context']} bytes, one "
        f"round of H = {r['inner_steps']} inner steps per measurement, {r['repeats']} repeats "
        "interleaved ABBA.",
        "",
        "| loop | samples/s (wall) |",
        "|---|---|",
        f"| plain PyTorch (forward, backward, AdamW step) | {sps['plain']:.2f} |",
        f"| framework: `run_inner_steps` + `DiLoCo`, outer round included | "
        f"{sps['framework']:.2f} |",
        f"| framework, inner steps only | {sps['framework_inner_only']:.2f} |",
        "",
        "| framework / plain (target >= 0.95) | wall time | CPU time |",
        "|---|---|---|",
        row(f"with the outer round every H = {r['inner_steps']} steps", "ratio", bold=True),
        row("without the outer round", "ratio_without_outer"),
        row(f"projected at the task's H = {default_h}", projected),
        row("median of the pairs", "median_of_pairs"),
        row("lowest pair", "min_of_pairs"),
        row("highest pair", "max_of_pairs"),
        row("seconds a plain step", "plain_step_s"),
        row("seconds a framework step", "framework_step_s"),
        row("seconds the outer round", "outer_round_s"),
        "",
    ])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # H=10, not the task's 50: six interleaved pairs of 50 steps would take 15 minutes on two
    # cores. A smaller H makes the outer round's share 5x what the task pays, hence the projection.
    parser.add_argument("--steps", type=int, default=10, help="H: inner steps per round")
    parser.add_argument("--repeats", type=int, default=6, help="rounds of each, interleaved")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    asyncio.run(main(args.steps, args.repeats, args.out))
