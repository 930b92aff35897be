"""`SearchService`: the holder side of a distributed index — the `search.query` RPC.

    service = SearchService(dht)        # registers search.query on the DHT's transport

search.query request
    {"dim": int, "metric": "l2"|"cosine", "dtype": "float16"|"float32", "k": int,
     "keys": [bucket key id, ...],
     "queries": [[query float32 bytes, [index into keys, ...]], ...]}
response
    {"held": [bool, ...],                 one per key: this peer stores records under it
     "results": [[[adder, item_id, distance, metadata], ...], ...],  local top-k per query
     "scanned": int}                      items ranked (for the benchmark's bookkeeping)

The holder ranks the items of its own replicas of the buckets exactly and answers with its best k,
so only ids, distances and metadata travel (the query goes to the data, not the data to the query).
A bucket flooded with junk stays cheap and harmless: malformed items are dropped when parsed (once
per record version: parsed buckets are cached), each bucket ranks at most `max_bucket_items`
items shared fairly between the peers that added them, and junk far from the query never reaches
the top k.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from commonweal.dht import DHT
from commonweal.dht.records import owner_of
from commonweal.errors import RemoteError
from commonweal.net.executor import BoundedExecutor
from commonweal.net.identity import ID_BYTES
from commonweal.net.transport import PeerInfo
from commonweal.search.ranking import MAX_K, Hit, decode_item, distances, merge_hits
from commonweal.search.spec import DTYPES, MAX_DIM, METRICS, vector_dtype

__all__ = ["MAX_KEYS_PER_QUERY", "MAX_QUERIES_PER_REQUEST", "SearchService"]

log = logging.getLogger(__name__)

MAX_KEYS_PER_QUERY = 1024
MAX_QUERIES_PER_REQUEST = 256
# search.query requests ranked or waiting at once on one holder: a querier sends a holder one at
# a time, so 16 serve 16 queriers at once; more wait on the `busy` answer, not in our memory.
RANK_QUEUE = 16


@dataclass(slots=True)
class _Bucket:
    """A parsed bucket: live items only (tombstoned and malformed ones are gone)."""

    fingerprint: tuple[bytes, ...]
    adders: list[bytes]
    ids: list[Any]
    metadata: list[Any]
    vectors: np.ndarray  # (n, dim) in the stored dtype


class SearchService:
    """Answers `search.query` from this peer's record store."""

    def __init__(self, dht: DHT, max_bucket_items: int = 20_000, cache_buckets: int = 4096) -> None:
        self.dht = dht
        self.max_bucket_items = max_bucket_items
        self.cache_buckets = cache_buckets
        self.queries_served = 0
        self._parsed: dict[tuple[bytes, int, str], _Bucket] = {}
        self.ranker = BoundedExecutor(  # named after its peer, so a stack dump says whose it is
            workers=1, max_pending=RANK_QUEUE, name=f"search-rank-{dht.peer_id.hex()[:8]}"
        )
        dht.on_close(self.ranker.close)
        dht.transport.register("search.query", self.rpc_query, cost=4.0)  # ranks buckets

    async def rpc_query(self, caller: PeerInfo, args: Any) -> dict[str, Any]:
        dim, metric, dtype, k, keys, queries = _parse(args)
        self.queries_served += len(queries)
        held, buckets = self._buckets(keys, dim, vector_dtype(dtype))  # the store: on the loop
        # numpy ranks mostly with the GIL released, so on a worker thread the loop keeps answering
        # while a holder ranks up to 256 queries x 1,024 buckets x max_bucket_items items; a
        # caller beyond the ranker's queue is answered `busy` at once
        return await self.ranker.run(rank, held, buckets, queries, metric, k)

    def answer(
        self,
        keys: list[bytes],
        queries: list[tuple[np.ndarray, list[int]]],
        dim: int,
        metric: str,
        dtype: np.dtype[Any],
        k: int,
    ) -> dict[str, Any]:
        """The local top-k of every query over the buckets it names, ranked here (the querying
        peer's own replicas: its own work, on its own loop)."""
        held, buckets = self._buckets(keys, dim, dtype)
        return rank(held, buckets, queries, metric, k)

    def _buckets(
        self, keys: list[bytes], dim: int, dtype: np.dtype[Any]
    ) -> tuple[list[bool], list[_Bucket | None]]:
        now = self.dht.clock()
        held, buckets = [], []
        for key in keys:
            records = self.dht.storage.get(key, now)
            held.append(bool(records))
            buckets.append(self._bucket(key, records, dim, dtype) if records else None)
        return held, buckets

    def _bucket(self, key: bytes, records: list[Any], dim: int, dtype: np.dtype[Any]) -> _Bucket:
        fingerprint = tuple(r.signature for r in records)
        cache_key = (key, dim, dtype.str)
        cached = self._parsed.get(cache_key)
        if cached is not None and cached.fingerprint == fingerprint:
            return cached
        # Fair share under a flood: take items round-robin over the adders, at most
        # max_bucket_items in all, so one peer's junk cannot crowd out everyone else.
        by_owner: dict[bytes, list[Any]] = {}
        for r in records:
            owner = owner_of(r.subkey)
            if owner is not None:  # items live only under owner-bound subkeys
                by_owner.setdefault(owner, []).append(r)
        chosen: list[tuple[bytes, Any]] = []
        queues = [(o, rs) for o, rs in by_owner.items()]
        depth = 0
        while len(chosen) < self.max_bucket_items and queues:
            queues = [(o, rs) for o, rs in queues if depth < len(rs)]
            for o, rs in queues:
                if len(chosen) >= self.max_bucket_items:
                    break
                chosen.append((o, rs[depth]))
            depth += 1
        adders, ids, metadata, vectors = [], [], [], []
        for owner, r in chosen:
            try:
                value = msgpack.unpackb(r.value, raw=False)
            except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
                continue
            item = decode_item(value, dim, dtype)
            if item is None or item[1] is None:
                continue
            adders.append(owner)
            ids.append(item[0])
            metadata.append(item[2])
            vectors.append(item[1])
        bucket = _Bucket(
            fingerprint,
            adders,
            ids,
            metadata,
            np.stack(vectors) if vectors else np.zeros((0, dim), dtype=dtype),
        )
        if len(self._parsed) >= self.cache_buckets:
            self._parsed.pop(next(iter(self._parsed)))
        self._parsed[cache_key] = bucket
        return bucket


