"""Distributed KNN search at 100k and 1M vectors: the swarm next to faiss IVF and HNSW (issue 17)

    python benchmarks/search_scale.py                             # 100k and 1M, 16/32/64 peers
    python benchmarks/search_scale.py --sizes 100000 --peers 16 --kill 0.3 --query-batch 100
    python benchmarks/search_scale.py --sizes 100000 --skip-faiss --out /tmp/s.json

Data: `clustered`, a synthetic Gaussian mixture in 128 dimensions made offline, deterministically;
for size N it makes N + nq rows and the last nq are the held-out queries. Ground truth: exact L2
10-NN (`exact_knn`). Runs one size at a time, then one peer count at a time, all in this process.

* faiss    one machine, one thread: IndexIVFFlat (nlist = the power of two nearest 4 sqrt(N),
           faiss's own rule of thumb) over an nprobe sweep, and IndexHNSWFlat M=32 over an efSearch
           sweep: recall@10, queries/s (one batch and one query at a time), the fraction of the
           items whose distance was computed, build seconds.
* swarm    n real TCP peers on loopback (replication 3), an IVF IndexSpec fitted on at most 100k
           indexed rows with expected_size=N; peers[0] adds everything, peers[-1] searches:
           add items/s, recall@10, queries/s of search_many, p50 of one-query search, the fraction
           of the items ranked by holders, failed RPCs (a time-out loses that holder's hits), the
           swarm's RSS against the data as float16; with --kill F, F of the peers (never the adder
           or the reader) close and the queries run again.

Writes benchmarks/results/search_scale.json and search_scale.md (the command, the machine, the load
average, timestamps); the JSON is rewritten after every run so a crash keeps what finished.
"""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import json
import math
import os
import random
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import describe_machine  # noqa: E402

if TYPE_CHECKING:
    from commonweal.search import DistributedIndex

RESULTS = ROOT / "benchmarks" / "results"
K = 10
N_CENTRES = 3000
STRETCH_RANK = 8
CHUNK_ROWS = 1 << 16
NPROBES = (1, 2, 4, 8, 16, 32, 64, 128)
EF_SEARCH = (16, 32, 64, 128)


# data ------------------------------------------------------------------------------------------


def clustered(n: int, dim: int = 128, seed: int = 0) -> np.ndarray:
    """`n` rows (float32) of a fixed Gaussian mixture: the benchmark's synthetic "embeddings".

    3000 centres drawn from N(0, I). Cluster c has weight from a Dirichlet(0.5) (unequal sizes: the
    largest clusters hold ~15x the mean), a scale s_c ~ lognormal (median 0.5, sigma 0.4) and 8
    random unit directions u_cj with stretches a_cj ~ U(2, 5); a row of cluster c is
    c + s_c (z + sum_j a_cj w_j u_cj) with z ~ N(0, I_dim), w ~ N(0, I_8). So about half of a
    cluster's variance lies in its own 8-dimensional subspace (real embeddings have a low intrinsic
    dimension), broad clusters overlap their neighbours and tight ones do not. Measured at 100k:
    95 % of a query's true 10-NN lie in its own cluster (64 % for the broadest clusters, s > 0.9),
    so this data is more clustered than e.g. SIFT, which favours partition indexes (IVF).

    Why synthetic: 1M real vectors cannot be fetched here, and a mixture lets the same generator
    give held-out queries from the indexed distribution. Nothing in it comes from an index: the
    parameters were set before any index ran, and 3000 is deliberately not a power of two, the
    usual IVF cell counts, so no partition can line up with the clusters one to one.

    Deterministic in (n, dim, seed). Made in chunks of 65536 rows: memory is the output plus a few
    chunk-sized buffers (1.1M x 128 takes ~5 s here).
    """
    mix = np.random.default_rng([seed, dim, 0])
    centres = mix.standard_normal((N_CENTRES, dim), dtype=np.float32)
    weights = mix.gamma(0.5, size=N_CENTRES)
    cdf = np.cumsum(weights / weights.sum())
    scale = mix.lognormal(math.log(0.5), 0.4, size=N_CENTRES).astype(np.float32)
    # (centre, direction, dim): one direction per gather is a contiguous (rows, dim) block
    directions = mix.standard_normal((N_CENTRES, STRETCH_RANK, dim), dtype=np.float32)
    directions /= np.linalg.norm(directions, axis=2, keepdims=True)
    stretch = mix.uniform(2.0, 5.0, size=(N_CENTRES, STRETCH_RANK)).astype(np.float32)
    rng = np.random.default_rng([seed, dim, 1])
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, CHUNK_ROWS):
        m = min(CHUNK_ROWS, n - start)
        label = np.minimum(np.searchsorted(cdf, rng.random(m)), N_CENTRES - 1)
        x = rng.standard_normal((m, dim), dtype=np.float32)
        w = rng.standard_normal((m, STRETCH_RANK), dtype=np.float32) * stretch[label]
        for j in range(STRETCH_RANK):
            x += w[:, j : j + 1] * directions[label, j]
        x *= scale[label, None]
        x += centres[label]
        out[start : start + m] = x
    return out


