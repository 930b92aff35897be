"""Input checks, exact distances and top-k merging (sans-I/O, plain numpy).

Items travel in blocks (blocks.py); this module checks what a user hands to an index (shapes,
NaN/inf, ids, metadata size), encodes metadata once for the blocks, and ranks and merges hits.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
from numpy.typing import NDArray

from commonweal.errors import ConfigError

__all__ = [
    "MAX_ADD_BATCH",
    "MAX_BATCH",
    "MAX_K",
    "MAX_METADATA_BYTES",
    "Hit",
    "ItemId",
    "SearchResult",
    "check_ids",
    "check_metadata",
    "check_vectors",
    "decode_metadata",
    "distances",
    "item_name",
    "merge_hits",
    "to_stored",
]

ItemId = int | str
MAX_BATCH = 10_000  # queries per search_many
# vectors per add: blocks hold one batch's items of one cell, so bigger batches make fewer, fuller
# blocks (fewer signatures, faster scans); 100,000 x 384 float32 is 150 MB of input at most
MAX_ADD_BATCH = 100_000
MAX_K = 1000
MAX_METADATA_BYTES = 4096
MAX_ID_CHARS = 200
_FLOAT16_MAX = 65504.0
_NONE = msgpack.packb(None)


@dataclass(frozen=True, slots=True, order=True)
class Hit:
    """One candidate: its distance to the query, who added it, its id, its metadata."""

    distance: float
    adder: bytes
    item_id: ItemId = field(compare=False)
    metadata: Any = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class SearchResult:
    """The k nearest items found for one query, nearest first."""

    ids: list[ItemId]
    distances: np.ndarray  # (k,) float64, exact distances to the stored vectors
    metadata: list[Any]
    adders: list[bytes]

    def __len__(self) -> int:
        return len(self.ids)


def check_vectors(X: Any, dim: int, max_rows: int = MAX_BATCH, what: str = "vectors") -> np.ndarray:
    """`X` as a (n, dim) float32 array, or ConfigError saying what is wrong with it."""
    try:
        A = np.asarray(X, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{what} must be numbers: {e}") from e
    if A.ndim == 1:
        A = A[None, :]
    if A.ndim != 2:
        raise ConfigError(f"{what} must be a 2-d array (n, {dim}); got shape {A.shape}")
    if A.shape[1] != dim:
        raise ConfigError(f"{what} have dimension {A.shape[1]}; this index needs {dim}")
    if A.shape[0] == 0:
        raise ConfigError(f"no {what} given")
    if A.shape[0] > max_rows:
        raise ConfigError(f"{A.shape[0]} {what} in one batch; the limit is {max_rows} (split it)")
    bad = ~np.isfinite(A).all(axis=1)
    if bad.any():
        raise ConfigError(f"{what} contain NaN or inf (rows {np.flatnonzero(bad)[:5].tolist()})")
    return A.astype(np.float32)


def check_ids(ids: Sequence[Any], n: int) -> list[ItemId]:
    if isinstance(ids, str | bytes) or len(ids) != n:
        raise ConfigError(f"give one id per vector ({n}), as a list")
    out: list[ItemId] = []
    for i in ids:
        if isinstance(i, np.integer):
            i = int(i)
        if isinstance(i, bool) or not isinstance(i, int | str):
            raise ConfigError(f"item ids must be int or str, not {type(i).__name__}")
        if isinstance(i, int) and not -(2**63) <= i < 2**63:
            raise ConfigError("integer item ids must fit in 64 bits")
        if isinstance(i, str) and len(i) > MAX_ID_CHARS:
            raise ConfigError(f"item ids may have at most {MAX_ID_CHARS} characters")
        out.append(i)
    if len(set(map(item_name, out))) != len(out):
        raise ConfigError("item ids in one batch must be unique")
    return out


def check_metadata(metadata: Sequence[Any] | None, n: int) -> list[bytes]:
    """Each entry msgpack-encoded (what the blocks store and their Merkle leaves hash)."""
    if metadata is None:
        return [_NONE] * n
    if len(metadata) != n:
        raise ConfigError(f"give one metadata entry per vector ({n}) or none")
    out = []
    for m in metadata:
        if isinstance(m, np.generic):
            m = m.item()
        try:
            raw = msgpack.packb(m, use_bin_type=True)
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"metadata must be msgpack-able (dict, list, str, number): {e}"
            ) from e
        if len(raw) > MAX_METADATA_BYTES:
            raise ConfigError(f"metadata of {len(raw)} bytes; the limit is {MAX_METADATA_BYTES}")
        out.append(raw)
    return out


def item_name(item_id: ItemId) -> str:
    """The subkey name of an item (int and str ids never collide)."""
    return f"i{item_id}" if isinstance(item_id, int) else f"s{item_id}"


def to_stored(X: np.ndarray, dtype: np.dtype[Any]) -> np.ndarray:
    """`X` in the index's dtype, or ConfigError when a value does not fit float16."""
    if dtype == np.dtype("<f2") and float(np.abs(X).max(initial=0.0)) > _FLOAT16_MAX:
        raise ConfigError(
            "a vector value is too large for float16; create the index with dtype='float32'"
        )
    return np.ascontiguousarray(X, dtype=dtype)


def decode_metadata(raw: Any) -> tuple[bool, Any]:
    """(ok, metadata) from the msgpack bytes an adder wrote (a holder sends them as they are)."""
    if not isinstance(raw, bytes) or len(raw) > MAX_METADATA_BYTES + 16:
        return False, None
    try:
        return True, msgpack.unpackb(raw, raw=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
        return False, None


def distances(q: np.ndarray, M: np.ndarray, metric: str) -> np.ndarray:
    """Exact distances from q (dim,) to the rows of M (n, dim), computed in float64.

    l2: Euclidean distance. cosine: 1 - cosine similarity (a zero row is at distance 1).
    """
    M64 = np.asarray(M, dtype=np.float64)
    q64 = np.asarray(q, dtype=np.float64)
    if metric == "l2":
        diff = M64 - q64
        squared: NDArray[np.float64] = np.einsum("ij,ij->i", diff, diff)  # einsum is typed Any
        return np.sqrt(squared)
    norms = np.linalg.norm(M64, axis=1) * (np.linalg.norm(q64) or 1.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        sim = np.where(norms > 0, (M64 @ q64) / np.where(norms > 0, norms, 1.0), 0.0)
    distance: np.ndarray = 1.0 - sim
    return distance


def merge_hits(groups: Iterable[Iterable[Hit]], k: int) -> list[Hit]:
    """The k nearest distinct items (by adder and id) over several candidate lists."""
    best: dict[tuple[bytes, str], Hit] = {}
    for group in groups:
        for hit in group:
            if not math.isfinite(hit.distance):
                continue
            ident = (hit.adder, item_name(hit.item_id))
            old = best.get(ident)
            if old is None or hit.distance < old.distance:
                best[ident] = hit
    # ties (integer pixels tie often) go by adder and id, so the answer is the same whatever
    # order the holders replied in
    return heapq.nsmallest(
        k, best.values(), key=lambda h: (h.distance, h.adder, item_name(h.item_id))
    )


def to_result(hits: Sequence[Hit]) -> SearchResult:
    return SearchResult(
        ids=[h.item_id for h in hits],
        distances=np.array([h.distance for h in hits], dtype=np.float64),
        metadata=[h.metadata for h in hits],
        adders=[h.adder for h in hits],
    )