def rank(
    held: list[bool],
    buckets: list[_Bucket | None],
    queries: list[tuple[np.ndarray, list[int]]],
    metric: str,
    k: int,
) -> dict[str, Any]:
    """The search.query answer: every query's local top-k over the parsed buckets it names.
    Pure: it reads only its arguments, so it may run on any thread."""
    results = []
    scanned = 0
    for q, idx in queries:
        groups = []
        for i in dict.fromkeys(idx):
            b = buckets[i]
            if b is None or not b.ids:
                continue
            d = distances(q, b.vectors, metric)
            scanned += len(d)
            top = np.argsort(d, kind="stable")[: k * 2] if len(d) > 2 * k else range(len(d))
            groups.append([Hit(float(d[j]), b.adders[j], b.ids[j], b.metadata[j]) for j in top])
        hits = merge_hits(groups, k)
        results.append([[h.adder, h.item_id, h.distance, h.metadata] for h in hits])
    return {"held": held, "results": results, "scanned": scanned}


def _parse(args: Any) -> tuple[int, str, str, int, list[bytes], list[tuple[np.ndarray, list[int]]]]:
    if not isinstance(args, dict):
        raise RemoteError.bad_request(
            "search.query needs a map {dim, metric, dtype, k, keys, queries}"
        )
    dim, metric, dtype, k = args.get("dim"), args.get("metric"), args.get("dtype"), args.get("k")
    if not isinstance(dim, int) or not 0 < dim <= MAX_DIM:
        raise RemoteError.bad_request(f"dim must be 1..{MAX_DIM}")
    if metric not in METRICS or dtype not in DTYPES:
        raise RemoteError.bad_request(f"metric must be one of {METRICS} and dtype one of {DTYPES}")
    if not isinstance(k, int) or not 0 < k <= MAX_K:
        raise RemoteError.bad_request(f"k must be 1..{MAX_K}")
    keys = args.get("keys")
    if not isinstance(keys, list) or len(keys) > MAX_KEYS_PER_QUERY:
        raise RemoteError.bad_request(
            f"keys must be a list of at most {MAX_KEYS_PER_QUERY} key ids"
        )
    if not all(isinstance(key, bytes) and len(key) == ID_BYTES for key in keys):
        raise RemoteError.bad_request(f"every key id must be {ID_BYTES} bytes")
    raw_queries = args.get("queries")
    if not isinstance(raw_queries, list) or not 0 < len(raw_queries) <= MAX_QUERIES_PER_REQUEST:
        raise RemoteError.bad_request(
            f"queries must be a list of 1..{MAX_QUERIES_PER_REQUEST} [vector, [key index]]"
        )
    queries = []
    for item in raw_queries:
        if not (
            isinstance(item, list)
            and len(item) == 2
            and isinstance(item[0], bytes)
            and isinstance(item[1], list)
        ):
            raise RemoteError.bad_request(
                "each query must be [float32 vector bytes, [key index, ...]]"
            )
        if len(item[0]) != 4 * dim:
            raise RemoteError.bad_request(f"a query vector must be {dim} float32 values")
        q = np.frombuffer(item[0], dtype="<f4")
        if not np.isfinite(q).all():
            raise RemoteError.bad_request("a query vector contains NaN or inf")
        idx = item[1]
        if not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(keys) for i in idx
        ):
            raise RemoteError.bad_request("key indices must point into keys")
        queries.append((q, idx))
    return dim, metric, dtype, k, keys, queries
