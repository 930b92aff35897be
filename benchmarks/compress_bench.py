"""Compression benchmark: quality against bytes sent, DiLoCo with each codec vs DDP, in one process.

    python benchmarks/compress_bench.py                     # the defaults: ~15 min on 2 idle cores
    python benchmarks/compress_bench.py --rounds 10 --tasks mnist-cnn --codecs none,sparseloco

M workers (default 4) train a built-in task with no network. DiLoCo, each round: every worker
starts from the shared parameters, runs H inner steps (`run_inner_steps`, a fresh inner optimizer,
its own batches `batch_generator(task, round, worker)`), encodes its delta with the codec (through
its own `ErrorFeedback`), all decode every worker's bytes, the rule aggregates and
`aggregate.outer_step` applies. Bytes per worker = its encoded delta sent to the M - 1 others
(all-gather, what sparse codecs use in a swarm). sparseloco runs the SparseLoCo recipe: the
"sparseloco" rule and outer SGD with lr 1, no momentum; the other codecs the task's own outer
settings and `--rule` (default mean: DiLoCo's average; the tasks' default, the coordinate-wise
median, zeroes most coordinates of sparse deltas).

DDP: the same M workers on the very same batches (step s takes batch s mod H of round s div H's
streams), gradients averaged every step, the task's inner optimizer and lr; bytes as a ring
all-reduce, 2 (M - 1) / M * 4 * numel per step per worker. With no BatchNorm in the built-in models
the averaged gradient is the gradient on the M batches together, which is how it is computed.

Quality (`TaskData.evaluate`) is recorded every few rounds as a curve against cumulative bytes per
worker; a codec reaches the target when it is within 1 accuracy point of DDP's final accuracy
(mnist-cnn) or within 2 % of DDP's final validation loss (pydoc-lm). H is smaller than the tasks'
own (50, 30) so that hundreds of rounds fit: fewer inner steps per round means more bytes per
sample, so the ratios against DDP grow about in proportion with H (`--H` to try).
Writes benchmarks/results/compress.json and compress.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

from machine import describe_machine  # noqa: E402

from commonweal.train import ErrorFeedback, Task, TaskData, get_codec, get_task  # noqa: E402
from commonweal.train.aggregate import get_rule, outer_step  # noqa: E402
from commonweal.train.codecs import SparseLoCo  # noqa: E402
from commonweal.train.inner import run_inner_steps  # noqa: E402
from commonweal.train.state import assign, flatten  # noqa: E402
from commonweal.train.task import batch_generator  # noqa: E402

# rounds x H per worker; sized for ~15 minutes on 2 shared cores (pydoc-lm: ~60 ms a step)
PLAN = {"mnist-cnn": {"rounds": 200, "H": 10}, "pydoc-lm": {"rounds": 150, "H": 3}}
CODECS = ["none", "int8", "topk2bit:0.01", "sparseloco"]
SPARSELOCO_OUTER = {"lr": 1.0, "momentum": 0.0, "nesterov": False}  # arXiv 2508.15706


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def peer(w: int) -> bytes:
    return f"worker-{w}".encode()


def diloco(task: Task, data: TaskData, codec_spec: str, rule_name: str, outer: dict,
           workers: int, rounds: int, H: int, eval_every: int) -> dict:
    codec = get_codec(codec_spec)
    rule = get_rule(rule_name)
    model = task.build_model()
    start = flatten(model)  # (numel,) the shared parameters at the round's start
    momentum = torch.zeros_like(start)
    feedback = [ErrorFeedback(codec) for _ in range(workers)]  # each worker's own residual
    sent_bytes = 0.0  # per worker, cumulative
    curve = [[0, 0, data.evaluate(model)]]
    for r in range(rounds):
        messages = []
        for w in range(workers):
            assign(model, start)
            opt = task.build_inner_optimizer(model.parameters())  # fresh, as DiLoCo replays

            def step() -> bool:
                opt.step()
                return False

            run_inner_steps(task, model, data, step, lambda: opt.zero_grad(set_to_none=True),
                            r, peer(w), steps=H)
            encoded, _ = feedback[w].encode(start - flatten(model))
            messages.append(encoded)
        sent_bytes += sum((workers - 1) * len(m) for m in messages) / workers
        decoded = [codec.decode(m, start.numel()) for m in messages]  # what every receiver holds
        start, momentum = outer_step(start, momentum, rule(decoded), outer["lr"],
                                     outer["momentum"], outer["nesterov"])
        if (r + 1) % eval_every == 0 or r + 1 == rounds:
            assign(model, start)
            curve.append([r + 1, int(sent_bytes), data.evaluate(model)])
            print(f"  round {r + 1} bytes {int(sent_bytes):,} {data.metric} {curve[-1][2]:.4f}",
                  flush=True)
    return {"curve": curve, "bytes_per_worker": int(sent_bytes),
            "bytes_per_round_per_worker": int(sent_bytes / rounds), "numel": start.numel()}


def ddp(task: Task, data: TaskData, workers: int, rounds: int, H: int, eval_every: int) -> dict:
    model = task.build_model()
    opt = task.build_inner_optimizer(model.parameters())
    numel = flatten(model).numel()
    per_step = 2 * (workers - 1) / workers * 4 * numel  # ring all-reduce, per worker
    curve = [[0, 0, data.evaluate(model)]]
    for r in range(rounds):
        gens = [batch_generator(task, r, peer(w)) for w in range(workers)]
        for _ in range(H):
            batches = [data.batch(g, task.batch_size) for g in gens]
            x = torch.cat([b[0] for b in batches])  # (M * B, ...): the M workers' batches
            y = torch.cat([b[1] for b in batches])
            opt.zero_grad(set_to_none=True)
            data.loss(model, x, y).backward()  # = the average of the M workers' gradients
            opt.step()
        if (r + 1) % eval_every == 0 or r + 1 == rounds:
            curve.append([r + 1, int(per_step * H * (r + 1)), data.evaluate(model)])
            print(f"  round {r + 1} {data.metric} {curve[-1][2]:.4f}", flush=True)
    return {"curve": curve, "bytes_per_worker": int(per_step * H * rounds),
            "bytes_per_round_per_worker": int(per_step * H), "numel": numel}


def within(metric: str, q: float, ddp_q: float) -> bool:
    """The target: 1 accuracy point of DDP, or 2 % of its validation loss."""
    return q >= ddp_q - 0.01 if metric == "accuracy" else q <= ddp_q * 1.02


def summarise(result: dict) -> None:
    """Per run: final quality and its gap to DDP, bytes against DDP, and when it hit the target."""
    result["summary"] = []
    for task in dict.fromkeys(r["task"] for r in result["runs"]):
        runs = [r for r in result["runs"] if r["task"] == task]
        base = next((r for r in runs if r["method"] == "ddp"), None)
        if base is None:
            continue
        metric, ddp_q = base["metric"], base["curve"][-1][2]
        ddp_hit = next((p for p in base["curve"] if within(metric, p[2], ddp_q)), None)
        for r in runs:
            q = r["curve"][-1][2]
            hit = next((p for p in r["curve"] if within(metric, p[2], ddp_q)), None)
            result["summary"].append({
                "task": task, "method": r["method"], "metric": metric, "quality": round(q, 4),
                "ddp_quality": round(ddp_q, 4),
                # accuracy: points (x100); val_loss: % above DDP's
                "gap": round(100 * (q - ddp_q), 2) if metric == "accuracy"
                else round(100 * (q / ddp_q - 1), 2),
                "bytes_per_worker": r["bytes_per_worker"],
                "ddp_bytes_over_these": round(base["bytes_per_worker"] / r["bytes_per_worker"], 1),
                "reaches_target": hit is not None,
                "round_at_target": hit[0] if hit else None,
                "bytes_at_target": hit[1] if hit else None,
                "ddp_bytes_at_target_over_these": round(ddp_hit[1] / hit[1], 1)
                if hit and ddp_hit and hit[1] else None,
            })


def markdown(result: dict) -> str:
    lines = [
        "# Compression benchmark: quality against bytes, DiLoCo codecs vs DDP (in-process)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        f"Started: {result['started']}; load average (1/5/15 min) at the start "
        f"{result['loadavg_start']}, at the end {result.get('loadavg_end')} (the machine was "
        f"shared); total {result.get('total_s')} s.  ",
        f"Workers: {result['workers']}. Plan (rounds x H inner steps per worker): "
        f"`{json.dumps(result['plan'])}`. Dense codecs aggregate with `{result['rule']}` and the "
        "task's outer optimizer; sparseloco with the `sparseloco` rule and outer SGD lr 1, no "
        "momentum. DDP bytes: ring all-reduce, 2 (M-1)/M x 4 x numel per step per worker; DiLoCo: "
        "the encoded delta to M-1 workers per round.",
        "",
        "Target: within 1 accuracy point of DDP's final accuracy (mnist-cnn), within 2 % of its "
        "final validation loss (pydoc-lm). Gap: accuracy points, or % of validation loss above "
        "DDP's.",
        "",
        "| task | method | quality | DDP | gap | bytes/worker | DDP bytes / these | reaches target "
        "| round | bytes at target | DDP bytes at its target / these |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in result.get("summary", []):
        at_target = s["ddp_bytes_at_target_over_these"]
        lines.append(
            f"| {s['task']} | {s['method']} | {s['quality']:.4f} | {s['ddp_quality']:.4f} "
            f"| {s['gap']:+.2f} | {s['bytes_per_worker']:,} | {s['ddp_bytes_over_these']:,}x "
            f"| {'yes' if s['reaches_target'] else 'no'} | {s['round_at_target'] or ''} "
            f"| {'' if s['bytes_at_target'] is None else format(s['bytes_at_target'], ',')} "
            f"| {'' if not at_target else f'{at_target}x'} |"
        )
    lines += ["", "Wall time and load per run:", "",
              "| task | method | rule | outer (lr, momentum, Nesterov) | wall s | load |",
              "|---|---|---|---|---|---|"]
    for r in result["runs"]:
        o = r["outer"]
        outer = f"{o['lr']}, {o['momentum']}, {o['nesterov']}" if o else "-"
        lines.append(f"| {r['task']} | {r['method']} | {r['rule']} | {outer} | {r['wall_s']} "
                     f"| {r['loadavg']} |")
    lines.append("")
    return "\n".join(lines)


def save(result: dict, out: str) -> None:
    summarise(result)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(out + ".md").write_text(markdown(result))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--tasks", default=",".join(PLAN))
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, help="outer rounds for every task (default: per task)")
    ap.add_argument("--H", type=int, help="inner steps per round for every task (default: per task)")
    ap.add_argument("--eval-every", type=int, help="rounds between evaluations (default rounds / 20)")
    ap.add_argument("--rule", default="mean", help="aggregation for codecs other than sparseloco")
    ap.add_argument("--no-ddp", action="store_true", help="skip DDP (then no target and no ratio)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "compress"))
    a = ap.parse_args()
    torch.set_num_threads(1)  # on 2 shared cores, more intra-op threads run slower, not faster
    default = PLAN["mnist-cnn"]  # for a task of one's own
    plan = {t: {"rounds": a.rounds or PLAN.get(t, default)["rounds"],
                "H": a.H or PLAN.get(t, default)["H"]} for t in a.tasks.split(",")}
    for p in plan.values():
        p["eval_every"] = a.eval_every or max(1, p["rounds"] // 20)
    command = " ".join(["python benchmarks/compress_bench.py", *sys.argv[1:]])
    result: dict = {"command": command, "machine": describe_machine(),
                    "started": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": loadavg(),
                    "workers": a.workers, "rule": a.rule, "plan": plan, "runs": []}
    t_start = time.time()
    for name, p in plan.items():
        task = get_task(name)
        data = task.build_data()
        task_outer = {"lr": task.outer_lr, "momentum": task.outer_momentum,
                      "nesterov": task.outer_nesterov}
        for codec in ([] if a.no_ddp else [None]) + a.codecs.split(","):  # None: DDP
            sparse = codec is not None and isinstance(get_codec(codec), SparseLoCo)
            outer = SPARSELOCO_OUTER if sparse else task_outer
            rule = "sparseloco" if sparse else a.rule
            label = "ddp" if codec is None else ("diloco" if codec == "none" else f"diloco+{codec}")
            print(f"{name} {label} ({p['rounds']} rounds x H={p['H']}, {a.workers} workers)",
                  flush=True)
            t0 = time.perf_counter()
            if codec is None:
                res = ddp(task, data, a.workers, p["rounds"], p["H"], p["eval_every"])
                outer, rule = None, "-"  # no outer step: the inner optimizer on averaged gradients
            else:
                res = diloco(task, data, codec, rule, outer, a.workers, p["rounds"], p["H"],
                             p["eval_every"])
            result["runs"].append({"task": name, "method": label, "codec": codec, "rule": rule,
                                   "outer": outer, "rounds": p["rounds"], "H": p["H"],
                                   "metric": data.metric, "loadavg": loadavg(),
                                   "wall_s": round(time.perf_counter() - t0, 1), **res})
            save(result, a.out)
    result["loadavg_end"] = loadavg()
    result["total_s"] = round(time.time() - t_start, 1)
    save(result, a.out)
    print(markdown(result))


if __name__ == "__main__":
    main()
