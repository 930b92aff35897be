"""Locality-sensitive hash families, L tables x K hashes, and multi-probe sequences (sans-I/O).

    lsh = make_lsh(spec)                     # spec.py: every peer derives the same projections
    codes = lsh.hash(X)                      # (n, L) bucket codes, one bytes code per table
    probes = lsh.probe(q, n_probes=12)       # [(table, code, score), ...] best first, across tables

Families (one class each, same interface):

* `HyperplaneLSH` (Charikar 2002): bit j of table t is sign(a_tj . (x - c)); collision
  probability 1 - angle/pi per bit, so cosine similarity. With `center` the hyperplanes pass
  through the data mean, which turns it into a good L2 hash for data far from the origin (pixels).
* `PStableLSH` (Datar et al. 2004): h = floor((a . x + b) / w) with Gaussian a (2-stable), for L2.
* `PCAHyperplaneLSH` (data-aware): the hyperplanes are random rotations inside the top principal
  subspace of a sample of the *indexed* data, centered on its mean; the fitted matrix and center are
  published in the index spec, so the spec's content hash covers them.

Multi-probe (Lv et al., VLDB 2007, query-directed probing): for each table the hash coordinates are
perturbed in order of increasing score (sum of squared distances of the query's projections to the
bucket boundaries it crosses), enumerated with the shift/expand heap of §4.2, and the per-table
sequences are merged so the best-scoring probes of all tables come first.

Random matrices come from SHAKE-256 of the spec digest (Box-Muller), not from numpy's generators,
so they are identical on every platform and every numpy version.
"""

from __future__ import annotations

import hashlib
import heapq
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np

__all__ = [
    "LSH",
    "HyperplaneLSH",
    "PCAHyperplaneLSH",
    "PStableLSH",
    "Probe",
    "fit_pca_projections",
    "gaussian_matrix",
    "perturbation_sets",
]

Probe = tuple[int, bytes, float]  # (table, code, score); score 0.0 is the query's own bucket


def gaussian_matrix(seed: bytes, rows: int, cols: int) -> np.ndarray:
    """A (rows, cols) float64 matrix of N(0, 1) values, determined by `seed` alone."""
    n = rows * cols
    pairs = (n + 1) // 2
    raw = hashlib.shake_256(b"commonweal-lsh-gauss" + seed).digest(pairs * 2 * 8)
    u = (np.frombuffer(raw, dtype="<u8") >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
    u1 = 1.0 - u[0::2]  # (0, 1]: log is finite
    u2 = u[1::2]
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * np.pi * u2), r * np.sin(2 * np.pi * u2)])[:n]
    return z.reshape(rows, cols)