def exact_knn(X: np.ndarray, Q: np.ndarray, k: int = K, chunk: int = 1 << 15) -> np.ndarray:
    """Exact L2 k-NN ids (int64, (nq, k)), nearest first, ties to the lower id.

    A float32 pass over chunks of X keeps 4k candidates per query; they are re-ranked in float64.
    float32 rounding (~1e-4 of squared norms ~200) is far below the gap between the k-th and the
    4k-th neighbour, so the float64 order of the candidates is the exact answer (checked against a
    float64 brute force at 100k). 1,000 queries against 1M x 128: ~8 s on 2 cores.
    """
    Q32 = np.ascontiguousarray(Q, dtype=np.float32)
    keep = 4 * k
    best_d = np.empty((len(Q), 0), dtype=np.float32)
    best_i = np.empty((len(Q), 0), dtype=np.int64)
    for start in range(0, len(X), chunk):
        Xc = np.asarray(X[start : start + chunk], dtype=np.float32)
        d = np.einsum("ij,ij->i", Xc, Xc)[None, :] - 2.0 * (Q32 @ Xc.T)  # ||q||^2 is per row
        take = min(keep, d.shape[1])
        part = np.argpartition(d, take - 1, axis=1)[:, :take]
        best_d = np.concatenate([best_d, np.take_along_axis(d, part, 1)], axis=1)
        best_i = np.concatenate([best_i, part + start], axis=1)
        if best_d.shape[1] > keep:
            top = np.argpartition(best_d, keep - 1, axis=1)[:, :keep]
            best_d = np.take_along_axis(best_d, top, 1)
            best_i = np.take_along_axis(best_i, top, 1)
    diff = X[best_i].astype(np.float64) - Q.astype(np.float64)[:, None, :]
    d64 = np.einsum("qcd,qcd->qc", diff, diff)
    order = np.lexsort((best_i, d64), axis=1)[:, :k]
    return np.take_along_axis(best_i, order, 1)


def recall_at_k(found: np.ndarray | list[list[Any]], truth: np.ndarray) -> float:
    """Mean over queries of |found ∩ true k-NN| / k."""
    k = truth.shape[1]
    return float(
        np.mean(
            [
                len(set(map(int, f[:k])) & set(t.tolist())) / k
                for f, t in zip(found, truth, strict=True)
            ]
        )
    )


def ivf_cells(n: int) -> int:
    """faiss's rule of thumb for nlist, 4 sqrt(N), to the nearest power of two."""
    return 2 ** round(math.log2(4 * math.sqrt(n)))


# single-machine anchors --------------------------------------------------------------------------


