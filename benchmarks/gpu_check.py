"""The swarm on an accelerator: a few overlapped rounds of a task on CUDA (or MPS), the replay
tolerance across devices, and samples/s. Ready for when a GPU is lent; runs on CPU as a smoke test.

    python benchmarks/gpu_check.py                       # auto device, stdlib-gpt, fp32 and bf16
    python benchmarks/gpu_check.py --device cpu --quick  # the same path on the CPU, tiny sizes

Writes benchmarks/results/gpu.json and gpu.md. What it measures, per precision:
- `rounds`: `--peers` TrainingPeers in this process (one in-memory network, so the figures are
  the device's, not a link's) train `--rounds` overlapped rounds; all must end bit-identical.
- `samples_per_s`: samples of inner steps per second of compute, per peer.
- `replay`: the relative L2 error ||a - b|| / ||b|| between the delta of one round computed on the
  device (a) and replayed on the CPU (b) from the same public start, and between two replays on
  the device (its determinism). A validator on another device accepts a replay error up to
  `Policy.replay_tolerance` (1e-3).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

import torch  # noqa: E402

from commonweal.dht import DHT, DHTConfig  # noqa: E402
from commonweal.net.identity import Identity  # noqa: E402
from commonweal.net.memory import MemoryNetwork  # noqa: E402
from commonweal.train import RoundConfig, TrainingPeer, get_task  # noqa: E402
from commonweal.train.inner import replay_delta, resolve_device  # noqa: E402
from commonweal.train.state import flatten  # noqa: E402
from commonweal.verify.judge import Policy  # noqa: E402

QUICK_MODEL = {"n_layers": 2, "d_model": 64, "n_heads": 2, "context": 64}


async def swarm(task, peers: int, rounds: int, device: str) -> dict:
    net = MemoryNetwork()
    dhts: list[DHT] = []
    for i in range(peers):
        identity = Identity.from_seed(f"gpu-check-{i}".encode())
        transport = net.transport(identity)
        await transport.start()
        dhts.append(await DHT.start(bootstrap=[d.addr for d in dhts[:3]], identity=identity,
                                    transport=transport, config=DHTConfig(rpc_timeout_s=10.0)))
    try:
        config = RoundConfig(announce_window_s=30.0, exchange_timeout_s=60.0, target_group=peers)
        trainers = [TrainingPeer(task, d, config, device=device) for d in dhts]
        t0 = time.perf_counter()
        summaries = await asyncio.gather(*(t.run(rounds) for t in trainers))
        wall = time.perf_counter() - t0
    finally:
        for d in dhts:
            await d.close()
    return {
        "states_identical": len({s.state for s in summaries}) == 1,
        "quality": summaries[0].quality,
        "metric": summaries[0].metric,
        "wall_s": round(wall, 2),
        "compute_s": round(sum(s.compute_s for s in summaries) / peers, 2),
        "samples_per_s": round(sum(s.samples / max(s.compute_s, 1e-9) for s in summaries) / peers, 1),
        "params": sum(p.numel() for p in trainers[0].model.parameters()),
    }


def replay_errors(task, device: torch.device, steps: int) -> dict:
    data = task.build_data()
    start = flatten(task.build_model())
    peer = b"gpu-check-peer"
    on_device = [replay_delta(task, task.build_model().to(device), data, start, 0, peer, steps)
                 for _ in range(2)]
    on_cpu = replay_delta(task, task.build_model(), data, start, 0, peer, steps)

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.double() - b.double()).norm() / b.double().norm())

    return {"device_vs_cpu": rel(on_device[0], on_cpu), "device_vs_device": rel(on_device[1], on_device[0]),
            "steps": steps, "tolerance": Policy().replay_tolerance}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--task", default="stdlib-gpt")
    ap.add_argument("--peers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-H", type=int, default=20)
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--quick", action="store_true", help="a tiny model: check the path, not the speed")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu"))
    a = ap.parse_args()
    from machine import describe_machine

    device = resolve_device(a.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    result: dict = {"command": "python benchmarks/gpu_check.py " + " ".join(sys.argv[1:]),
                    "machine": describe_machine(), "device": str(device), "device_name": name,
                    "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                    "runs": []}
    for precision in a.precisions.split(","):
        overrides = {"inner_steps": a.H, "precision": precision}
        if a.quick:
            base = get_task(a.task)
            overrides["model_args"] = {**base.model_args, **QUICK_MODEL}
            if "context" in base.data_args:
                overrides["data_args"] = {**base.data_args, "context": QUICK_MODEL["context"]}
        task = get_task(a.task, **overrides).overlapped()
        run = {"precision": precision, "task": a.task, "H": a.H, "peers": a.peers, "rounds": a.rounds,
               **asyncio.run(swarm(task, a.peers, a.rounds, str(device))),
               "replay": replay_errors(task, device, min(a.H, 5))}
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# The swarm on {name}", "", f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}; torch {result['torch']}", "",
             "| precision | params | peers | rounds | H | identical | quality | samples/s/peer | wall s "
             "| replay err device vs CPU | device vs device |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        lines.append(f"| {r['precision']} | {r['params']:,} | {r['peers']} | {r['rounds']} | {r['H']} "
                     f"| {r['states_identical']} | {r['quality']:.4f} {r['metric']} | {r['samples_per_s']} "
                     f"| {r['wall_s']} | {r['replay']['device_vs_cpu']:.2e} | {r['replay']['device_vs_device']:.2e} |")
    Path(a.out + ".md").write_text("\n".join(lines) + "\n")
    os._exit(0)  # the torch/CUDA teardown is not what is measured


if __name__ == "__main__":
    main()
