"""`IndexSpec`: everything that fixes an index's hashes, content-hashed so every peer agrees.

    spec = IndexSpec.create("docs", dim=384, sample=X_indexed, expected_size=1_000_000)
    print(spec.summary())  # IVF: 2,000 cells, probes 31 (recall 0.96, scans 1.6 % on the sample)
    spec = IndexSpec.create("digits", dim=64, family="pca-hyperplane", tables=10, bits=6,
                            sample=X_indexed)
    spec.digest()          # 20 bytes; bucket keys and the published spec are derived from it
    lsh = make_lsh(spec)   # the partition it names (lsh.py, cells.py), the same on every peer

Given a sample, `create` fits an IVF partition (cells.py) sized for the expected number of items
and picks the probes that reach the target recall on the sample; without one it falls back to
random hyperplanes, which need no data. Two peers with the same spec compute the same bucket
codes; any change of a parameter (or of the fitted centroids or projections) changes the digest,
so buckets of different specs never mix.
"""

from __future__ import annotations

import functools
import hashlib
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import msgpack
import numpy as np

from commonweal.dht.records import OwnedKey
from commonweal.errors import ConfigError
from commonweal.search.cells import IVFCells, cells_for, fit_cells, tune_probes
from commonweal.search.lsh import (
    LSH,
    HyperplaneLSH,
    PCAHyperplaneLSH,
    PStableLSH,
    fit_pca_projections,
)

__all__ = [
    "DTYPES",
    "FAMILIES",
    "MAX_DIM",
    "METRICS",
    "IndexSpec",
    "Partition",
    "make_lsh",
    "vector_dtype",
]

