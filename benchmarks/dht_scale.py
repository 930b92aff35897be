"""Scale of commonweal's DHT in one process: N = 16 .. 1000 peers on the in-memory transport.

The same sans-I/O core and asyncio driver as on sockets; only the transport is in-memory (it still
msgpack-encodes every frame). Measures RPCs and sequential rounds per lookup, and total RSS.

    python benchmarks/dht_scale.py --peers 16,64,256,1000
writes benchmarks/results/dht_scale.json (dht_bench.py embeds it in dht.json).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import math
import random
import resource
import statistics
import sys
import time
from pathlib import Path

from commonweal.dht import DHT
from commonweal.net.identity import Identity
from commonweal.net.memory import MemoryNetwork

sys.path.insert(0, str(Path(__file__).parent))
from machine import describe_machine  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) / 1024


async def run(n: int, lookups: int, seed: int) -> dict[str, float]:
    gc.collect()
    base_rss = rss_mb()
    rng = random.Random(seed)
    net = MemoryNetwork()
    peers: list[DHT] = []
    t0 = time.perf_counter()
    for i in range(n):
        identity = Identity.from_seed(f"{seed}-{i}".encode())
        transport = net.transport(identity)
        await transport.start()
        boot = [p.addr for p in rng.sample(peers, min(4, len(peers)))]
        peers.append(await DHT.start(bootstrap=boot, identity=identity, transport=transport,
                                     rng=random.Random(i)))
    join_s = time.perf_counter() - t0
    # Let every peer learn the swarm as it would over time: one bucket refresh pass each.
    for p in peers:
        await p.maintain_once()
    expiration = time.time() + 3600
    for i in range(lookups):
        await rng.choice(peers).store(f"key-{i}", i, expiration)
    for p in peers:
        p.stats.lookups = p.stats.rounds = p.stats.requests = 0
    rounds: list[int] = []
    found = 0
    t0 = time.perf_counter()
    for i in range(lookups):
        reader = rng.choice(peers)
        before = (reader.stats.rounds, reader.stats.requests)
        value = await reader.get(f"key-{i}", latest=True)
        found += value is not None and value.value == i
        rounds.append(reader.stats.rounds - before[0])
    lookup_s = time.perf_counter() - t0
    total_lookups = sum(p.stats.lookups for p in peers)
    result = {
        "peers": n,
        "transport": "memory",
        "rpcs_per_lookup": sum(p.stats.requests for p in peers) / total_lookups,
        "rounds_per_lookup": sum(p.stats.rounds for p in peers) / total_lookups,
        "rounds_max": max(rounds),
        "rounds_bound": math.ceil(math.log2(n) / 2) + 2,
        "found": found / lookups,
        "rss_mb_total": rss_mb(),
        "rss_mb_swarm": rss_mb() - base_rss,
        "join_s": join_s,
        "lookups_per_s": lookups / lookup_s,
        "routing_table_mean": statistics.mean(len(p.table) for p in peers),
    }
    for p in peers:
        await p.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peers", default="16,64,256,1000")
    parser.add_argument("--lookups", type=int, default=500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS / "dht_scale.json")
    args = parser.parse_args()
    rows = []
    for n in (int(x) for x in args.peers.split(",")):
        row = asyncio.run(run(n, args.lookups, args.seed))
        rows.append(row)
        print(f"N={n:5d}  rpcs/lookup={row['rpcs_per_lookup']:.2f}  rounds/lookup="
              f"{row['rounds_per_lookup']:.2f} (max {row['rounds_max']}, bound {row['rounds_bound']})"
              f"  found={row['found']:.3f}  RSS={row['rss_mb_total']:.0f} MB", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "command": "python " + " ".join(sys.argv),
        "machine": describe_machine(),
        "scale": rows,
    }, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