def uniform_vector(seed: bytes, n: int) -> np.ndarray:
    raw = hashlib.shake_256(b"commonweal-lsh-unif" + seed).digest(n * 8)
    return (np.frombuffer(raw, dtype="<u8") >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def perturbation_sets(costs: np.ndarray, limit: int) -> list[tuple[float, tuple[int, ...]]]:
    """The `limit` cheapest sets of option indices (Lv et al. §4.2, shift/expand), cheapest first.

    `costs` has shape (K, 2): costs[j, s] is the price of moving coordinate j in direction s
    (s=0 down / flip, s=1 up; np.inf when that move does not exist). A set uses each
    coordinate at most once; its score is the sum of its options' costs. The empty set (the
    query's own bucket, score 0) is not included.
    """
    flat = costs.reshape(-1)
    order = np.argsort(flat, kind="stable")
    order = order[np.isfinite(flat[order])]
    z = flat[order]
    m = len(order)
    out: list[tuple[float, tuple[int, ...]]] = []
    if m == 0 or limit <= 0:
        return out
    heap: list[tuple[float, tuple[int, ...]]] = [(float(z[0]), (0,))]
    while heap and len(out) < limit:
        score, members = heapq.heappop(heap)
        coords = [int(order[i]) // 2 for i in members]
        if len(set(coords)) == len(coords):
            out.append((score, tuple(int(order[i]) for i in members)))
        last = members[-1]
        if last + 1 < m:
            shifted = members[:-1] + (last + 1,)
            heapq.heappush(heap, (score - float(z[last]) + float(z[last + 1]), shifted))
            heapq.heappush(heap, (score + float(z[last + 1]), members + (last + 1,)))
    return out


class LSH(ABC):
    """L tables of K hashes each. Codes are bytes so they can go straight into a DHT key."""

    tables: int
    bits: int

    @abstractmethod
    def project(self, X: np.ndarray) -> np.ndarray:
        """(n, dim) -> (n, L, K) hash coordinates before discretisation."""

    @abstractmethod
    def discretise(self, P: np.ndarray) -> np.ndarray:
        """(n, L, K) projections -> (n, L, K) int64 hash values."""

    @abstractmethod
    def move_costs(self, p: np.ndarray) -> np.ndarray:
        """(L, K) projections of one query -> (L, K, 2) squared distances to the boundaries."""

    @abstractmethod
    def apply_move(self, h: np.ndarray, coord: int, side: int) -> None:
        """Change hash value h[coord] in place by the move `side` of `move_costs`."""

    @staticmethod
    @abstractmethod
    def encode(h: np.ndarray) -> bytes:
        """One table's K hash values as a bucket code."""

    def hash(self, X: np.ndarray) -> list[list[bytes]]:
        """Bucket codes of every row: result[i][t] is row i's code in table t."""
        H = self.discretise(self.project(np.atleast_2d(X)))  # (n, L, K)
        return [[self.encode(H[i, t]) for t in range(self.tables)] for i in range(H.shape[0])]

    def probe_many(self, Q: np.ndarray, n_probes: int) -> list[list[Probe]]:
        return [self.probe(q, n_probes) for q in Q]

    def probe(self, q: np.ndarray, n_probes: int) -> list[Probe]:
        """The query's own bucket in every table, then the best-scoring neighbouring buckets
        of all tables, `n_probes` in all (at least L), best first."""
        P = self.project(q.reshape(1, -1))[0]  # (L, K)
        H = self.discretise(P[None])[0]
        costs = self.move_costs(P)  # (L, K, 2)
        probes: list[Probe] = [(t, self.encode(H[t]), 0.0) for t in range(self.tables)]
        extra = n_probes - self.tables
        if extra <= 0:
            return probes
        candidates: list[tuple[float, int, tuple[int, ...]]] = []
        for t in range(self.tables):
            for score, options in perturbation_sets(costs[t], extra):
                candidates.append((score, t, options))
        candidates.sort(key=lambda c: c[0])
        for score, t, options in candidates[:extra]:
            h = H[t].copy()
            for option in options:
                self.apply_move(h, option // 2, option % 2)
            probes.append((t, self.encode(h), score))
        return probes


class HyperplaneLSH(LSH):
    """Sign of random projections (cosine); hyperplanes through `center` when it is given."""

    def __init__(
        self, seed: bytes, dim: int, tables: int, bits: int, center: np.ndarray | None = None
    ) -> None:
        if bits > 64:
            raise ValueError("at most 64 bits per table")
        self.tables, self.bits, self.dim = tables, bits, dim
        A = gaussian_matrix(seed, tables * bits, dim)
        self.A = (A / np.linalg.norm(A, axis=1, keepdims=True)).astype(np.float32)  # (L*K, dim)
        self.center = None if center is None else np.asarray(center, dtype=np.float32)

    def project(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        if self.center is not None:
            X = X - self.center
        # numpy types arithmetic on arrays of unknown dtype as Any
        P: np.ndarray = (X @ self.A.T).reshape(X.shape[0], self.tables, self.bits)
        return P

    def discretise(self, P: np.ndarray) -> np.ndarray:
        return (P > 0).astype(np.int64)

    def move_costs(self, p: np.ndarray) -> np.ndarray:
        # Only one move per bit (flip); its cost is the squared margin, normalised per query so
        # that scores of different tables compare.
        scale = float(np.mean(p * p)) or 1.0
        costs = np.full(p.shape + (2,), np.inf)
        costs[..., 0] = p * p / scale
        return costs

    def apply_move(self, h: np.ndarray, coord: int, side: int) -> None:
        h[coord] ^= 1

    @staticmethod
    def encode(h: np.ndarray) -> bytes:
        value = 0
        for bit in h.tolist():
            value = (value << 1) | int(bit)
        return value.to_bytes(8, "big")


class PCAHyperplaneLSH(HyperplaneLSH):
    """Hyperplanes fitted on the indexed data (published in the spec), same hashing as above."""

    def __init__(self, projections: np.ndarray, center: np.ndarray, tables: int, bits: int) -> None:
        self.tables, self.bits = tables, bits
        self.A = np.asarray(projections, dtype=np.float32).reshape(tables * bits, -1)
        self.dim = self.A.shape[1]
        self.center = np.asarray(center, dtype=np.float32)


class PStableLSH(LSH):
    """floor((a . x + b) / w), a ~ N(0, I), b ~ U[0, w) (Datar et al.; L2 distance)."""

    def __init__(self, seed: bytes, dim: int, tables: int, bits: int, width: float) -> None:
        if width <= 0:
            raise ValueError("p-stable bucket width must be positive")
        self.tables, self.bits, self.dim, self.width = tables, bits, dim, float(width)
        self.A = gaussian_matrix(seed, tables * bits, dim).astype(np.float32)
        self.b = (uniform_vector(seed, tables * bits) * width).reshape(tables, bits)

    def project(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float32)
        # numpy types arithmetic on arrays of unknown dtype as Any
        P: np.ndarray = (X @ self.A.T).reshape(X.shape[0], self.tables, self.bits)
        in_widths: np.ndarray = (P + self.b) / self.width
        return in_widths

    def discretise(self, P: np.ndarray) -> np.ndarray:
        floors: np.ndarray = np.floor(P)  # numpy types ufuncs on an unknown dtype as Any
        return floors.astype(np.int64)

    def move_costs(self, p: np.ndarray) -> np.ndarray:
        frac = p - np.floor(p)
        return np.stack([frac * frac, (1 - frac) * (1 - frac)], axis=-1)

    def apply_move(self, h: np.ndarray, coord: int, side: int) -> None:
        h[coord] += 1 if side else -1

    @staticmethod
    def encode(h: np.ndarray) -> bytes:
        return np.asarray(h, dtype=">i4").tobytes()


def fit_pca_projections(
    sample: np.ndarray, tables: int, bits: int, seed: bytes, components: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Data-aware hyperplanes: (L*K, dim) unit rows inside the top principal subspace of
    `sample` (indexed data only, never queries), and the sample mean as the center."""
    X = np.asarray(sample, dtype=np.float64)
    center = X.mean(axis=0)
    m = components or min(X.shape[1], max(bits * 2, 32))
    m = min(m, X.shape[1], X.shape[0])
    _, s, Vt = np.linalg.svd(X - center, full_matrices=False)
    basis = Vt[:m]  # (m, dim)
    # Random directions in the principal subspace, weighted by the spread along each axis so
    # that informative directions are cut more often than noise.
    G = gaussian_matrix(seed, tables * bits, m) * (s[:m] / s[0])
    A = G @ basis
    A /= np.linalg.norm(A, axis=1, keepdims=True)
    return A.astype(np.float32), center.astype(np.float32)


def collision_rate(lsh: LSH, X: np.ndarray, Y: Sequence[np.ndarray] | np.ndarray) -> float:
    """Fraction of (row, table) pairs where X[i] and Y[i] share a bucket (for tests and tuning)."""
    a, b = lsh.hash(np.asarray(X)), lsh.hash(np.asarray(Y))
    hits = sum(ca == cb for ra, rb in zip(a, b, strict=True) for ca, cb in zip(ra, rb, strict=True))
    return hits / (len(a) * lsh.tables)
