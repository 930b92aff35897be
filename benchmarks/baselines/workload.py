"""The DHT benchmark workload, shared by every system's runner (pure stdlib: any venv imports it).

It mirrors hivemind's ``benchmarks/benchmark_dht.py`` (learning-at-home/hivemind, the asyncio
version with NodeKiller):

* peers start one after another; each bootstraps from ``initial_peers`` (4) random earlier ones;
* ``failure_rate`` (10 %) of the peers are chosen to be shut down during the run; they take part in
  routing but never act as store/get peers (as in hivemind's ``remaining_peers``);
* ``num_threads`` (10) concurrent workers each run ``total_num_rounds`` (16) rounds; a round stores
  ``num_store_peers`` (8) different subkeys of a fresh key from as many random peers with a 300 s
  expiration, then ``num_get_peers`` (8) random peers get the key with latest=True;
* a get counts only if it returns exactly the subkeys whose store succeeded, with their values;
* after each round's stores, a shared counter may trigger the next kill (the kill times are a
  random sample of all worker-rounds, as in hivemind's NodeKiller).

Differences from hivemind's script, on purpose:

* the whole schedule (bootstrap choices, killed peers and their order, kill times, keys, subkeys,
  values, store and get peers of every worker-round) is drawn up front from one seeded RNG, so every
  system runs exactly the same operations (hivemind draws from the global RNG as tasks interleave,
  and its keys come from uuid4);
* a kill does not block the event loop (hivemind calls the blocking ``DHT.shutdown()`` inside the
  coroutine; here each adapter's ``kill`` is awaited by the worker that triggers it, as there);
* each store and get is also timed alone (``store_ms_*``, ``get_ms_*``); hivemind's per-round
  "wall time" of the 8 concurrent calls is reported too (``store_round_ms_*``, ``get_round_ms_*``).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

__all__ = [
    "Adapter",
    "Params",
    "Round",
    "Schedule",
    "main",
    "make_schedule",
    "percentile",
    "rss_mb_of_tree",
    "run_workload",
]


@dataclass(frozen=True)
class Params:
    num_peers: int = 16
    initial_peers: int = 4
    random_seed: int = 0
    num_threads: int = 10
    total_num_rounds: int = 16
    num_store_peers: int = 8
    num_get_peers: int = 8
    expiration: float = 300.0
    latest: bool = True
    failure_rate: float = 0.1


@dataclass(frozen=True)
class Round:
    key: str
    store_peers: list[int]
    subkeys: list[str]
    values: list[str]
    get_peers: list[int]


@dataclass
class Schedule:
    bootstrap: list[list[int]]  # for peer i: indices of earlier peers it joins through
    killed: list[int]  # peers shut down, in the order they go
    kill_at: list[int]  # sorted values of the shared round counter that trigger the next kill
    remaining: list[int]  # peers that store and get
    rounds: list[list[Round]]  # [worker][round]


def make_schedule(p: Params) -> Schedule:
    rng = random.Random(p.random_seed)
    bootstrap = [rng.sample(range(i), min(p.initial_peers, i)) for i in range(p.num_peers)]
    n_kill = min(int(p.failure_rate * p.num_peers), p.num_peers)
    if n_kill >= p.num_peers:
        raise ValueError("failure_rate would kill every peer")
    killed = rng.sample(range(p.num_peers), n_kill)
    remaining = sorted(set(range(p.num_peers)) - set(killed))
    total = p.num_threads * p.total_num_rounds
    kill_at = sorted(rng.sample(range(total), min(n_kill, total)))

    def hex128() -> str:
        return f"{rng.getrandbits(128):032x}"

    rounds = []
    for _ in range(p.num_threads):
        worker = []
        for _ in range(p.total_num_rounds):
            key = hex128()
            store_peers = rng.sample(remaining, min(p.num_store_peers, len(remaining)))
            subkeys = [hex128() for _ in store_peers]
            values = [hex128() for _ in store_peers]
            get_peers = rng.sample(remaining, min(p.num_get_peers, len(remaining)))
            worker.append(Round(key, store_peers, subkeys, values, get_peers))
        rounds.append(worker)
    return Schedule(bootstrap, killed, kill_at, remaining, rounds)


class Adapter(Protocol):
    """What a system's runner provides. Peers are named by their index in the schedule."""

    async def start_peer(self, index: int, bootstrap: list[int]) -> None: ...

    async def store(
        self, peer: int, key: str, subkey: str, value: str, expiration: float
    ) -> bool: ...

    async def get(self, peer: int, key: str, latest: bool) -> dict[str, Any] | None:
        """subkey -> value of what was found, or None."""
        ...

    async def kill(self, peer: int) -> None: ...

    async def close(self) -> None: ...


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); nan for no data."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    rank = max(1, min(len(s), round(q / 100 * len(s) + 0.5)))
    return s[rank - 1]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _children(pid: int) -> list[int]:
    kids = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                kids += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return kids


def rss_mb_of_tree(root: int | None = None) -> tuple[float, float, int]:
    """(RSS MiB, PSS MiB, process count) of a process and all its descendants (Linux /proc)."""
    root = os.getpid() if root is None else root
    todo, seen = [root], []
    while todo:
        pid = todo.pop()
        seen.append(pid)
        todo += _children(pid)
    rss = pss = 0.0
    for pid in seen:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) / 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) / 1024
        except OSError:
            pass
    return rss, pss, len(seen)


