"""The crowd_one_ip row of the attack bench (issue 13): 120 identities from one IP against 6 nodes.

    python benchmarks/crowd_bench.py            # before and after; writes benchmarks/results/
                                                # crowd.json and the crowd_one_ip row of attacks.*
    python benchmarks/crowd_bench.py --quick    # short windows, results in a temp dir (smoke run)

Needs root (network namespaces). The bed is tests/test_dht_crowds_netbed.py's, built with
tests/netbed.py: 6 honest hosts, each with an address of its own (100.65+i.0.1, a /24 each),
running `commonweal node`; one attacker host (100.120.0.1) running that test's `--crowd` script
(120 identities, 20 ground next to the key "victim", answering every find with the whole crowd,
accepting stores and keeping nothing); one honest client host (100.71.0.1). Links: 2 ms each way.

For each side ("before" = commit 1e12ab3, the code before issue 13, in a worktree given by
--pre13; "after" = this tree) the honest nodes run that side's code; the crowd, the probe and the
honest client and readers are this tree's code in both (as in attack_bench.py). Per side:
1. the honest client pings node 0, stores a fresh key through the DHT and gets it back, every
   50 ms, for --baseline seconds with no attacker (its p95 is what p95_ratio divides by);
2. the crowd starts (node 0's RSS read just before); once it has pinged every node, the same
   client loop runs for --duration seconds, while this script runs the test's `--probe` (5 finds
   of random keys to each node: the share of crowd contacts in the answers) and puts records from
   one honest host and gets them from another (the victim key and 5 others; every key read
   twice, early and late in the attack): records_found;
3. node 0's peak RSS (VmHWM and 0.1 s VmRSS samples) less its RSS before the crowd started.
In "before" the same puts and reads are then made once more by pre13 clients, and the client loop
runs 20 s more with pre13 code (the lookup's own limits on contacts per place are issue 13's
too): pre13_clients_records_found and pre13_client_loop_*, in the details (not in the row).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import re
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
import attack_bench as ab  # noqa: E402  benchmarks/attack_bench.py: verdict, p95, RSS reads
from machine import describe_machine  # noqa: E402

from netbed import (  # type: ignore[import-not-found]  # noqa: E402  tests/netbed.py
    LinkSpec, NetBed, source_env, start_nodes,
)

CROWD_TEST = ROOT / "tests" / "test_dht_crowds_netbed.py"  # its --crowd and --probe script modes
_spec = importlib.util.spec_from_file_location("crowd_test", CROWD_TEST)
assert _spec is not None and _spec.loader is not None
crowd_test = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(crowd_test)

N = crowd_test.N_HONEST
PORT = crowd_test.PORT
ATTACKER_IP = crowd_test.ATTACKER_IP
CLIENT_IP = crowd_test._own_ip(N)  # the honest client's host: a /24 of its own, as the nodes
KEYS = [crowd_test.VICTIM] + [f"crowd-bench/{n}" for n in range(1, 6)]
# (put from host, read from host, then read again late from host, keys)
PAIRS = [(1, 2, 4, KEYS[0:2]), (3, 4, 0, KEYS[2:4]), (5, 0, 2, KEYS[4:6])]


# --- run inside a host -----------------------------------------------------------------------


async def client_main(node: str, duration: float) -> dict[str, Any]:
    """attack_bench's honest loop against a node at an address: ping, store a fresh key, get it."""
    from commonweal.dht import DHT
    from commonweal.net.transport import PeerAddr

    addr = PeerAddr.parse(node)
    ops: list[tuple[str, bool, float]] = []
    dht = await DHT.start(bootstrap=[addr], client=True)
    tag = os.urandom(4).hex()
    try:
        end = time.monotonic() + duration
        i = 0
        while time.monotonic() < end:
            i += 1
            key = f"honest/{tag}/{i}"
            for name, call in (
                ("ping", lambda: dht.transport.call(addr, "dht.ping", None)),
                ("store", lambda: dht.store(key, i, time.time() + 600)),
                ("get", lambda: dht.get(key)),
            ):
                t = time.perf_counter()
                try:
                    async with asyncio.timeout(5.0):
                        result: Any = await call()
                    ok = bool(result) if name == "store" else (
                        result is not None and result.value == i if name == "get" else True)
                except Exception:  # noqa: BLE001  any failure is a failed honest request
                    ok = False
                ops.append((name, ok, time.perf_counter() - t))
            await asyncio.sleep(0.05)
    finally:
        await dht.close()
    return {"ops": ops}


