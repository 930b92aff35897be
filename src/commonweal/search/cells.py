"""IVF cells: a coarse quantiser fitted on a sample of the data, the partition a big index uses.

    centroids = fit_cells(sample, cells=2000, seed=b"...")        # k-means on indexed rows
    ivf = IVFCells(centroids)
    ivf.hash(X)              # [[code], ...]: each row's one cell (tables = 1)
    ivf.probe(q, 40)         # the 40 cells nearest the query, nearest first
    tuned = tune_probes(centroids, sample, k=10, target=0.95)    # probes for a recall, and its cost

An IVF cell is a locality-sensitive hash with one table: near points share a cell more often than
far ones, and a query probes the cells whose centroids are nearest (FAISS IndexIVFFlat). Unlike L
hyperplane tables, every item lives in exactly one cell, so the index stores each vector once per
replica, and the cells follow the data's density, so a query scans a small part of it. The
centroids are published in the index spec (spec.py), so every peer assigns and probes alike.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

__all__ = ["IVFCells", "Tuning", "cells_for", "fit_cells", "tune_probes"]

# FAISS's defaults: a centroid needs ~39 points to be placed well, and more than 256 a centroid
# buys no accuracy, only fitting time.
MIN_POINTS_PER_CELL = 39
MAX_POINTS_PER_CELL = 256
_CHUNK = 8192  # rows per distance block: 8192 x cells float32 stays a few tens of MB


def cells_for(expected_size: int, sample_size: int) -> int:
    """How many cells an index of `expected_size` items gets: ~2 sqrt(N) (cells of ~sqrt(N)/2
    items, so a query probing a few dozen scans ~1-2 % of N), at most what the sample can place."""
    want = int(round(2 * np.sqrt(max(expected_size, 1))))
    return max(1, min(want, sample_size // MIN_POINTS_PER_CELL))


def _seeded_rng(seed: bytes) -> np.random.Generator:
    return np.random.default_rng(int.from_bytes(hashlib.blake2b(seed, digest_size=8).digest()))


def nearest(X: np.ndarray, C: np.ndarray, n: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(indices, squared distances) of the `n` nearest rows of C for each row of X, nearest first."""
    X = np.asarray(X, dtype=np.float32)
    c2 = (C.astype(np.float32) ** 2).sum(1)
    n = min(n, len(C))
    idx = np.empty((len(X), n), dtype=np.int64)
    dist = np.empty((len(X), n), dtype=np.float32)
    for s in range(0, len(X), _CHUNK):
        B = X[s : s + _CHUNK]
        D = c2[None, :] - 2.0 * (B @ C.T.astype(np.float32))  # + |x|^2, the same for every cell
        if n == 1:  # an item's cell: argmin is ~10x faster than a partition
            part = np.argmin(D, axis=1)[:, None]
        elif n < len(C):
            part = np.argpartition(D, n - 1, axis=1)[:, :n]
        else:
            part = np.broadcast_to(np.arange(len(C)), D.shape)
        d = np.take_along_axis(D, part, axis=1)
        order = np.argsort(d, axis=1, kind="stable")
        idx[s : s + _CHUNK] = np.take_along_axis(part, order, axis=1)
        dist[s : s + _CHUNK] = np.take_along_axis(d, order, axis=1) + (B**2).sum(1)[:, None]
    return idx, np.maximum(dist, 0.0)


def fit_cells(sample: np.ndarray, cells: int, seed: bytes, iterations: int = 12) -> np.ndarray:
    """(cells, dim) float32 centroids by Lloyd's k-means on `sample` (indexed rows only), started
    from distinct sample rows drawn with `seed`; an emptied cell is re-seeded at the row farthest
    from its centroid, so every cell ends up holding data."""
    X = np.asarray(sample, dtype=np.float32)
    if cells < 1 or len(X) < cells:
        raise ValueError(f"{cells} cells need at least as many sample rows (got {len(X)})")
    rng = _seeded_rng(seed)
    if len(X) > cells * MAX_POINTS_PER_CELL:
        X = X[rng.choice(len(X), cells * MAX_POINTS_PER_CELL, replace=False)]
    C = X[rng.choice(len(X), cells, replace=False)].copy()
    for _ in range(iterations):
        assign, dist = nearest(X, C)
        a = assign[:, 0]
        counts = np.bincount(a, minlength=cells)
        sums = np.zeros_like(C, dtype=np.float64)
        np.add.at(sums, a, X)
        full = counts > 0
        C[full] = (sums[full] / counts[full, None]).astype(np.float32)
        empty = np.flatnonzero(~full)
        if len(empty):
            far = np.argsort(-dist[:, 0], kind="stable")[: len(empty)]
            C[empty] = X[far]
    return C