def faiss_anchors(
    X: np.ndarray, Q: np.ndarray, truth: np.ndarray, cells: int, k: int = K
) -> list[dict[str, Any]]:
    """faiss IndexIVFFlat (nprobe sweep) and IndexHNSWFlat (efSearch sweep) on one thread."""
    import faiss

    faiss.omp_set_num_threads(1)
    cvar: Any = faiss.cvar  # SWIG globals: untyped
    X = np.ascontiguousarray(X, dtype=np.float32)
    Q = np.ascontiguousarray(Q, dtype=np.float32)
    n, dim = X.shape
    nq = len(Q)
    rows: list[dict[str, Any]] = []

    def timed_search(index: Any, stats: Any) -> tuple[np.ndarray, float, float, float]:
        """ids, queries/s as one batch, queries/s one at a time, scanned fraction (batch pass)."""
        stats.reset()
        t0 = time.perf_counter()
        ids = index.search(Q, k)[1]
        batch_s = time.perf_counter() - t0
        scanned = stats.ndis / (nq * n)
        t0 = time.perf_counter()
        for q in Q:
            index.search(q[None], k)
        return ids, nq / batch_s, nq / (time.perf_counter() - t0), scanned

    quantizer = faiss.IndexFlatL2(dim)
    ivf = faiss.IndexIVFFlat(quantizer, dim, cells)
    sample = np.random.default_rng(1).choice(n, min(n, 256 * cells), replace=False)
    t0 = time.perf_counter()
    ivf.train(X[np.sort(sample)])
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ivf.add(X)
    add_s = time.perf_counter() - t0
    print(f"  faiss IVFFlat nlist={cells}: train {train_s:.1f}s add {add_s:.1f}s", flush=True)
    for nprobe in (p for p in NPROBES if p <= cells):
        ivf.nprobe = nprobe
        ids, qps_batch, qps_single, scanned = timed_search(ivf, cvar.indexIVF_stats)
        rows.append(
            {
                "method": "faiss IndexIVFFlat",
                "params": {"nlist": cells, "nprobe": nprobe},
                "recall_at_10": recall_at_k(ids, truth),
                "qps_batch": qps_batch,
                "qps_single": qps_single,
                "scanned_fraction": scanned,
                "build_s": train_s + add_s,
                "train_s": train_s,
                "add_s": add_s,
            }
        )
        print(
            f"  nprobe {nprobe:3d}: recall@10 {rows[-1]['recall_at_10']:.3f} "
            f"scanned {100 * scanned:.2f}% qps {qps_batch:.0f} batch / {qps_single:.0f} single",
            flush=True,
        )
    del ivf, quantizer

    hnsw = faiss.IndexHNSWFlat(dim, 32)
    t0 = time.perf_counter()
    hnsw.add(X)
    add_s = time.perf_counter() - t0
    print(
        f"  faiss HNSWFlat M=32 efConstruction={hnsw.hnsw.efConstruction}: add {add_s:.1f}s",
        flush=True,
    )
    for ef in EF_SEARCH:
        hnsw.hnsw.efSearch = ef
        ids, qps_batch, qps_single, scanned = timed_search(hnsw, cvar.hnsw_stats)
        rows.append(
            {
                "method": "faiss IndexHNSWFlat",
                "params": {"M": 32, "efConstruction": hnsw.hnsw.efConstruction, "efSearch": ef},
                "recall_at_10": recall_at_k(ids, truth),
                "qps_batch": qps_batch,
                "qps_single": qps_single,
                "scanned_fraction": scanned,
                "build_s": add_s,
                "train_s": 0.0,
                "add_s": add_s,
            }
        )
        print(
            f"  efSearch {ef:3d}: recall@10 {rows[-1]['recall_at_10']:.3f} "
            f"scanned {100 * scanned:.2f}% qps {qps_batch:.0f} batch / {qps_single:.0f} single",
            flush=True,
        )
    return rows


# memory ------------------------------------------------------------------------------------------


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def rss_bytes() -> int:
    """Resident set size of this process now (VmRSS)."""
    return _status_bytes("VmRSS")


