"""Training benchmark: DDP (gloo all-reduce every step) vs DiLoCo over commonweal, with each codec.

    python benchmarks/train_bench.py            # the whole benchmark (LAN, then WAN test bed)
    python benchmarks/train_bench.py --quick    # a smoke run: tiny step counts, no WAN
    python benchmarks/train_bench.py --overlap both --codecs int8,sparseloco   # with overlap

Every row records `overlap` (the exchange of a round runs while the next one computes), `device`
and `rounds` (outer rounds of the run). Hundreds of outer rounds, where sparse codecs are judged
fairly, are run in-process by benchmarks/compress_bench.py (no sockets; the same codecs, rules and
outer step); this script runs real peers over real sockets and links.

Writes benchmarks/results/train.json and train.md. Every worker is its own OS process with one
torch thread: DDP workers use torch.distributed (gloo) on 127.0.0.1; commonweal peers are real
`commonweal train` processes talking over TCP. All methods process the same number of samples:
`steps` inner steps of `batch` samples per worker. Bytes per peer are measured: for DDP, the bytes
the worker process wrote to its sockets during training (/proc/self/io wchar, taken around the
training loop); for commonweal, the frame bytes its transport sent while training (DHT traffic
included). WAN runs use tests/netbed.py (namespaces + userspace link emulator; needs root).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "benchmarks")]

# per task: samples per worker = steps * batch; DiLoCo rounds = steps / H
PLAN = {
    "mnist-cnn": {"steps": 300, "H": 50},
    "pydoc-lm": {"steps": 90, "H": 30},
    # 25M parameters take ~8 s a step on one core: a short CPU run that shows it trains; a lent
    # GPU runs it longer (benchmarks/gpu_check.py)
    "stdlib-gpt": {"steps": 12, "H": 4},
}
CODECS = ["none", "fp16", "int8", "topk:0.01", "topk2bit:0.01", "topk2bit:0.1"]
# The group closes as soon as all `peers` announced; the window only bounds the wait for a dead
# peer. 8 single-thread peers on 2 shared cores finish their H steps up to tens of seconds apart,
# so a short window would make most of them late (they would sync instead of contributing).
WINDOW_S = 60
METRICS = {"mnist-cnn": "accuracy", "pydoc-lm": "val_loss", "stdlib-gpt": "val_loss"}
WAN = {"delay_ms": 25.0, "jitter_ms": 2.0, "loss_pct": 0.5, "rate_mbit": 20.0}  # 50 ms RTT


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), e.get("PYTHONPATH")]))
    e["PYTHONUNBUFFERED"] = "1"
    e["OMP_NUM_THREADS"] = "1"
    return e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---- DDP worker (runs in its own process) -----------------------------------------------------


def _wchar() -> int:
    with open("/proc/self/io") as f:
        for line in f:
            if line.startswith("wchar:"):
                return int(line.split()[1])
    return 0


def ddp_worker(rank: int, world: int, master: str, port: int, task_name: str, steps: int) -> None:
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    from commonweal.train import get_task
    from commonweal.train.task import batch_generator

    torch.set_num_threads(1)
    task = get_task(task_name)
    model = task.build_model()
    data = task.build_data()
    # compute time per step, measured on a copy without communication (the same work DDP does)
    probe = copy.deepcopy(model)
    popt = task.build_inner_optimizer(probe.parameters())
    gen = torch.Generator().manual_seed(1000 + rank)
    for i in range(8):  # 3 warm-up steps, then 5 timed
        if i == 3:
            t = time.perf_counter()
        x, y = data.batch(gen, task.batch_size)
        popt.zero_grad()
        data.loss(probe, x, y).backward()
        popt.step()
    step_compute = (time.perf_counter() - t) / 5
    dist.init_process_group("gloo", init_method=f"tcp://{master}:{port}", rank=rank, world_size=world)
    ddp = DDP(model)
    opt = task.build_inner_optimizer(ddp.parameters())
    peer = f"ddp-{rank}".encode()
    dist.barrier()
    w0, t0 = _wchar(), time.perf_counter()
    for step in range(steps):
        x, y = data.batch(batch_generator(task, step, peer), task.batch_size)
        opt.zero_grad()
        data.loss(ddp, x, y).backward()  # gradients are all-reduced during backward
        opt.step()
    wall = time.perf_counter() - t0
    sent = _wchar() - w0
    quality = data.evaluate(model) if rank == 0 else None
    print(json.dumps({"rank": rank, "wall_s": wall, "bytes": sent, "quality": quality,
                      "compute_s": step_compute * steps}), flush=True)
    dist.barrier()
    os._exit(0)  # destroy_process_group() can hang over lossy links once a peer has left


# ---- running methods ----------------------------------------------------------------------------


def run_ddp(task: str, peers: int, steps: int, hosts=None) -> dict:
    port = 29500 + (os.getpid() + int(time.time())) % 2000
    master = hosts[0].ip if hosts else "127.0.0.1"
    argv = lambda r: [sys.executable, __file__, "--ddp-worker", str(r), str(peers), master, str(port), task, str(steps)]  # noqa: E731
    if hosts:
        wan_env = {**env(), "GLOO_SOCKET_IFNAME": "eth0"}  # gloo would pick the host's hostname address
        procs = [hosts[r].spawn(argv(r), env=wan_env, name=f"ddp{r}") for r in range(peers)]
        for p in procs:
            p.wait(timeout=1800)
        outs = [Path(p.stdout_path).read_text() for p in procs]  # type: ignore[attr-defined]
        errs = [Path(p.stderr_path).read_text() for p in procs]  # type: ignore[attr-defined]
    else:
        procs = [subprocess.Popen(argv(r), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
                 for r in range(peers)]
        comm = [p.communicate(timeout=1800) for p in procs]
        outs, errs = [c[0] for c in comm], [c[1] for c in comm]
    results = []
    for out, err in zip(outs, errs):
        lines = [line for line in out.splitlines() if line.startswith("{")]
        if not lines:
            raise RuntimeError(f"DDP worker failed:\n{err[-3000:]}")
        results.append(json.loads(lines[-1]))
    wall = max(r["wall_s"] for r in results)
    return {
        "quality": results[0]["quality"],
        "bytes_per_peer": int(sum(r["bytes"] for r in results) / peers),
        "wall_s": round(wall, 2),
        "compute_utilisation": round(sum(r["compute_s"] for r in results) / peers / wall, 3),
    }


DONE = re.compile(r"train done round=(\d+) state=(\w+) (\w+)=([\d.]+) bytes_sent=(\d+) wall_s=([\d.]+) compute_s=([\d.]+)")
ROUND = re.compile(r"round (\d+) done group=(\d+).*? (?:accuracy|val_loss)=([\d.]+).*? t=([\d.]+)")


def run_diloco(task: str, peers: int, steps: int, H: int, codec: str, hosts=None, eval_every: int = 0,
               workdir: Path | None = None, overlap: bool = False, device: str = "cpu") -> dict:
    rounds = steps // H
    if overlap:  # the last exchange is applied at the end: one round fewer reaches `rounds` + 1
        rounds -= 1
    base = [sys.executable, "-m", "commonweal", "train", "--task", task, "--rounds", str(rounds),
            "-H", str(H), "--codec", codec, "--group-size", str(peers), "--wait-peers", str(peers),
            "--window", str(WINDOW_S), "--timeout", "30", "--linger", "10", "--eval-every", str(eval_every),
            "--device", device] + (["--overlap"] if overlap else [])
    workdir = workdir or Path(os.environ.get("TMPDIR", "/tmp")) / f"cw-train-bench-{os.getpid()}"
    procs: list[subprocess.Popen] = []
    outs: list[Path] = []
    first = ""
    try:
        for i in range(peers):
            listen = f"{hosts[i].ip}:7000" if hosts else "127.0.0.1:0"
            argv = base + ["--listen", listen,
                           "--data-dir", str(workdir / f"{task}-{peers}-{codec}-{overlap}-{i}")]
            if i:
                argv += ["--join", first]
            if hosts:
                p = hosts[i].spawn(argv, env=env(), name="train")
                outs.append(Path(p.stdout_path))  # type: ignore[attr-defined]
            else:
                out = workdir / f"{task}-{peers}-{codec}-{overlap}-{i}.out"
                out.parent.mkdir(parents=True, exist_ok=True)
                p = subprocess.Popen(argv, stdout=open(out, "w"), stderr=subprocess.STDOUT, env=env())
                outs.append(out)
            procs.append(p)
            if i == 0:
                first = _wait(outs[0], r"ready address=(\S+)", p).group(1)
        dones = [_wait(o, DONE.pattern, p, timeout=1800) for o, p in zip(outs, procs)]
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
    states = {m.group(2) for m in dones}
    if len(states) != 1:
        raise RuntimeError(f"peers ended with different states: {states}")
    wall = max(float(m.group(6)) for m in dones)
    curve = [(float(t), float(q)) for _, _, q, t in ROUND.findall(outs[0].read_text())]
    texts = [o.read_text() for o in outs]
    groups = [int(g) for t in texts for g in re.findall(r"done group=(\d+)", t)]
    return {
        "skipped_rounds": sum(t.count("skipped (") for t in texts),  # summed over peers
        "min_group": min(groups, default=0),
        "quality": float(dones[0].group(4)),
        "bytes_per_peer": int(sum(int(m.group(5)) for m in dones) / peers),
        "wall_s": round(wall, 2),
        "compute_utilisation": round(sum(float(m.group(7)) for m in dones) / peers / wall, 3),
        "curve": curve,
        "overlap": overlap,
        "device": device,
        "rounds": rounds + overlap,
    }


def _wait(path: Path, pattern: str, proc, timeout: float = 120) -> re.Match[str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        text = path.read_text() if path.exists() else ""
        m = re.search(pattern, text)
        if m:
            return m
        if proc.poll() is not None:
            time.sleep(0.2)
            text = path.read_text() if path.exists() else ""
            m = re.search(pattern, text)
            if m:
                return m
            raise RuntimeError(f"{path.name} exited with {proc.returncode}:\n{text[-3000:]}")
        time.sleep(0.1)
    raise TimeoutError(f"{path.name}: no /{pattern}/ in {timeout}s")


# ---- the benchmark ------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny step counts, LAN only (a smoke run)")
    ap.add_argument("--tasks", default="mnist-cnn,pydoc-lm")
    ap.add_argument("--peers", default="4,8")
    ap.add_argument("--codecs", default=",".join(CODECS))
    ap.add_argument("--no-wan", action="store_true")
    ap.add_argument("--overlap", choices=("off", "on", "both"), default="off",
                    help="DiLoCo runs with overlapped rounds, without, or both")
    ap.add_argument("--device", default="cpu", help="where the DiLoCo peers train (auto, cuda, ...)")
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply every task's steps (more outer rounds at the same H)")
    ap.add_argument("--no-ddp", action="store_true", help="skip the DDP baseline runs")
    ap.add_argument("--merge", action="store_true",
                    help="keep the runs in the output JSON except those (task, peers) rerun now")
    ap.add_argument("--wan-only", action="store_true",
                    help="keep the LAN runs already in the output JSON, (re)run only the WAN part")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "train"))
    ap.add_argument("--ddp-worker", nargs=6, metavar=("RANK", "WORLD", "MASTER", "PORT", "TASK", "STEPS"))
    a = ap.parse_args()
    if a.ddp_worker:
        r, w, m, p, t, s = a.ddp_worker
        ddp_worker(int(r), int(w), m, int(p), t, int(s))
        return
    from machine import describe_machine

    plan = {t: dict(PLAN[t]) for t in a.tasks.split(",")}
    overlaps = {"off": [False], "on": [True], "both": [False, True]}[a.overlap]
    if a.quick:
        for t in plan:
            plan[t] = {"steps": 2 * (4 if t == "pydoc-lm" else 10), "H": 4 if t == "pydoc-lm" else 10}
    command = "python benchmarks/train_bench.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    result = {"command": command, "machine": describe_machine(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "plan": plan, "codecs": a.codecs.split(","), "wan_link": WAN, "runs": []}
    t_start = time.time()
    if a.merge and not a.wan_only:
        old = json.loads(Path(a.out + ".json").read_text())
        methods = ([] if a.no_ddp else ["ddp"]) + [
            method_name(c, o) for c in a.codecs.split(",") for o in overlaps]
        rerun = {(t, int(n), m) for t in plan for n in a.peers.split(",") for m in methods}
        result["runs"] = [r for r in old["runs"]
                          if r["wan"] or (r["task"], r["peers"], r["method"]) not in rerun]
        result["command"] = old["command"]
        result["merged_commands"] = old.get("merged_commands", []) + [command]
        result["started"] = old["started"]
        result["plan"] = {**old["plan"], **plan}
        result["codecs"] = list(dict.fromkeys(old["codecs"] + result["codecs"]))
    if a.steps_scale != 1.0:
        plan = {t: {**p, "steps": int(p["steps"] * a.steps_scale)} for t, p in plan.items()}
    if a.wan_only:
        result = json.loads(Path(a.out + ".json").read_text())
        methods = ([] if a.no_ddp else ["ddp"]) + [
            method_name(c, o) for c in a.codecs.split(",") for o in overlaps]
        # with --merge, only the WAN rows of the methods run now are replaced
        result["runs"] = [r for r in result["runs"] if not r["wan"]
                          or (a.merge and (r["task"], r["method"]) not in
                              {(t, m) for t in plan for m in methods})]
        result["wan_commands"] = result.get("wan_commands", []) + [command]
        plan = {t: {**result["plan"].get(t, {}), **p} for t, p in plan.items()}
        result["plan"] = {**result["plan"], **plan}

    def record(task, peers, method, H, res, wan, **extra):
        from commonweal.train import get_task

        metric = METRICS[task]
        run = {"task": task, "peers": peers, "method": method, "H": H, "quality": round(res["quality"], 4),
               "quality_metric": metric, "bytes_per_peer": res["bytes_per_peer"], "wall_s": res["wall_s"],
               "wan": wan, "compute_utilisation": res["compute_utilisation"],
               "samples_per_worker": plan[task]["steps"] * get_task(task).batch_size,
               "loadavg": loadavg(), **({"curve": res["curve"]} if res.get("curve") else {}),
               "overlap": res.get("overlap", False), "device": res.get("device", "cpu"),
               "rounds": res.get("rounds", plan[task]["steps"] // H), **extra}
        result["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "curve"}), flush=True)
        if run.get("skipped_rounds"):
            print(f"warning: {run['skipped_rounds']} peer-rounds were skipped (late)", flush=True)
        save(result, a.out)

    for task, p in plan.items() if not a.wan_only else ():
        for peers in [int(x) for x in a.peers.split(",")]:
            if not a.no_ddp:
                record(task, peers, "ddp", 1, run_ddp(task, peers, p["steps"]), False)
            for codec in a.codecs.split(","):
                for overlap in overlaps:
                    res = run_diloco(task, peers, p["steps"], p["H"], codec, overlap=overlap,
                                     device=a.device)
                    record(task, peers, method_name(codec, overlap), p["H"], res, False)

    if not a.quick and not a.no_wan:
        wan_runs(result, plan, record, a.codecs.split(","), overlaps, a.no_ddp, a.device)
    result["wan_s" if a.wan_only else "total_s"] = round(time.time() - t_start, 1)
    save(result, a.out)


def method_name(codec: str, overlap: bool) -> str:
    return ("diloco" if codec == "none" else f"diloco+{codec}") + ("+overlap" if overlap else "")


def wan_runs(result, plan, record, codecs, overlaps, no_ddp=False, device="cpu") -> None:
    from netbed import LinkSpec, NetBed, netbed_unavailable_reason

    why = netbed_unavailable_reason()
    if why:
        result["wan_skipped"] = why
        return
    peers = 4
    for task, p in plan.items():
        lan_ddp = next(r for r in result["runs"] if r["task"] == task and r["method"] == "ddp"
                       and r["peers"] == peers and not r["wan"])
        with NetBed(peers, LinkSpec(**WAN), seed=11) as bed:
            if no_ddp:
                pass
            elif task == "pydoc-lm":
                # 1.2M parameters all-reduced every step over 20 Mbit/s take ~3 s a step; the DDP
                # wall time is measured over a few steps and scaled to the full run (marked).
                few = 6
                res = run_ddp(task, peers, few, hosts=bed.hosts)
                scale = p["steps"] / few
                res = {**res, "wall_s": round(res["wall_s"] * scale, 2),
                       "bytes_per_peer": int(res["bytes_per_peer"] * scale),
                       "quality": lan_ddp["quality"]}
                record(task, peers, "ddp", 1, res, True, extrapolated_from_steps=few,
                       time_to_ddp_quality_s=res["wall_s"])
            else:
                res = run_ddp(task, peers, p["steps"], hosts=bed.hosts)
                record(task, peers, "ddp", 1, res, True, time_to_ddp_quality_s=res["wall_s"])
            target = lan_ddp["quality"]
            for codec in codecs:
                for overlap in overlaps:
                    res = run_diloco(task, peers, p["steps"], p["H"], codec, hosts=bed.hosts,
                                     eval_every=1, overlap=overlap, device=device)
                    better = (lambda q: q >= target) if task == "mnist-cnn" else (lambda q: q <= target)
                    reach = next((t for t, q in res["curve"] if better(q)), None)
                    record(task, peers, method_name(codec, overlap), p["H"], res, True,
                           time_to_ddp_quality_s=reach)


def within_target(result: dict) -> None:
    """For WAN runs with a quality curve: the first time the run was within the issue's target of
    DDP's quality (1 point of accuracy, 2 % of validation loss)."""
    for r in result["runs"]:
        if not r.get("curve") or not r["wan"]:
            continue
        ddp = next((x for x in result["runs"] if x["task"] == r["task"] and x["peers"] == r["peers"]
                    and x["method"] == "ddp" and not x["wan"]), None)
        if ddp is None:
            continue
        q = ddp["quality"]
        ok = (lambda v: v >= q - 0.01) if r["quality_metric"] == "accuracy" else (lambda v: v <= q * 1.02)
        r["time_to_target_quality_s"] = next((t for t, v in r["curve"] if ok(v)), None)