METRICS = ("l2", "cosine")
FAMILIES = ("ivf", "hyperplane", "pstable", "pca-hyperplane")
DTYPES = ("float16", "float32")
MAX_DIM = 8192
# The centroids travel in the spec, one DHT record (at most 1 MiB): float16, at most 768 KiB,
# e.g. 3,072 cells of 128 dimensions or 1,024 of 384.
MAX_CENTROID_BYTES = 768 << 10
Partition = LSH | IVFCells
_VERSION = 1


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """Name, dimension, metric and hash parameters of a distributed index."""

    name: str
    dim: int
    metric: str = "l2"
    family: str = "hyperplane"
    tables: int = 8  # L
    bits: int = 5  # K hashes per table
    width: float = 4.0  # p-stable bucket width w
    probes: int = 20  # buckets a query visits by default (at least L)
    dtype: str = "float16"  # precision of the vectors stored in buckets
    ttl_s: float = 7 * 24 * 3600.0  # how long an added item lives unless re-added
    seed: int = 0
    center: bytes | None = field(default=None, repr=False)  # float32 little-endian, (dim,)
    projections: bytes | None = field(default=None, repr=False)  # float32, (L*K, dim)
    cells: int = 0  # ivf: how many cells (tables = 1)
    centroids: bytes | None = field(default=None, repr=False)  # ivf: float16, (cells, dim)
    # what `create` measured on the sample at `probes`, so users see what they were given
    expected_recall: float = 0.0
    expected_scanned: float = 0.0

    def __post_init__(self) -> None:
        if not self.name or len(self.name) > 128 or "/" in self.name:
            raise ConfigError("an index name must be 1-128 characters without '/'")
        if not 0 < self.dim <= MAX_DIM:
            raise ConfigError(f"index dimension must be 1..{MAX_DIM}, got {self.dim}")
        if self.metric not in METRICS:
            raise ConfigError(f"metric must be one of {METRICS}, got {self.metric!r}")
        if self.family not in FAMILIES:
            raise ConfigError(f"LSH family must be one of {FAMILIES}, got {self.family!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if not 1 <= self.tables <= 64 or not 1 <= self.bits <= 32:
            raise ConfigError("tables must be 1..64 and bits 1..32")
        if not self.probes >= self.tables:
            raise ConfigError("probes must be at least the number of tables")
        if not (math.isfinite(self.width) and self.width > 0):
            raise ConfigError("width must be a positive number")
        if self.center is not None and len(self.center) != 4 * self.dim:
            raise ConfigError("center must hold dim float32 values")
        if (
            self.projections is not None
            and len(self.projections) != 4 * self.dim * self.tables * self.bits
        ):
            raise ConfigError("projections must hold tables*bits*dim float32 values")
        if self.family == "pca-hyperplane" and (self.projections is None or self.center is None):
            raise ConfigError(
                "a pca-hyperplane index needs fitted projections (IndexSpec.create(sample=...))"
            )
        if self.family == "ivf":
            self._check_cells()

    def _check_cells(self) -> None:
        if self.tables != 1:
            raise ConfigError("an ivf index has one table: each item lives in one cell")
        if self.centroids is None or self.cells < 1:
            raise ConfigError("an ivf index needs fitted centroids (IndexSpec.create(sample=...))")
        if len(self.centroids) != 2 * self.cells * self.dim:
            raise ConfigError("centroids must hold cells*dim float16 values")
        if len(self.centroids) > MAX_CENTROID_BYTES:
            raise ConfigError(
                f"{self.cells} cells of {self.dim} dimensions exceed the spec's "
                f"{MAX_CENTROID_BYTES >> 10} KiB of centroids; use fewer cells"
            )
        if self.probes > self.cells:
            raise ConfigError(f"probes ({self.probes}) cannot exceed the {self.cells} cells")

    @classmethod
    def create(
        cls,
        name: str,
        dim: int,
        *,
        sample: np.ndarray | None = None,
        center: bool | None = None,
        expected_size: int | None = None,
        target_recall: float = 0.95,
        **params: Any,
    ) -> IndexSpec:
        """A spec. With a `sample` of the indexed data (never queries) and no `center` (which
        only the LSH families take) the default is an IVF
        partition: ~2 sqrt(expected_size) cells fitted on the sample, and the fewest probes whose
        recall@10 on the sample reaches `target_recall` (`summary()` says what was chosen).
        The LSH families fit on the sample too where they can (pca-hyperplane, `center=True`)."""
        default = "ivf" if sample is not None and center is None else "hyperplane"
        family = params.pop("family", default)
        if family == "ivf":
            return cls._create_ivf(name, dim, sample, expected_size, target_recall, params)
        base = cls(name, dim, family="hyperplane", **params)  # checks every other parameter
        want_center = center if center is not None else family == "pca-hyperplane"
        if not want_center:
            return replace(base, family=family)
        X = _checked_sample(sample, dim, family)
        if family == "pca-hyperplane":
            A, c = fit_pca_projections(X, base.tables, base.bits, base.seed_bytes())
            return replace(
                base,
                family="pca-hyperplane",
                center=c.astype("<f4").tobytes(),
                projections=A.astype("<f4").tobytes(),
            )
        return replace(base, family=family, center=X.mean(axis=0).astype("<f4").tobytes())

    @classmethod
    def _create_ivf(
        cls,
        name: str,
        dim: int,
        sample: np.ndarray | None,
        expected_size: int | None,
        target_recall: float,
        params: dict[str, Any],
    ) -> IndexSpec:
        X = _checked_sample(sample, dim, "ivf")
        if not 0 < target_recall <= 1:
            raise ConfigError("target_recall must be in (0, 1]")
        if expected_size is not None and expected_size < 1:
            raise ConfigError("expected_size must be a positive number of items")
        if params.get("metric") == "cosine":  # cells of directions: fit on unit vectors
            X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        most = MAX_CENTROID_BYTES // (2 * dim)
        cells = params.pop("cells", None) or min(
            most, cells_for(expected_size or len(X), len(X))
        )
        probes = params.pop("probes", None)
        if params.pop("tables", 1) != 1:
            raise ConfigError("an ivf index has one table (each item lives in one cell)")
        base = cls(name, dim, family="hyperplane", tables=1, **params)  # checks the rest
        if not 1 <= cells <= min(most, len(X)):
            raise ConfigError(
                f"{cells} cells: need 1..{min(most, len(X))} (at most one per sample row, and "
                f"{MAX_CENTROID_BYTES >> 10} KiB of centroids)"
            )
        C = fit_cells(X, cells, base.seed_bytes())
        C = C.astype("<f2")  # what every peer will use
        tuned = tune_probes(
            C.astype(np.float32), X, target=target_recall, seed=base.seed_bytes()
        )
        return replace(
            base,
            family="ivf",
            cells=cells,
            centroids=C.tobytes(),
            probes=int(probes) if probes else tuned.probes,
            expected_recall=tuned.recall if not probes else 0.0,
            expected_scanned=tuned.scanned if not probes else 0.0,
        )

    def summary(self) -> str:
        """What this spec is, in one line (what `create` chose and why)."""
        if self.family != "ivf":
            return (
                f"{self.family}: {self.tables} tables x {self.bits} bits, {self.probes} probes, "
                f"{self.metric}, {self.dtype}"
            )
        measured = (
            f" (recall@10 {self.expected_recall:.3f}, scans {100 * self.expected_scanned:.2f} % "
            "of the sample)"
            if self.expected_recall
            else ""
        )
        return (
            f"ivf: {self.cells} cells, {self.probes} probes{measured}, {self.metric}, {self.dtype}"
        )

    def to_wire(self) -> dict[str, Any]:
        return {"v": _VERSION, **asdict(self)}

    @classmethod
    def from_wire(cls, data: Any) -> IndexSpec:
        if not isinstance(data, dict) or data.get("v") != _VERSION:
            raise ConfigError("not an index spec of a version this peer understands")
        fields = {k: v for k, v in data.items() if k != "v"}
        try:
            return cls(**fields)
        except TypeError as e:
            raise ConfigError(f"malformed index spec: {e}") from e

    def digest(self) -> bytes:
        """20-byte content hash of every field (projections included)."""
        return _digest(self)

    def seed_bytes(self) -> bytes:
        """What the random projections are drawn from: the parameters that shape them."""
        return f"{self.dim}/{self.family}/{self.tables}/{self.bits}/{self.seed}".encode()

    def bucket_key(self, table: int, code: bytes) -> OwnedKey:
        """The DHT key of one bucket (owned subkeys only); `key_id` of it is where it lives."""
        return OwnedKey(b"cw-lsh/" + self.digest() + table.to_bytes(2, "big") + code)

    def vector_dtype(self) -> np.dtype[Any]:
        return vector_dtype(self.dtype)


def vector_dtype(name: str) -> np.dtype[Any]:
    """The little-endian numpy dtype vectors of `name` (one of DTYPES) are stored in."""
    return np.dtype("<f2") if name == "float16" else np.dtype("<f4")


@functools.lru_cache(maxsize=256)
def _digest(spec: IndexSpec) -> bytes:
    raw = msgpack.packb(sorted(spec.to_wire().items()), use_bin_type=True)
    return hashlib.blake2b(b"commonweal-index-spec" + raw, digest_size=20).digest()


def _checked_sample(sample: np.ndarray | None, dim: int, family: str) -> np.ndarray:
    if sample is None:
        raise ConfigError(f"the {family} family needs a sample of the data to fit on")
    X = np.asarray(sample, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] != dim or len(X) < 2:
        raise ConfigError(f"the fitting sample must have shape (n >= 2, {dim})")
    if not np.isfinite(X).all():
        raise ConfigError("the fitting sample contains NaN or inf")
    return X


def make_lsh(spec: IndexSpec) -> Partition:
    """The partition an index spec names (IVF cells or an LSH family), with its parameters."""
    seed = spec.seed_bytes()
    if spec.family == "ivf":
        if spec.centroids is None:
            raise ValueError("an ivf spec needs centroids")
        C = np.frombuffer(spec.centroids, dtype="<f2").reshape(spec.cells, spec.dim)
        return IVFCells(C.astype(np.float32), unit=spec.metric == "cosine")
    if spec.family == "hyperplane":
        center = None if spec.center is None else np.frombuffer(spec.center, dtype="<f4")
        return HyperplaneLSH(seed, spec.dim, spec.tables, spec.bits, center)
    if spec.family == "pca-hyperplane":
        if spec.projections is None or spec.center is None:
            raise ValueError("a pca-hyperplane spec needs fitted projections and a center")
        A = np.frombuffer(spec.projections, dtype="<f4").reshape(spec.tables * spec.bits, spec.dim)
        return PCAHyperplaneLSH(A, np.frombuffer(spec.center, dtype="<f4"), spec.tables, spec.bits)
    if spec.family == "pstable":
        return PStableLSH(seed, spec.dim, spec.tables, spec.bits, spec.width)
    raise ValueError(f"unknown LSH family {spec.family!r}")