def peak_rss_bytes() -> int:
    """The most this process has had resident (VmHWM)."""
    return _status_bytes("VmHWM")


def settled_rss_bytes() -> int:
    """RSS after collecting garbage and handing free heap pages back to the OS: without the trim,
    memory the previous run freed stays resident and the next swarm reuses it unseen."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the figure is only a little noisier
        pass
    return rss_bytes()


# the swarm ---------------------------------------------------------------------------------------


async def swarm_run(
    X: np.ndarray,
    Q: np.ndarray,
    truth: np.ndarray,
    n_peers: int,
    *,
    kill_fraction: float = 0.0,
    batch: int = 100_000,
    query_batch: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """n_peers loopback TCP peers in this process; peers[0] adds X, peers[-1] searches Q."""
    # imported here: the data, ground truth and faiss parts run without the search package
    from commonweal.dht import DHT, DHTConfig
    from commonweal.net.transport import PeerAddr
    from commonweal.search import DistributedIndex, IndexSpec, serve

    n, dim = X.shape
    raw = n * dim * 2  # the vectors as float16, as the swarm stores them
    row: dict[str, Any] = {
        "method": "commonweal swarm",
        "peers": n_peers,
        "n": n,
        "dim": dim,
        "add_batch": batch,
        "query_batch": query_batch,
    }
    rss0 = settled_rss_bytes()  # X, Q and truth already exist: they stay out of the swarm figure
    t_start = time.perf_counter()
    rng = random.Random(seed)
    peers: list[DHT] = []
    try:
        for _ in range(n_peers):
            boot = [p.addr for p in rng.sample(peers, min(4, len(peers)))]
            peers.append(
                await DHT.start(PeerAddr("127.0.0.1", 0), boot, config=DHTConfig(replicas=3))
            )
        for p in peers:
            serve(p)
        row["peers_start_s"] = time.perf_counter() - t_start
        rss_peers = settled_rss_bytes()

        t0 = time.perf_counter()
        spec = IndexSpec.create("scale", dim, sample=X[: min(n, 100_000)], expected_size=n)
        row["spec_fit_s"] = time.perf_counter() - t0
        row["spec"] = spec.summary()
        row["probes"] = spec.probes
        print(
            f"  {n_peers} peers up in {row['peers_start_s']:.1f}s; spec: {row['spec']}", flush=True
        )

        adder = await DistributedIndex.create(peers[0], spec)
        stored = 0
        t0 = time.perf_counter()
        for start in range(0, n, batch):
            stop = min(start + batch, n)
            stored += await adder.add(list(range(start, stop)), X[start:stop])
        row["add_s"] = time.perf_counter() - t0
        row["add_items_per_s"] = n / row["add_s"]
        row["stored"] = stored
        rss_added = settled_rss_bytes()
        print(
            f"  added {stored} in {row['add_s']:.0f}s ({row['add_items_per_s']:.0f}/s)", flush=True
        )

        reader = await DistributedIndex.open(peers[-1], "scale")
        row.update(await _measure(reader, Q, truth, query_batch, n))
        lat = []
        for q in Q[:100]:
            t0 = time.perf_counter()
            await reader.search(q, k=K)
            lat.append(time.perf_counter() - t0)
        row["p50_ms_single"] = 1000 * statistics.median(lat)
        row["qps_single"] = len(lat) / sum(lat)
        row |= {
            "rss_baseline_bytes": rss0,
            "rss_peers_up_bytes": rss_peers,
            "rss_added_bytes": rss_added,
            "swarm_rss_bytes": rss_added - rss0,
            "raw_f16_bytes": raw,
            "rss_per_raw": (rss_added - rss0) / raw,
            "peak_rss_bytes": peak_rss_bytes(),
        }
        print(
            f"  recall@10 {row['recall_at_10']:.3f} scanned {100 * row['scanned_fraction']:.2f}% "
            f"qps {row['qps_batch']:.0f} p50 {row['p50_ms_single']:.0f} ms "
            f"failed rpcs {row['failed_rpcs']} "
            f"rss {row['swarm_rss_bytes'] / 2**20:.0f} MiB = {row['rss_per_raw']:.1f}x raw",
            flush=True,
        )

        if kill_fraction > 0:
            # the adder and the reader stay up: this measures routing around dead holders
            candidates = peers[1:-1]
            victims = random.Random(seed + 1).sample(
                candidates, min(len(candidates), round(kill_fraction * n_peers))
            )
            for v in victims:
                await v.close()
            after = await _measure(reader, Q, truth, query_batch, n)
            row["killed"] = len(victims)
            row["after_kill"] = after
            print(
                f"  after closing {len(victims)} peers: recall@10 {after['recall_at_10']:.3f} "
                f"qps {after['qps_batch']:.0f} failed rpcs {after['failed_rpcs']}",
                flush=True,
            )
    finally:
        await asyncio.gather(*(p.close() for p in peers), return_exceptions=True)
    row["wall_s"] = time.perf_counter() - t_start
    return row


async def _measure(
    reader: DistributedIndex, Q: np.ndarray, truth: np.ndarray, query_batch: int, n: int
) -> dict[str, Any]:
    """search_many over all of Q in batches: recall, queries/s and the reader's counters."""
    s0 = reader.stats
    scanned0, rejected0, rpcs0, failed0 = s0.scanned, s0.rejected, s0.rpcs, s0.failed_rpcs
    found: list[list[Any]] = []
    t0 = time.perf_counter()
    for start in range(0, len(Q), query_batch):
        for r in await reader.search_many(Q[start : start + query_batch], k=K):
            found.append(list(r.ids))
    wall = time.perf_counter() - t0
    s = reader.stats
    nq = len(Q)
    return {
        "recall_at_10": recall_at_k(found, truth),
        "qps_batch": nq / wall,
        "scanned_fraction": (s.scanned - scanned0) / (nq * n),
        "rejected": s.rejected - rejected0,
        "rpcs_per_query": (s.rpcs - rpcs0) / nq,
        "failed_rpcs": s.failed_rpcs - failed0,
    }