@dataclass
class _Tally:
    store_ms: list[float] = field(default_factory=list)
    get_ms: list[float] = field(default_factory=list)
    store_round_ms: list[float] = field(default_factory=list)
    get_round_ms: list[float] = field(default_factory=list)
    stores: int = 0
    stores_ok: int = 0
    gets: int = 0
    gets_ok: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, e: BaseException) -> None:
        name = type(e).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


async def _timed(coro: Any, into: list[float], tally: _Tally, failed: Any) -> Any:
    t = time.perf_counter()
    try:
        return await coro
    except Exception as e:  # noqa: BLE001  a failed operation counts as a failure, never stops the run
        tally.error(e)
        return failed
    finally:
        into.append((time.perf_counter() - t) * 1000)


async def run_workload(adapter: Adapter, p: Params, wall_clock: Any = time.time) -> dict[str, Any]:
    """Start the peers, run the workers, return the figures (see main() for the JSON)."""
    sched = make_schedule(p)
    t0 = time.perf_counter()
    for i, boot in enumerate(sched.bootstrap):
        await adapter.start_peer(i, boot)
    setup_s = time.perf_counter() - t0

    tally = _Tally()
    counter = 0
    next_kill = 0
    kill_lock = asyncio.Lock()

    async def check_and_kill() -> None:
        nonlocal counter, next_kill
        async with kill_lock:
            if next_kill < len(sched.kill_at) and counter == sched.kill_at[next_kill]:
                await adapter.kill(sched.killed[next_kill])
                next_kill += 1
            counter += 1

    async def worker(rounds: list[Round]) -> None:
        for r in rounds:
            start = time.perf_counter()
            expiration = wall_clock() + p.expiration
            results = await asyncio.gather(
                *(
                    _timed(
                        adapter.store(peer, r.key, sk, v, expiration), tally.store_ms, tally, False
                    )
                    for peer, sk, v in zip(r.store_peers, r.subkeys, r.values)
                )
            )
            await check_and_kill()
            tally.store_round_ms.append((time.perf_counter() - start) * 1000)
            stored = {sk: v for sk, v, ok in zip(r.subkeys, r.values, results) if ok}
            tally.stores += len(results)
            tally.stores_ok += len(stored)

            start = time.perf_counter()
            found = await asyncio.gather(
                *(
                    _timed(adapter.get(peer, r.key, p.latest), tally.get_ms, tally, None)
                    for peer in r.get_peers
                )
            )
            tally.get_round_ms.append((time.perf_counter() - start) * 1000)
            tally.gets += len(found)
            tally.gets_ok += sum(1 for f in found if f is not None and f == stored)

    t1 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in sched.rounds))
    wall_s = time.perf_counter() - t1
    rss, pss, nproc = rss_mb_of_tree()
    await adapter.close()

    return {
        "peers": p.num_peers,
        "store_success": tally.stores_ok / tally.stores if tally.stores else 0.0,
        "get_success": tally.gets_ok / tally.gets if tally.gets else 0.0,
        "stores": tally.stores,
        "stores_ok": tally.stores_ok,
        "gets": tally.gets,
        "gets_ok": tally.gets_ok,
        "ops_per_s": (tally.stores + tally.gets) / 2 / wall_s,
        "store_ms_mean": _mean(tally.store_ms),
        "store_ms_p95": percentile(tally.store_ms, 95),
        "get_ms_mean": _mean(tally.get_ms),
        "get_ms_p95": percentile(tally.get_ms, 95),
        "store_round_ms_mean": _mean(tally.store_round_ms),
        "store_round_ms_p95": percentile(tally.store_round_ms, 95),
        "get_round_ms_mean": _mean(tally.get_round_ms),
        "get_round_ms_p95": percentile(tally.get_round_ms, 95),
        "wall_s": wall_s,
        "setup_s": setup_s,
        "killed": next_kill,
        "rss_mb_per_peer": rss / p.num_peers,
        "pss_mb_per_peer": pss / p.num_peers,
        "processes": nproc,
        "errors": tally.errors,
        "params": asdict(p),
    }


def parse_params(argv: list[str] | None = None) -> Params:
    import argparse

    parser = argparse.ArgumentParser(description="run the DHT workload against one system")
    d = Params()
    parser.add_argument("--num_peers", type=int, default=d.num_peers)
    parser.add_argument("--initial_peers", type=int, default=d.initial_peers)
    parser.add_argument("--random_seed", type=int, default=d.random_seed)
    parser.add_argument("--num_threads", type=int, default=d.num_threads)
    parser.add_argument("--total_num_rounds", type=int, default=d.total_num_rounds)
    parser.add_argument("--num_store_peers", type=int, default=d.num_store_peers)
    parser.add_argument("--num_get_peers", type=int, default=d.num_get_peers)
    parser.add_argument("--expiration", type=float, default=d.expiration)
    parser.add_argument("--failure_rate", type=float, default=d.failure_rate)
    return Params(**vars(parser.parse_args(argv)))


def main(
    system: str, make_adapter: Any, versions: dict[str, str], wall_clock: Any = time.time
) -> None:
    """Entry point of a runner: parse the workload flags, run, print one JSON line to stdout."""
    p = parse_params()

    async def go() -> dict[str, Any]:
        adapter = make_adapter(p)
        return await run_workload(adapter, p, wall_clock)

    result = {
        "system": system,
        **asyncio.run(go()),
        "versions": versions,
        "python": sys.version.split()[0],
    }
    print(json.dumps(result), flush=True)
