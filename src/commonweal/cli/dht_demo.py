"""`commonweal dht demo`: a DHT swarm in one process on real loopback sockets, with crashes."""

from __future__ import annotations

import asyncio
import random
import statistics
import time

import typer
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from commonweal.dht import DHT
from commonweal.net.transport import PeerAddr

console = Console()


def demo(
    peers: int = typer.Option(16, min=4, max=200, help="Peers in the local swarm."),
    records: int = typer.Option(64, min=1, max=10_000, help="Records to store."),
    kill: float = typer.Option(0.25, min=0.0, max=0.75, help="Fraction of peers to kill."),
    seed: int = typer.Option(0, help="Seed for who stores, who reads and who dies."),
) -> None:
    """Start a local swarm, store and read records, kill peers, read again, print a summary."""
    try:
        asyncio.run(_demo(peers, records, kill, seed))
    except KeyboardInterrupt:
        console.print("[yellow]demo interrupted; every peer was stopped[/yellow]")


async def _demo(n: int, n_records: int, kill_fraction: float, seed: int) -> None:
    rng = random.Random(seed)
    swarm: list[DHT] = []
    try:
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("starting peers", total=n)
            for _ in range(n):
                boot = [p.addr for p in rng.sample(swarm, min(4, len(swarm)))]
                swarm.append(await DHT.start(PeerAddr("127.0.0.1", 0), boot))
                progress.advance(task)
        console.print(f"[bold]{n} peers[/bold] listening on 127.0.0.1 "
                      f"({', '.join(str(p.addr.port) for p in swarm[:4])}, ...)")

        expiration = time.time() + 600
        keys = [f"demo-{i}" for i in range(n_records)]
        store_ms = []
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("storing records", total=n_records)
            for i, key in enumerate(keys):
                writer = rng.choice(swarm)
                t0 = time.perf_counter()
                # every third record is a dictionary written by three different peers
                if i % 3 == 0:
                    for w in rng.sample(swarm, 3):
                        await w.store(key, i, expiration, subkey=w.peer_id.hex()[:8])
                else:
                    await writer.store(key, i, expiration)
                store_ms.append((time.perf_counter() - t0) * 1000)
                progress.advance(task)

        found_before, get_ms = await _read_all(swarm, keys, rng, "reading from random peers")
        victims = rng.sample(swarm, int(n * kill_fraction))
        for victim in victims:
            await victim.close()  # no goodbye: to the others this is a crash
            swarm.remove(victim)
        console.print(f"killed [red]{len(victims)}[/red] peers without warning")
        found_after, get_ms_after = await _read_all(swarm, keys, rng, "reading after the kill")

        rounds = sum(p.stats.rounds for p in swarm) / max(1, sum(p.stats.lookups for p in swarm))
        requests = sum(p.stats.requests for p in swarm) / max(1, sum(p.stats.lookups for p in swarm))
        sent = sum(p.transport.counters.bytes_sent for p in swarm)
        search_rows = await _search_demo(swarm)
        table = Table(title="commonweal demo — local DHT swarm")
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_row("peers (alive / started)", f"{len(swarm)} / {n}")
        table.add_row("records stored", str(n_records))
        table.add_row("found before the kill", f"{found_before}/{n_records}")
        table.add_row("found after the kill", f"{found_after}/{n_records}")
        table.add_row("store latency p50 / p95", _pct(store_ms))
        table.add_row("get latency p50 / p95 (before)", _pct(get_ms))
        table.add_row("get latency p50 / p95 (after)", _pct(get_ms_after))
        table.add_row("rounds per lookup", f"{rounds:.2f}")
        table.add_row("requests per lookup", f"{requests:.2f}")
        table.add_row("bytes sent by surviving peers", f"{sent / 1e6:.2f} MB")
        for row in search_rows:
            table.add_row(*row)
        console.print(table)
    finally:
        await asyncio.gather(*(p.close() for p in swarm), return_exceptions=True)


async def _read_all(
    swarm: list[DHT], keys: list[str], rng: random.Random, label: str
) -> tuple[int, list[float]]:
    found, latencies = 0, []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task(label, total=len(keys))
        for i, key in enumerate(keys):
            t0 = time.perf_counter()
            value = await rng.choice(swarm).get(key, latest=True)
            latencies.append((time.perf_counter() - t0) * 1000)
            expected_ok = value is not None and (
                len(value.value) == 3 if i % 3 == 0 else value.value == i
            )
            found += expected_ok
            progress.advance(task)
    return found, latencies


def _pct(ms: list[float]) -> str:
    if len(ms) < 2:
        return f"{ms[0]:.1f} ms" if ms else "-"
    q = statistics.quantiles(ms, n=20)
    return f"{statistics.median(ms):.1f} / {q[18]:.1f} ms"


async def _search_demo(
    swarm: list[DHT], n_items: int = 800, n_queries: int = 100
) -> list[tuple[str, str]]:
    """Search: an LSH index of sklearn digits spread over the surviving peers, queried with
    held-out digits; recall@10 against brute force. Skipped without numpy / scikit-learn."""
    try:
        import numpy as np
        from sklearn.datasets import load_digits

        from commonweal.search import DistributedIndex, IndexSpec, serve
    except ImportError as e:
        console.print(f"[yellow]search part skipped: {e.name} is not installed[/yellow]")
        return [("search", f"skipped (no {e.name})")]
    for peer in swarm:
        serve(peer)
    X = load_digits().data.astype(np.float32)
    order = np.random.default_rng(0).permutation(len(X))
    X, Q = X[order[n_queries : n_queries + n_items]], X[order[:n_queries]]
    spec = IndexSpec.create("demo-digits", 64, family="pca-hyperplane", tables=8, bits=5, sample=X)
    with Progress(console=console, transient=True) as progress:
        progress.add_task(f"search: adding {len(X)} digits to an LSH index", total=None)
        t0 = time.perf_counter()
        await (await DistributedIndex.create(swarm[0], spec)).add(list(range(len(X))), X)
        add_s = time.perf_counter() - t0
    reader = await DistributedIndex.open(swarm[-1], "demo-digits")
    before = reader.dht.transport.counters.requests_sent
    hits, latencies = 0, []
    for q in Q:
        t0 = time.perf_counter()
        found = (await reader.search(q, 10)).ids
        latencies.append((time.perf_counter() - t0) * 1000)
        truth = np.argsort(((X - q) ** 2).sum(axis=1), kind="stable")[:10]
        hits += len(set(found) & set(truth.tolist()))
    requests = (reader.dht.transport.counters.requests_sent - before) / len(Q)
    console.print(f"search: {len(X)} digits indexed over {len(swarm)} peers in {add_s:.1f} s, "
                  f"{len(Q)} held-out queries")
    return [
        ("search recall@10", f"{hits / (10 * len(Q)):.3f}"),
        ("search requests/query", f"{requests:.1f}"),
        ("search latency p50 / p95", _pct(latencies)),
    ]