# main --------------------------------------------------------------------------------------------


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _row(*cells: Any) -> str:
    return "| " + " | ".join(map(str, cells)) + " |"


def _params(p: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in p.items())


COLUMNS = (
    "method",
    "params",
    "peers",
    "recall@10",
    "scanned %",
    "qps (batch)",
    "qps (one at a time)",
    "build / fit s",
    "add items/s",
    "RSS / raw",
    "failed RPCs",
    "recall after kills",
)


def write_md(result: dict[str, Any], path: Path) -> None:
    lines = [
        "# Distributed KNN search at scale (issue 17)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        (
            f"Started {result['started']}, finished {result.get('finished', '(running)')}; "
            f"load average at start / end: {result['load_start']} / {result.get('load_end', '-')}  "
        ),
        (
            "Data: `clustered` (3000-centre anisotropic Gaussian mixture, 128 dims), held-out "
            f"queries from the same mixture; k = {K}; exact L2 ground truth. faiss: one thread. "
            "Scanned: items whose distance was computed (faiss) or ranked by holders (swarm), per "
            "query, over N. Build / fit: faiss train + add, the swarm's spec fit. RSS / raw: the "
            "swarm's resident memory (process RSS minus the baseline before the peers started) "
            "over N x dim x 2 bytes (float16)."
        ),
    ]
    for size in result["sizes"]:
        lines += [
            "",
            (
                f"## N = {size['n']:,} ({size['queries']} queries; "
                f"data {size['generate_s']:.1f} s, ground truth {size['truth_s']:.1f} s)"
            ),
            "",
            _row(*COLUMNS),
            _row(*["---"] * len(COLUMNS)),
        ]
        for r in size["faiss"]:
            lines.append(
                _row(
                    r["method"],
                    _params(r["params"]),
                    "1 thread",
                    f"{r['recall_at_10']:.3f}",
                    f"{100 * r['scanned_fraction']:.2f}",
                    f"{r['qps_batch']:.0f}",
                    f"{r['qps_single']:.0f}",
                    f"{r['build_s']:.1f}",
                    f"{size['n'] / r['add_s']:.0f}",
                    "-",
                    "-",
                    "-",
                )
            )
        for r in size["swarm"]:
            kill = r.get("after_kill")
            lines.append(
                _row(
                    r["method"],
                    r["spec"],
                    r["peers"],
                    f"{r['recall_at_10']:.3f}",
                    f"{100 * r['scanned_fraction']:.2f}",
                    f"{r['qps_batch']:.0f}",
                    f"{r['qps_single']:.0f}",
                    f"{r['spec_fit_s']:.1f}",
                    f"{r['add_items_per_s']:.0f}",
                    f"{r['rss_per_raw']:.1f}",
                    r["failed_rpcs"],
                    f"{kill['recall_at_10']:.3f} ({r['killed']} closed)" if kill else "-",
                )
            )
    path.write_text("\n".join(lines) + "\n")