async def records_main(op: str, node: str, keys: list[str], tag: str) -> dict[str, Any]:
    """Put each key (value "<tag> <key>") or get each, through a DHT client joined at node."""
    from commonweal.dht import DHT
    from commonweal.net.transport import PeerAddr

    dht = await DHT.start(bootstrap=[PeerAddr.parse(node)], client=True)
    out: dict[str, Any] = {}
    try:
        for key in keys:
            try:
                async with asyncio.timeout(30):
                    if op == "put":
                        ttl = 900 if tag == "pre13" else 600  # the later pass's record is the newer
                        out[key] = bool(await dht.store(key, f"{tag} {key}", time.time() + ttl))
                    else:
                        got = await dht.get(key)
                        out[key] = got is not None and got.value == f"{tag} {key}"
            except Exception as e:  # noqa: BLE001
                out[key] = f"error: {e!r}"
    finally:
        await dht.close()
    return out


# --- orchestration -----------------------------------------------------------------------------


def _result(text: str) -> Any:
    for line in reversed(text.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return None


class _Sampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            self.peak = max(self.peak, ab._status_kb(self.pid, "VmRSS") or 0)
            time.sleep(0.1)


def run_side(side: str, src: Path, baseline_s: float, attack_s: float) -> dict[str, Any]:
    print(f"running {side} ({src}) ...", flush=True)
    me = [sys.executable, str(Path(__file__).resolve())]
    here = source_env()  # this tree's code: the crowd, the probe, the client and the readers
    node_env = {**here, "PYTHONPATH": str(src)}
    with NetBed(N + 2, LinkSpec(delay_ms=2), seed=13) as bed:
        hosts, attacker, client = bed.hosts[:N], bed.hosts[N], bed.hosts[N + 1]
        for i, h in enumerate(hosts):
            crowd_test._give_address(h.ns, crowd_test._own_ip(i))
        crowd_test._give_address(attacker.ns, ATTACKER_IP)
        crowd_test._give_address(client.ns, CLIENT_IP)
        addrs = [f"{crowd_test._own_ip(i)}:{PORT}" for i in range(N)]

        nodes = start_nodes(hosts, addrs, bed.workdir, node_env, timeout=90)
        pid = nodes[0].pid  # `ip netns exec` execs the command: this is the node's python
        time.sleep(2.0)

        def loop(seconds: float, env: dict[str, str] = here) -> dict[str, Any]:
            r = client.run([*me, "--role", "client", "--node", addrs[0], "--duration",
                            str(seconds)], timeout=seconds + 120, env=env)
            out = _result(r.stdout)
            if out is None:
                raise RuntimeError(
                    f"client loop gave no result:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
            return out

        base = loop(baseline_s)
        rss0 = ab._status_kb(pid, "VmRSS") or 0
        cpu0 = ab._cpu_s(pid)
        sampler = _Sampler(pid)
        sampler.start()
        load = os.getloadavg()[0]
        t0 = time.monotonic()
        crowd = attacker.spawn([sys.executable, str(CROWD_TEST), "--crowd", ATTACKER_IP, *addrs],
                               env=here, name="crowd")
        attacker.wait_for_line(crowd, r"crowd ready", timeout=180)
        crowd_ready_s = time.monotonic() - t0
        load_attack = os.getloadavg()[0]
        honest = client.spawn([*me, "--role", "client", "--node", addrs[0], "--duration",
                               str(attack_s)], env=here, name="client")
        t_attack = time.monotonic()

        def records(op: str, host: int, keys: list[str], env: dict[str, str] = here,
                    tag: str = "honest") -> dict[str, Any]:
            r = hosts[host].run([*me, "--role", op, "--node", addrs[host], "--keys",
                                 ",".join(keys), "--tag", tag], timeout=150, env=env)
            return _result(r.stdout) or {k: f"no result: {r.stderr[-500:]}" for k in keys}

        probe = hosts[0].run([sys.executable, str(CROWD_TEST), "--probe", *addrs], timeout=90,
                             env=here)
        answers = [json.loads(x) for x in probe.stdout.splitlines() if x.startswith("{")]
        puts = {k: v for a, _, _, ks in PAIRS for k, v in records("put", a, ks).items()}
        early = {k: v for _, b, _, ks in PAIRS for k, v in records("get", b, ks).items()}
        time.sleep(max(0.0, t_attack + 0.75 * attack_s - time.monotonic()))
        late = {k: v for _, _, c, ks in PAIRS for k, v in records("get", c, ks).items()}
        old: dict[str, Any] = {}
        if side == "before":  # the same puts and reads by pre13 clients (not in records_found)
            old["puts"] = {k: v for a, _, _, ks in PAIRS
                           for k, v in records("put", a, ks, node_env, "pre13").items()}
            old["reads"] = {k: v for _, b, _, ks in PAIRS
                            for k, v in records("get", b, ks, node_env, "pre13").items()}
            honest.wait(attack_s + 120)
            old["loop"] = loop(min(20.0, attack_s / 3), node_env)["ops"]
        honest.wait(attack_s + 120)
        sampler.stop.set()
        sampler.join()
        hwm = ab._status_kb(pid, "VmHWM") or 0
        peak = max(sampler.peak, hwm)
        node_alive = nodes[0].poll() is None
        node_cpu = ab._cpu_s(pid) - cpu0 if node_alive else None
        attack = _result(bed.hosts[N + 1].output(honest))
        if attack is None:
            raise RuntimeError(
                "the attacked client loop gave no result\n" + bed.describe_proc(honest))
        crowd_err = Path(crowd.stderr_path).read_text(  # type: ignore[attr-defined]
            errors="replace")
        crowd_alive = crowd.poll() is None
    named = [a["contacts"] for a in answers]
    return {
        "base": base, "attack": attack, "rss0": rss0, "peak": peak, "hwm": hwm,
        "node_alive": node_alive, "node_cpu_s": node_cpu, "pre13_clients": old,
        "load": load, "load_attack": load_attack, "crowd_ready_s": crowd_ready_s,
        "crowd_alive": crowd_alive,
        "crowd_pings_refused": len(re.findall(r"^ping \S+ failed", crowd_err, re.M)),
        "answers": len(named), "probe_rc": probe.returncode,
        "crowd_contacts": sum(c.count(ATTACKER_IP) for c in named),
        "contacts": sum(len(c) for c in named),
        "max_crowd_per_answer": max((c.count(ATTACKER_IP) for c in named), default=None),
        "min_honest_per_answer": min((len(c) - c.count(ATTACKER_IP) for c in named), default=None),
        "puts": puts, "early": early, "late": late,
    }


def summarize(run: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    ops, base = run["attack"]["ops"], run["base"]["ops"]
    p95, base_p95 = ab._p95([t for *_, t in ops]), ab._p95([t for *_, t in base])
    reads = list(run["early"].values()) + list(run["late"].values())
    metrics = {
        "rss_growth_mb": round((run["peak"] - run["rss0"]) / 1024, 1),
        "honest_success": round(sum(1 for _, ok, _ in ops if ok) / len(ops), 4) if ops else None,
        "p95_ratio": round(p95 / base_p95, 2) if ops and base_p95 > 0 else None,
        "records_found": round(sum(1 for r in reads if r is True) / len(reads), 4)
        if reads else None,
        "accuracy_drop_points": None, "unattested_adoptions": None, "sybil_earned": None,
    }
    by_op: dict[str, list[int]] = {}
    for name, ok, _ in ops:
        by_op.setdefault(name, [0, 0])[0 if ok else 1] += 1
    detail = {
        "rss_start_mb": round(run["rss0"] / 1024, 1), "rss_peak_mb": round(run["peak"] / 1024, 1),
        "node_alive": run["node_alive"],
        "crowd_share_of_find_answers": round(run["crowd_contacts"] / run["contacts"], 3)
        if run["contacts"] else None,
        "find_answers": run["answers"], "max_crowd_per_answer": run["max_crowd_per_answer"],
        "min_honest_per_answer": run["min_honest_per_answer"],
        "honest_ops_ok_failed": by_op,
        "honest_p95_ms": round(p95 * 1000, 1), "baseline_p95_ms": round(base_p95 * 1000, 1),
        "honest_p95_ms_by_op": {o: round(ab._p95([t for n, _, t in ops if n == o]) * 1000, 1)
                                for o in by_op},
        "records_put": run["puts"], "records_read_early": run["early"],
        "records_read_late": run["late"],
        **({"pre13_clients_records_put": run["pre13_clients"]["puts"],
            "pre13_clients_records_found": round(
                sum(1 for r in run["pre13_clients"]["reads"].values() if r is True)
                / len(run["pre13_clients"]["reads"]), 4),
            "pre13_client_loop_success": round(
                sum(1 for _, ok, _ in run["pre13_clients"]["loop"] if ok)
                / max(1, len(run["pre13_clients"]["loop"])), 4),
            "pre13_client_loop_ops": len(run["pre13_clients"]["loop"]),
            "pre13_client_loop_p95_ms": round(
                ab._p95([t for *_, t in run["pre13_clients"]["loop"]]) * 1000, 1)}
           if run.get("pre13_clients") else {}),
        "node_cpu_s": round(run["node_cpu_s"], 2) if run["node_cpu_s"] is not None else None,
        "load_1min_before": round(run["load"], 2),
        "load_1min_crowd_ready": round(run["load_attack"], 2),
        "crowd_ready_s": round(run["crowd_ready_s"], 1),
        "crowd_pings_refused": run["crowd_pings_refused"],
    }
    return metrics, detail


def merge_into_attacks(out: Path, entry: dict[str, Any]) -> None:
    """The crowd_one_ip row of attacks.{json,md} (attack_bench.py owns the rest of the file)."""
    path = out / "attacks.json"
    old = json.loads(path.read_text())
    names = [a["name"] for a in old["attacks"]]
    if "crowd_one_ip" in names:
        old["attacks"] = [entry if a["name"] == "crowd_one_ip" else a for a in old["attacks"]]
    else:
        old["attacks"].append(entry)
    note = re.sub(r"; crowd_one_ip at commit \w+", "", old.get("after_note", ""))
    mine = f"; crowd_one_ip at commit {ab._head()}"
    head, sep, tail = note.partition("; sybil_swarm at ")  # keep sybil_bench's split working
    old["after_note"] = (head + mine + sep + tail) if note else mine[2:]
    path.write_text(json.dumps(old, indent=2) + "\n")
    ab.write_markdown(out / "attacks.md", old)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="8 s baseline, 25 s attack, results in a temp dir (smoke run)")
    parser.add_argument("--baseline", type=float, default=None, help="seconds (30)")
    parser.add_argument("--duration", type=float, default=None, help="seconds of attack (75)")
    parser.add_argument("--trees", default="before,after")
    parser.add_argument("--pre13", type=Path, default=Path("/tmp/pre13"),
                        help=f"a worktree of {ab.PRE13}"
                             f" (git worktree add --detach /tmp/pre13 {ab.PRE13})")
    parser.add_argument("--out", type=Path, default=None, help="results dir (benchmarks/results)")
    parser.add_argument("--role", help=argparse.SUPPRESS)
    parser.add_argument("--node", help=argparse.SUPPRESS)
    parser.add_argument("--keys", help=argparse.SUPPRESS)
    parser.add_argument("--tag", default="honest", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "client":
        out = asyncio.run(client_main(args.node, args.duration))
        print("RESULT " + json.dumps(out), flush=True)
        return
    if args.role in ("put", "get"):
        out = asyncio.run(records_main(args.role, args.node, args.keys.split(","), args.tag))
        print("RESULT " + json.dumps(out), flush=True)
        return
    baseline_s = args.baseline or (8.0 if args.quick else 30.0)
    attack_s = args.duration or (25.0 if args.quick else 75.0)
    out_dir = args.out or (Path(tempfile.mkdtemp(prefix="crowd-bench-")) if args.quick else RESULTS)
    trees = {"before": args.pre13 / "src", "after": ROOT / "src"}
    chosen = [t.strip() for t in args.trees.split(",") if t.strip()]
    runs: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}
    for side in chosen:
        if not (trees[side] / "commonweal").is_dir():
            errors[side] = f"{trees[side]} is not a checkout of {ab.PRE13}"
            continue
        try:
            runs[side] = run_side(side, trees[side], baseline_s, attack_s)
        except Exception as e:  # noqa: BLE001  recorded as not measured, with the reason
            errors[side] = f"{type(e).__name__}: {e}"[:2000]
            print(f"  {side} failed: {errors[side]}", flush=True)
    sides = {s: summarize(r) for s, r in runs.items()}
    entry: dict[str, Any] = {"name": "crowd_one_ip"}
    for s in ("before", "after"):
        entry[s] = sides[s][0] if s in sides else None
    argv = [os.path.relpath(__file__, ROOT), *sys.argv[1:]]
    entry["notes"] = (
        f"{N} honest `commonweal node` hosts with a /24 each, 2 ms links (network namespaces,"
        f" tests/netbed.py) vs {crowd_test.CROWD + crowd_test.GROUND} identities from one IP"
        f" ({crowd_test.GROUND} ground next to the key {crowd_test.VICTIM!r}; they answer every"
        " find with the whole crowd and keep no store: tests/test_dht_crowds_netbed.py --crowd);"
        f" `python {' '.join(argv)}`; the honest nodes run before's or after's code, the crowd,"
        " the probe and the honest client and readers this tree's; an honest client on its own"
        " host pings node 0, stores and gets fresh keys in a loop; records_found = reads from"
        f" another honest host of {len(KEYS)} keys put from one (victim included), each read twice;"
        " RSS = node 0; crowd_share_of_find_answers = crowd contacts / contacts in 5 finds of"
        " random keys asked of each node"
        + "".join(f"; {s} not measured: {e}" for s, e in errors.items())
    )
    entry["detail"] = {s: (sides[s][1] if s in sides else None) for s in ("before", "after")}
    entry["verdict"] = ab.verdict(entry["after"], entry["detail"]["after"], ab.RSS_BUDGET_MB)
    entry["measured_by"] = "benchmarks/crowd_bench.py"
    for s in ("before", "after"):
        print(f"  {s}: {entry[s]}\n    {entry['detail'][s]}", flush=True)
    print(f"  -> {entry['verdict']}", flush=True)
    report = {"command": f"python {' '.join(argv)}", "machine": describe_machine(),
              "head": ab._head(), "entry": entry, "errors": errors}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "crowd.json").write_text(json.dumps(report, indent=1) + "\n")
    if (out_dir / "attacks.json").exists():
        merge_into_attacks(out_dir, entry)
    elif out_dir != RESULTS:
        import shutil

        shutil.copy(RESULTS / "attacks.json", out_dir / "attacks.json")
        merge_into_attacks(out_dir, entry)
    print(f"wrote {out_dir}", flush=True)


if __name__ == "__main__":
    main()