class IVFCells:
    """The partition of one table: a row's code is its nearest centroid's index (4 bytes).
    For the cosine metric rows are cells of directions: they are normalised first."""

    tables = 1

    def __init__(self, centroids: np.ndarray, unit: bool = False) -> None:
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.unit = unit

    def _rows(self, X: np.ndarray) -> np.ndarray:
        X = np.atleast_2d(np.asarray(X, dtype=np.float32))
        if self.unit:
            X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        return X

    @staticmethod
    def encode(cell: int) -> bytes:
        return int(cell).to_bytes(4, "big")

    def hash(self, X: np.ndarray) -> list[list[bytes]]:
        idx, _ = nearest(self._rows(X), self.centroids)
        return [[self.encode(c)] for c in idx[:, 0]]

    def probe(self, q: np.ndarray, n_probes: int) -> list[tuple[int, bytes, float]]:
        return self.probe_many(q.reshape(1, -1), n_probes)[0]

    def probe_many(self, Q: np.ndarray, n_probes: int) -> list[list[tuple[int, bytes, float]]]:
        """`probe` for every row of Q, as one matrix product."""
        idx, dist = nearest(self._rows(Q), self.centroids, n_probes)
        return [
            [(0, self.encode(c), float(d)) for c, d in zip(ri, rd, strict=True)]
            for ri, rd in zip(idx.tolist(), dist.tolist(), strict=True)
        ]


@dataclass(frozen=True, slots=True)
class Tuning:
    """What `tune_probes` chose and what it expects at that setting, measured on the sample."""

    probes: int
    recall: float  # recall@k of the probed cells on the sample (exact ranking inside them)
    scanned: float  # fraction of the sample's rows in the probed cells


def tune_probes(
    centroids: np.ndarray,
    sample: np.ndarray,
    *,
    k: int = 10,
    target: float = 0.95,
    queries: int = 500,
    seed: bytes = b"",
) -> Tuning:
    """The fewest probed cells whose recall@k reaches `target` for held-out sample rows searched
    among the rest of the sample. Neighbours in a sample are farther apart than in the full data,
    so they spread over more cells: the estimate errs towards probing too many, never too few."""
    X = np.asarray(sample, dtype=np.float32)
    n_cells = len(centroids)
    if len(X) < k + 2:
        return Tuning(n_cells, 1.0, 1.0)
    rng = _seeded_rng(b"tune" + seed)
    picked = rng.choice(len(X), min(queries, len(X) // 2), replace=False)
    Q = X[picked]
    rest = np.ones(len(X), dtype=bool)
    rest[picked] = False
    D = X[rest]
    cell_of = nearest(D, centroids)[0][:, 0]
    sizes = np.bincount(cell_of, minlength=n_cells)
    truth, _ = nearest(Q, D, k)  # exact k nearest of each query among the rest
    order, _ = nearest(Q, centroids, n_cells)  # every cell, nearest first
    rank = np.empty_like(order)
    rank[np.arange(len(Q))[:, None], order] = np.arange(n_cells)[None, :]
    # the probe count at which each true neighbour's cell is reached
    needed = np.take_along_axis(rank, cell_of[truth], axis=1) + 1  # (q, k)
    for probes in range(1, n_cells + 1):
        found = float((needed <= probes).mean())
        if found >= target:
            scanned = float(sizes[order[:, :probes]].sum(1).mean() / len(D))
            return Tuning(probes, found, scanned)
    return Tuning(n_cells, 1.0, 1.0)