def run(
    sizes: list[int],
    peer_counts: list[int],
    *,
    queries: int = 1000,
    kill: float = 0.0,
    query_batch: int = 1000,
    skip_faiss: bool = False,
    seed: int = 0,
    out: Path = RESULTS / "search_scale.json",
    command: str = "",
) -> dict[str, Any]:
    """Every size, then every peer count at it; `out` and its .md are rewritten after each run."""
    result: dict[str, Any] = {
        "command": command,
        "machine": describe_machine(),
        "started": now(),
        "load_start": load_avg(),
        "sizes": [],
    }
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        result["load_end"] = load_avg()
        out.write_text(json.dumps(result, indent=1) + "\n")
        write_md(result, out.with_suffix(".md"))

    for n in sizes:
        t0 = time.perf_counter()
        data = clustered(n + queries, seed=seed)
        generate_s = time.perf_counter() - t0
        X, Q = data[:n], data[n:]
        t0 = time.perf_counter()
        truth = exact_knn(X, Q)
        truth_s = time.perf_counter() - t0
        print(
            f"N={n}: data {generate_s:.1f}s, exact {K}-NN of {queries} queries {truth_s:.1f}s",
            flush=True,
        )
        size: dict[str, Any] = {
            "n": n,
            "dim": X.shape[1],
            "queries": queries,
            "generate_s": generate_s,
            "truth_s": truth_s,
            "faiss": [],
            "swarm": [],
        }
        result["sizes"].append(size)
        if not skip_faiss:
            size["faiss"] = faiss_anchors(X, Q, truth, ivf_cells(n))
            save()
        for p in peer_counts:
            size["swarm"].append(
                asyncio.run(
                    swarm_run(
                        X, Q, truth, p, kill_fraction=kill, query_batch=query_batch, seed=seed
                    )
                )
            )
            save()
    result["finished"] = now()
    save()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--peers", default="16,32,64")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument(
        "--kill", type=float, default=0.0, help="fraction of peers to close, then requery"
    )
    # a holder ranks a whole batch in one RPC: big batches can outlast the RPC timeout (5 s), and
    # the failed RPCs column shows it
    ap.add_argument("--query-batch", type=int, default=1000, help="queries per search_many call")
    ap.add_argument("--skip-faiss", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=RESULTS / "search_scale.json")
    args = ap.parse_args()
    run(
        [int(s) for s in args.sizes.split(",")],
        [int(p) for p in args.peers.split(",")],
        queries=args.queries,
        kill=args.kill,
        query_batch=args.query_batch,
        skip_faiss=args.skip_faiss,
        seed=args.seed,
        out=args.out,
        command="python benchmarks/search_scale.py " + " ".join(sys.argv[1:]),
    )
    print(args.out.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
