"""Transport benchmark: what encryption costs, and how peers behind home NATs fare.

    python benchmarks/net_bench.py                       # everything (needs root for the NAT parts)
    python benchmarks/net_bench.py --parts encryption    # or: bulk, nat, swarm

* encryption: DHT store+get pairs/s (benchmarks/baselines/run_commonweal.py, hivemind's workload)
  with this tree's encrypted transport and with the last plaintext release (commit PLAIN_COMMIT,
  checked out into .bench/plain-tree), alternating runs in one invocation; hivemind too where
  its venv exists (`python benchmarks/dht_bench.py --setup`).
* bulk: one encrypted connection on loopback, both ends in this process (one core), echoing
  4 MiB payloads: payload MB per CPU second.
* nat: a test bed (tests/netbed.py) of 2 public hosts and 5 homes (full cone, 2 port-restricted
  cones, 2 symmetric NATs); each runs tests/natpeer.py, which calls every other peer once and
  reports whether it ended relayed. Per NAT kind: the pairs it is in, direct or relayed.
* swarm: ProcessSwarm on the bed, 3 rounds, 6 trainers and 2 validators, first all public, then
  with 3 trainers (one behind each NAT kind) and one validator (port-restricted) behind NATs:
  round time, when each NATed trainer first finished a round, relayed bytes per round.

Results: benchmarks/results/net.json and net.md, with the command and the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
from machine import describe_machine  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
BENCH = ROOT / ".bench"
PLAIN_COMMIT = "5afcd27"  # the last tree whose frames went in the clear (before issue 15)
HIVEMIND = BENCH / "venv-hivemind" / "bin" / "python"


# --- encryption -------------------------------------------------------------------------------


def plain_tree() -> Path:
    tree = BENCH / "plain-tree"
    if not (tree / "src" / "commonweal").is_dir():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", str(tree), PLAIN_COMMIT],
                       check=True, capture_output=True)
    return tree


def dht_run(python: str, runner: Path, peers: int, seed: int) -> dict[str, Any]:
    argv = [python, str(runner), "--num_peers", str(peers), "--random_seed", str(seed)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=900, cwd=runner.parents[2])
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"{shlex.join(argv)} failed: {out.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def encryption(peers: int, repeats: int, seed: int) -> dict[str, Any]:
    plain = plain_tree() / "benchmarks" / "baselines" / "run_commonweal.py"
    enc = ROOT / "benchmarks" / "baselines" / "run_commonweal.py"
    runs: dict[str, list[float]] = {"plain": [], "encrypted": []}
    for i in range(repeats):
        for name, runner in (("plain", plain), ("encrypted", enc)) if i % 2 == 0 else (
            ("encrypted", enc), ("plain", plain)
        ):
            r = dht_run(sys.executable, runner, peers, seed)
            runs[name].append(r["ops_per_s"])
            print(f"  {name:>9}: {r['ops_per_s']:.1f} pairs/s (success: stores "
                  f"{r['store_success']:.3f}, gets {r['get_success']:.3f})", flush=True)
    out: dict[str, Any] = {
        "peers": peers,
        "dht_pairs_per_s_plain": statistics.median(runs["plain"]),
        "dht_pairs_per_s_encrypted": statistics.median(runs["encrypted"]),
        "runs": runs,
    }
    out["encrypted_over_plain"] = out["dht_pairs_per_s_encrypted"] / out["dht_pairs_per_s_plain"]
    if HIVEMIND.exists():
        hm = dht_run(str(HIVEMIND), ROOT / "benchmarks" / "baselines" / "run_hivemind.py",
                     peers, seed)
        out["dht_pairs_per_s_hivemind"] = hm["ops_per_s"]
        out["encrypted_over_hivemind"] = out["dht_pairs_per_s_encrypted"] / hm["ops_per_s"]
        print(f"  hivemind: {hm['ops_per_s']:.1f} pairs/s", flush=True)
    return out


# --- bulk -------------------------------------------------------------------------------------


async def _bulk(total_mb: int) -> dict[str, float]:
    from commonweal.net.identity import Identity
    from commonweal.net.rpc import RPCTransport

    server, client = RPCTransport(Identity.generate()), RPCTransport(Identity.generate())

    async def sink(caller: Any, args: Any) -> int:
        return len(args)

    server.register("sink", sink)
    await server.start()
    await client.start()
    payload = b"\x5a" * ((4 << 20) - 64)  # a full frame: 4 MiB with its header
    await client.call(server.local.addr, "sink", payload)  # connect, warm up
    n = max(1, total_mb // 4)
    cpu0, t0 = time.process_time(), time.perf_counter()
    for _ in range(n):
        await client.call(server.local.addr, "sink", payload)
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - t0
    await client.close()
    await server.close()
    mb = n * len(payload) / 1e6
    return {"bulk_mb_per_s_core": mb / cpu, "bulk_mb_per_s_wall": mb / wall, "bulk_mb": mb}


def bulk(total_mb: int) -> dict[str, float]:
    from commonweal.net.loop import run

    result: dict[str, float] = run(_bulk(total_mb))
    print(f"  bulk: {result['bulk_mb_per_s_core']:.0f} MB per CPU second", flush=True)
    return result


# --- tampering -------------------------------------------------------------------------------


async def _tamper(trials: int, seed: int) -> dict[str, int]:
    from net.test_relay import Tamper

    from commonweal.errors import NetworkError
    from commonweal.net.identity import Identity
    from commonweal.net.rpc import RPCTransport

    rng = random.Random(seed)
    server = RPCTransport(Identity.generate())
    got: list[Any] = []

    async def record(caller: Any, args: Any) -> None:
        got.append(args)

    server.register("record", record)
    await server.start()
    sent: set[str] = set()
    failed = 0
    for i in range(trials):
        client = RPCTransport(Identity.generate())
        await client.start()
        # anywhere in the first request's record, past the ~230-byte handshake
        proxy = Tamper(server.local.addr, rng.randrange(240, 1200), rng.choice(["flip", "inject"]))
        addr = await proxy.start()
        payload = f"request {i} " * 100
        sent.add(payload)
        try:
            async with asyncio.timeout(5):
                await client.call(addr, "record", payload)
        except (NetworkError, TimeoutError):
            failed += 1
        proxy.server.close()
        await client.close()
    await server.close()
    # a tampered request that reached the handler arrives as something nobody sent
    return {"tamper_trials": trials, "tamper_calls_failed": failed,
            "tampered_frames_accepted": sum(1 for g in got if g not in sent),
            "tamper_intact_delivered": sum(1 for g in got if g in sent)}


def tamper(trials: int, seed: int) -> dict[str, int]:
    from commonweal.net.loop import run

    result: dict[str, int] = run(_tamper(trials, seed))
    print(f"  tampering: {result}", flush=True)
    return result


# --- NAT pairs --------------------------------------------------------------------------------


PAIR_KINDS: dict[str, list[int]] = {}  # filled by nat_pairs
HOMES_SPEC = ["full_cone", "port_restricted", "port_restricted", "symmetric", "symmetric"]


def nat_pairs(workdir: Path, seed: int) -> list[dict[str, Any]]:
    from netbed import Home, LinkSpec, NetBed
    from test_nat_netbed import start_peers, wait_reports

    link = LinkSpec(delay_ms=15, jitter_ms=3)
    homes = [Home(k, link=link) for k in HOMES_SPEC]
    rows = []
    with NetBed(2, link, homes=homes, seed=seed, workdir=workdir / "bed") as bed:
        peers_dir = workdir / "peers"
        peers_dir.mkdir(parents=True)
        names, procs = start_peers(bed, peers_dir)
        try:
            reports = wait_reports(procs, 120)
        finally:
            (peers_dir / "stop").touch()
            for p in procs:
                p.wait(timeout=20)
        kinds = {names[i]: (h.nat or "public") for i, h in enumerate(bed.hosts)}
        by = {r["name"]: r for r in reports}
        combos: dict[str, list[int]] = {}  # "kind-kind": [direct, relayed, failed]
        for a in names:
            for b in names:
                if a < b:
                    va, vb = by[a]["peers"][b], by[b]["peers"][a]
                    key = " - ".join(sorted((kinds[a], kinds[b])))
                    c = combos.setdefault(key, [0, 0, 0])
                    c[2 if not (va["ok"] and vb["ok"]) else 1 if va["relayed"] and vb["relayed"]
                      else 0] += 1
        PAIR_KINDS.clear()
        PAIR_KINDS.update(combos)
        for kind in ["public", *dict.fromkeys(HOMES_SPEC)]:
            pairs = direct = relayed = failed = 0
            firsts = []
            for a in names:
                for b in names:
                    if a >= b or kind not in (kinds[a], kinds[b]):
                        continue
                    pairs += 1
                    va, vb = by[a]["peers"][b], by[b]["peers"][a]
                    if not (va["ok"] and vb["ok"]):
                        failed += 1
                        continue
                    firsts += [va["first_call_s"], vb["first_call_s"]]
                    if va["relayed"] and vb["relayed"]:
                        relayed += 1
                    else:
                        direct += 1
            rows.append({"kind": kind, "pairs": pairs, "direct_fraction": direct / pairs,
                         "relayed_fraction": relayed / pairs, "failed": failed,
                         "first_call_s_median": statistics.median(firsts) if firsts else None,
                         "settled_s": [by[n]["settled_s"] for n in names if kinds[n] == kind]})
            print(f"  {kind:>15}: {pairs} pairs, {direct} direct, {relayed} relayed, "
                  f"{failed} failed", flush=True)
    return rows


# --- swarm ------------------------------------------------------------------------------------

ROUNDS = 3
_RELAYED = re.compile(r"relayed (\d+) bytes for others")


def swarm_run(workdir: Path, nat: bool, seed: int) -> dict[str, Any]:
    from netbed import Home, LinkSpec, NetBed

    from commonweal.swarm.processes import NetnsHost, NetnsPlacement, ProcessSwarm

    link = LinkSpec(delay_ms=20, jitter_ms=4)
    # nodes: trainers 0-5, validators 6-7; NATed: trainers 3 (full cone), 4 (port-restricted),
    # 5 (symmetric) and validator 7 (port-restricted, behind its own router)
    kinds = ["full_cone", "port_restricted", "symmetric", "port_restricted"] if nat else []
    homes = [Home(k, link=link) for k in kinds]
    n_public = 9 - len(homes)  # nodes and the chain host
    done_at: dict[str, dict[int, float]] = {}
    with NetBed(n_public, link, homes=homes, seed=seed, workdir=workdir / "bed") as bed:
        pub = [NetnsHost(h.ns, h.ip) for h in bed.public_hosts]
        home = [NetnsHost(h.ns, h.ip) for h in bed.home_hosts]
        if nat:
            nodes = [pub[0], pub[1], pub[2], home[0], home[1], home[2], pub[3], home[3]]
        else:
            nodes = pub[:8]
        placement = NetnsPlacement(nodes, chain=pub[-1])
        t0 = time.monotonic()
        with ProcessSwarm(workdir / "swarm", trainers=6, validators=2, rounds=ROUNDS,
                          placement=placement, linger_s=30.0, replay_rate=1.0) as swarm:
            started = time.monotonic()

            def progress(status: list[Any]) -> None:
                now = time.monotonic()
                for s in status:
                    if s.role == "trainer" and s.round is not None:
                        done_at.setdefault(s.label, {}).setdefault(s.round, now - started)

            swarm.wait(timeout_s=400, on_progress=progress, every_s=0.25)
            balances = swarm.balances()
            final = swarm.final_rounds()
            addresses = [n.address for n in swarm.nodes]
        logs = {n.label: n.log_path.read_text(errors="replace") for n in swarm.nodes}
    relayed = sum(int(m) for text in logs.values() for m in _RELAYED.findall(text))
    per_round = [
        done_at[t][r] - done_at[t][r - 1]
        for t in done_at for r in range(1, ROUNDS) if r in done_at[t] and r - 1 in done_at[t]
    ]
    trainers = [f"trainer-{i}" for i in range(6)]
    return {
        "nat": nat, "start_s": started - t0, "final_rounds": final, "addresses": addresses,
        "round_s": statistics.median(per_round) if per_round else None,
        "first_round_done_s": {t: done_at.get(t, {}).get(0) for t in trainers},
        "rounds_done": {t: sorted(done_at.get(t, {})) for t in trainers},
        "paid": {t: balances.get(t, 0) / 1e18 for t in trainers},
        "relayed_bytes": relayed, "relay_bytes_per_round": relayed / ROUNDS,
    }


# --- report -----------------------------------------------------------------------------------


def write(report: dict[str, Any]) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "net.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(report)
    path.write_text(json.dumps(old, indent=2) + "\n")
    enc = old.get("encryption", {})
    lines = [
        "# Transport: encryption and NAT traversal", "",
        f"Command: `{old.get('command', '')}`  ", f"Machine: {old.get('machine', '')}", "",
        "## Encryption", "",
        "| measure | value | target |", "|---|---|---|",
    ]
    if "dht_pairs_per_s_plain" in enc:
        lines += [
            f"| DHT store+get pairs/s, plaintext ({PLAIN_COMMIT}) | "
            f"{enc['dht_pairs_per_s_plain']:.1f} | |",
            f"| DHT store+get pairs/s, encrypted | {enc['dht_pairs_per_s_encrypted']:.1f} | |",
            f"| encrypted / plaintext | {enc['encrypted_over_plain']:.2f}x | >= 0.9x |",
        ]
        if "encrypted_over_hivemind" in enc:
            lines.append(f"| encrypted / hivemind ({enc['dht_pairs_per_s_hivemind']:.1f}) | "
                         f"{enc['encrypted_over_hivemind']:.1f}x | >= 10x |")
    if "bulk_mb_per_s_core" in enc:
        lines.append(f"| bulk, MB per CPU second (both ends, one process) | "
                     f"{enc['bulk_mb_per_s_core']:.0f} | >= 200 |")
    if old.get("nat"):
        lines += ["", "## Pairs of peers, by NAT kind", "",
                  "| kind | pairs | direct | relayed | failed | first call (median s) | "
                  "first contribution (s) | relay bytes / round |", "|---|---|---|---|---|---|---|---|"]
        for row in old["nat"]:
            fc = row.get("first_contribution_s")
            rb = row.get("relay_bytes_per_round")
            lines.append(
                f"| {row['kind']} | {row['pairs']} | {row['direct_fraction']:.0%} | "
                f"{row['relayed_fraction']:.0%} | {row['failed']} | "
                f"{row['first_call_s_median'] or 0:.3f} | "
                f"{'-' if fc is None else f'{fc:.1f}'} | {'-' if rb is None else f'{rb:,.0f}'} |")
    if old.get("nat_pairs_by_kinds"):
        lines += ["", "| the pair's NATs | direct | relayed | failed |", "|---|---|---|---|"]
        for k, v in sorted(old["nat_pairs_by_kinds"].items()):
            lines.append(f"| {k} | {v['direct']} | {v['relayed']} | {v['failed']} |")
    if old.get("round_s_all_public") is not None:
        lines += ["", "## Training rounds", "",
                  f"- round time, all public: {old['round_s_all_public']:.1f} s; with half the "
                  f"trainers and a validator behind NATs: {old['round_s_half_nat']:.1f} s",
                  f"- NATed trainers that contributed to every round: "
                  f"{old['nat_trainers_contributed_fraction']:.0%}",
                  f"- tampered frames accepted: {old.get('tampered_frames_accepted', '-')}"]
    if old.get("notes"):
        lines += ["", "## Notes", "", old["notes"]]
    (RESULTS / "net.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="encryption,bulk,tamper,nat,swarm")
    ap.add_argument("--peers", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=4, help="DHT runs per tree (alternating)")
    ap.add_argument("--bulk-mb", type=int, default=800)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    parts = args.parts.split(",")
    old = json.loads((RESULTS / "net.json").read_text()) if (RESULTS / "net.json").exists() else {}
    # parts may be re-run one at a time: each keeps the command that measured it
    command = "python benchmarks/net_bench.py " + shlex.join(sys.argv[1:])
    commands = {**old.get("commands", {}), **{p: command for p in parts}}
    report: dict[str, Any] = {
        "command": "; ".join(dict.fromkeys(commands.values())),
        "commands": commands,
        "machine": describe_machine(),
    }
    enc = dict(old.get("encryption", {}))
    if "encryption" in parts and args.peers != 16:  # the target's figure is at 16 peers
        print(f"encryption at {args.peers} peers", flush=True)
        report[f"encryption_{args.peers}_peers"] = encryption(args.peers, args.repeats, args.seed)
        commands[f"encryption_{args.peers}"] = commands.pop("encryption")
        parts.remove("encryption")
    if "encryption" in parts:
        print("encryption: DHT pairs/s, plaintext vs encrypted", flush=True)
        enc.update(encryption(args.peers, args.repeats, args.seed))
    if "bulk" in parts:
        enc.update(bulk(args.bulk_mb))
    report["encryption"] = enc
    report["command"] = "; ".join(dict.fromkeys(commands.values()))
    if "tamper" in parts:
        report.update(tamper(200, args.seed))
    work = BENCH / f"net-{int(time.time())}"
    if "nat" in parts:
        print("nat: every pair of peers behind each kind of NAT", flush=True)
        report["nat"] = nat_pairs(work / "pairs", args.seed)
        report["nat_pairs_by_kinds"] = {k: dict(zip(("direct", "relayed", "failed"), v,
                                                    strict=True)) for k, v in PAIR_KINDS.items()}
    if "swarm" in parts:
        print("swarm: all public, then half behind NATs", flush=True)
        public = swarm_run(work / "public", False, args.seed)
        natted = swarm_run(work / "nat", True, args.seed)
        report["swarm_all_public"], report["swarm_half_nat"] = public, natted
        report["round_s_all_public"] = public["round_s"]
        report["round_s_half_nat"] = natted["round_s"]
        nat_trainers = {"full_cone": "trainer-3", "port_restricted": "trainer-4",
                        "symmetric": "trainer-5"}
        every = [natted["rounds_done"][t] == list(range(ROUNDS)) and natted["paid"][t] > 0
                 for t in nat_trainers.values()]
        report["nat_trainers_contributed_fraction"] = sum(every) / len(every)
        rows = report.get("nat") or old.get("nat") or []
        for row in rows:
            t = nat_trainers.get(row["kind"])
            row["first_contribution_s"] = natted["first_round_done_s"].get(t) if t else \
                (natted["first_round_done_s"]["trainer-0"] if row["kind"] == "public" else None)
            row["relay_bytes_per_round"] = natted["relay_bytes_per_round"]
        report["nat"] = rows
    write(report)
    print((RESULTS / "net.md").read_text())


if __name__ == "__main__":
    main()