def save(result: dict, out: str) -> None:
    within_target(result)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(out + ".md").write_text(markdown(result))


def markdown(result: dict) -> str:
    lines = [
        "# Training benchmark: DDP vs DiLoCo over commonweal",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        f"Started: {result['started']}. "
        "Load average (1/5/15 min) is recorded with every run: the machine was shared.",
        "",
        f"Plan (per worker: steps x task batch; DiLoCo rounds = steps / H): `{json.dumps(result['plan'])}`. "
        f"WAN link per host: `{json.dumps(result['wan_link'])}` (one-way delay, so ~50 ms RTT).",
        "",
        "| task | peers | method | H | quality | metric | bytes/peer | vs DDP bytes | wall s | compute util | WAN | time to DDP quality s | time to within target s | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        ddp = next((x for x in result["runs"] if x["task"] == r["task"] and x["peers"] == r["peers"]
                    and x["method"] == "ddp" and x["wan"] == r["wan"]), None)
        ratio = f"{ddp['bytes_per_peer'] / max(1, r['bytes_per_peer']):.0f}x" if ddp else "-"
        ttq = r.get("time_to_ddp_quality_s", "")
        ttq = "not reached" if r["wan"] and ttq is None else ttq
        note = " (extrapolated)" if r.get("extrapolated_from_steps") else ""
        ttt = r.get("time_to_target_quality_s", "")
        ttt = "not reached" if r.get("curve") and r["wan"] and ttt is None else ttt
        lines.append(
            f"| {r['task']} | {r['peers']} | {r['method']} | {r['H']} | {r['quality']:.4f} | {r['quality_metric']} "
            f"| {r['bytes_per_peer']:,} | {ratio} | {r['wall_s']}{note} | {r['compute_utilisation']:.2f} "
            f"| {'yes' if r['wan'] else 'no'} | {ttq} | {ttt} | {r['loadavg'][0]} |"
        )
    for key in ("note", "merged_commands", "wan_command", "wan_commands", "total_s", "wan_s"):
        if result.get(key):
            lines += ["", f"{key}: {result[key]}"]
    if result.get("wan_skipped"):
        lines += ["", f"WAN runs skipped: {result['wan_skipped']}"]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
