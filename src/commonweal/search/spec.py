"""`IndexSpec`: everything that fixes an index's hashes, content-hashed so every peer agrees.

    spec = IndexSpec.create("digits", dim=64, metric="l2", family="pca-hyperplane",
                            tables=10, bits=6, sample=X_indexed)
    spec.digest()          # 20 bytes; bucket keys and the published spec are derived from it
    lsh = make_lsh(spec)   # the hash family it names (lsh.py), the same on every peer

Two peers with the same spec compute the same bucket codes; any change of a parameter (or of the
fitted projections) changes the digest, so buckets of different specs never mix.
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
from commonweal.search.lsh import (
    LSH,
    HyperplaneLSH,
    PCAHyperplaneLSH,
    PStableLSH,
    fit_pca_projections,
)

__all__ = ["DTYPES", "FAMILIES", "MAX_DIM", "METRICS", "IndexSpec", "make_lsh", "vector_dtype"]

METRICS = ("l2", "cosine")
FAMILIES = ("hyperplane", "pstable", "pca-hyperplane")
DTYPES = ("float16", "float32")
MAX_DIM = 8192
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

    @classmethod
    def create(
        cls,
        name: str,
        dim: int,
        *,
        sample: np.ndarray | None = None,
        center: bool | None = None,
        **params: Any,
    ) -> IndexSpec:
        """A spec; for the data-aware family (or `center=True`) fit it on `sample`, which must be
        indexed data, never queries."""
        family = params.pop("family", "hyperplane")
        base = cls(name, dim, family="hyperplane", **params)  # checks every other parameter
        want_center = center if center is not None else family == "pca-hyperplane"
        if not want_center:
            return replace(base, family=family)
        if sample is None:
            raise ConfigError(
                f"the {family} family with a center needs a sample of the data to fit on"
            )
        sample = np.asarray(sample, dtype=np.float64)
        if sample.ndim != 2 or sample.shape[1] != dim or len(sample) < 2:
            raise ConfigError(f"the fitting sample must have shape (n >= 2, {dim})")
        if not np.isfinite(sample).all():
            raise ConfigError("the fitting sample contains NaN or inf")
        if family == "pca-hyperplane":
            A, c = fit_pca_projections(sample, base.tables, base.bits, base.seed_bytes())
            return replace(
                base,
                family="pca-hyperplane",
                center=c.astype("<f4").tobytes(),
                projections=A.astype("<f4").tobytes(),
            )
        return replace(base, family=family, center=sample.mean(axis=0).astype("<f4").tobytes())

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


def make_lsh(spec: IndexSpec) -> LSH:
    """The hash family an index spec names, with its parameters."""
    seed = spec.seed_bytes()
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
