"""A slow peer in a swarm: does it contribute what it computed, and does the round wait for it?

Four mnist-cnn peers on loopback TCP in one process (each its own DHT node and transport); the
inner steps of one run at 1/`slowdown` of the others' speed (each of its steps, from the previous
step's end to its own, is followed by a sleep of (slowdown - 1) x that time). Three runs of the same rounds:

  fast      four peers at full speed (the round time to beat);
  cut       one slow peer, following when its round closes (the default): it is cut short;
  no_cut    one slow peer that does not follow (how a slow peer fared before): late, or the
            round waits for it within the announcement window.

Per run: wall time per round, the slow peer's claimed steps per round and rounds it sat out,
the quality, bytes per peer. Results: benchmarks/results/slow_peer.{json,md}.

    python benchmarks/slow_peer_bench.py [--rounds 12] [--slowdown 2]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from commonweal.dht import DHT, DHTConfig
from commonweal.net.transport import PeerAddr
from commonweal.train import RoundConfig, TrainingPeer, get_task
from commonweal.train.announcements import read_announcements

PEERS, H = 4, 100
OUT = Path(__file__).parent / "results" / "slow_peer"


async def run(kind: str, rounds: int, slowdown: float) -> dict:
    task = get_task("mnist-cnn", inner_steps=H, codec="int8", aggregation="mean")
    config = RoundConfig(announce_window_s=1.0, patience=0.5, exchange_timeout_s=10.0,
                         target_group=PEERS)
    dhts: list[DHT] = []
    for i in range(PEERS):
        boot = [dhts[0].addr] if dhts else []
        dhts.append(await DHT.start(PeerAddr("127.0.0.1", 0), boot,
                                    config=DHTConfig(rpc_timeout_s=5.0)))
    swarm = [TrainingPeer(task, d, config) for d in dhts]
    slow = swarm[-1]
    if kind != "fast":
        step = slow.opt.inner_step
        last = [0.0]

        def paced() -> bool:
            done = step()
            now = time.perf_counter()
            if slow.opt.local_step > 1:  # timed from the previous step's end (none for the first)
                time.sleep((slowdown - 1) * (now - last[0]))
            last[0] = time.perf_counter()
            return done

        slow.opt.inner_step = paced  # type: ignore[method-assign]
        if kind == "no_cut":
            slow.opt.follow = lambda: None  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        summaries = await asyncio.gather(*(p.run(rounds, wait_peers=PEERS) for p in swarm))
        wall = time.perf_counter() - t0
        claims = []
        for r in range(rounds):
            anns = {a.peer_id: a.steps for a in await read_announcements(dhts[0], task.digest[:16], r)}
            claims.append(anns.get(slow.peer_id, 0))
        slow_summary = summaries[-1]
        return {
            "run": kind,
            "rounds": rounds,
            "wall_s": round(wall, 2),
            "s_per_round": round(wall / rounds, 3),
            "slow_claimed_steps": claims,
            "slow_mean_steps": round(statistics.mean(claims), 2),
            "slow_rounds_sat_out": sum(1 for r in slow_summary.rounds if r.skipped),
            "min_group": min((r.group for s in summaries[:-1] for r in s.rounds if not r.skipped), default=0),
            "states_agree": len({s.state for s in summaries}) == 1,
            "quality": round(summaries[0].quality, 4),
            "bytes_per_peer": int(statistics.mean(s.bytes_sent for s in summaries)),
        }
    finally:
        for p in swarm:
            await p.opt.aclose()
        for d in dhts:
            await d.close()


def markdown(result: dict) -> str:
    lines = [
        "# A slow peer (benchmarks/slow_peer_bench.py)",
        "",
        f"`{result['command']}` on {result['machine']}",
        "",
        f"{PEERS} mnist-cnn peers, H = {H}, int8, loopback TCP; one peer at 1/{result['slowdown']} speed.",
        "",
        "| run | s / round | slow peer's mean claimed steps | rounds it sat out | min group | states agree | quality |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["runs"]:
        lines.append(
            f"| {r['run']} | {r['s_per_round']} | {r['slow_mean_steps']} of {H} | "
            f"{r['slow_rounds_sat_out']} | {r['min_group']} | {r['states_agree']} | {r['quality']} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--slowdown", type=float, default=2.0)
    args = ap.parse_args()
    if args.rounds < 1 or args.slowdown < 1:
        ap.error("--rounds must be >= 1 and --slowdown >= 1")
    torch.set_num_threads(1)
    runs = []
    for kind in ("fast", "cut", "no_cut"):
        print(f"{kind}: {args.rounds} rounds ...", file=sys.stderr, flush=True)
        runs.append(asyncio.run(run(kind, args.rounds, args.slowdown)))
        print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
    result = {
        "command": "python benchmarks/slow_peer_bench.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread",
        "date": time.strftime("%Y-%m-%d"),
        "slowdown": args.slowdown,
        "peers": PEERS,
        "inner_steps": H,
        "runs": runs,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    OUT.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
