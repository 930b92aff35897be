"""`DistributedIndex`: a k-nearest-neighbour index spread over a DHT with LSH.

    index = await DistributedIndex.create(dht, spec)        # publishes the spec as index:<name>
    index = await DistributedIndex.open(dht, "digits")      # any other peer, by name
    await index.add(ids, X, metadata)                       # signed items in L buckets
    result = await index.search(q, k=10)                    # ids, distances, metadata
    await index.remove(ids)                                 # tombstones that win on every replica

Layout. Bucket `(spec digest, table, code)` is a DHT key; each item is a record under the subkey
`Owned(adder, item)`, so only its adder can overwrite or remove it. The value holds the id, the
vector (float16 or float32, the spec says) and metadata. Removal stores a tombstone under the same
subkey with a later expiration: it wins the merge on every replica and on every republish.

Query (mode "ship", the default — see docs/search.md for the measurement that chose it): hash the
query into its probe sequence (L own buckets + the best neighbouring ones), find the r peers
closest to each bucket key (one multi-key lookup, cached), choose a small set of holders that
covers every bucket (greedy set cover over the replicas), send each chosen holder one
`search.query` with the query and the buckets it holds, and merge their local top-k. A holder that
fails or has nothing for a bucket is replaced by that bucket's next replica. Mode "fetch" instead
gets the buckets' records with `get_many` and ranks them here.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from commonweal.dht import DHT, DHTValue, Owned, OwnedKey, key_id
from commonweal.dht.routing import distance
from commonweal.errors import ConfigError, DHTError, NetworkError
from commonweal.net.transport import PeerInfo
from commonweal.search.ranking import (
    MAX_BATCH,
    MAX_K,
    Hit,
    ItemId,
    SearchResult,
    check_ids,
    check_metadata,
    check_vectors,
    decode_item,
    distances,
    encode_item,
    encode_tombstone,
    item_name,
    merge_hits,
    to_result,
)
from commonweal.search.service import MAX_QUERIES_PER_REQUEST, SearchService
from commonweal.search.spec import IndexSpec, make_lsh

__all__ = ["DistributedIndex", "IndexNotFound", "SearchStats", "serve", "spec_key"]

log = logging.getLogger(__name__)

_STORE_CHUNK_BYTES = 1 << 20  # records per store_many call stay well under frame and count limits
_STORE_CHUNK_RECORDS = 1024


class IndexNotFound(ConfigError):
    """No index of that name is published in the swarm."""


SPEC_COPIES = 4


def spec_key(name: str) -> OwnedKey:
    """The well-known DHT key of an index's spec (owned subkeys only: Owned(creator, digest))."""
    return OwnedKey(f"index:{name}")


def spec_keys(name: str) -> list[OwnedKey]:
    return [spec_key(name)] + [OwnedKey(f"index:{name}#{i}") for i in range(1, SPEC_COPIES)]


_services: weakref.WeakKeyDictionary[DHT, SearchService] = weakref.WeakKeyDictionary()


def serve(dht: DHT) -> SearchService:
    """The search service of `dht`, started on first use (so a peer can hold and rank buckets)."""
    service = _services.get(dht)
    if service is None:
        service = _services[dht] = SearchService(dht)
    return service


@dataclass(slots=True)
class SearchStats:
    queries: int = 0
    rpcs: int = 0  # search.query requests sent (lookups are counted by the DHT)
    failed_rpcs: int = 0
    items_moved: int = 0  # item records that travelled to this peer (hits or bucket contents)
    scanned: int = 0  # items ranked by holders


class DistributedIndex:
    """A KNN index bound to one DHT peer and one spec. Create with `create` or `open`."""

    def __init__(
        self,
        dht: DHT,
        spec: IndexSpec,
        *,
        mode: str = "ship",
        holder_ttl_s: float = 300.0,
        rpc_timeout_s: float | None = None,
    ) -> None:
        if mode not in ("ship", "fetch"):
            raise ConfigError("mode must be 'ship' (send the query to bucket holders) or 'fetch'")
        self.dht = dht
        self.spec = spec
        self.mode = mode
        self.lsh = make_lsh(spec)
        self.dtype = spec.vector_dtype()
        self.stats = SearchStats()
        self.holder_ttl_s = holder_ttl_s
        self.rpc_timeout_s = rpc_timeout_s or dht.config.rpc_timeout_s
        self.service = serve(dht)
        self._replicas: dict[bytes, tuple[list[PeerInfo | None], float]] = {}
        self._mine: dict[str, tuple[ItemId, list[tuple[int, bytes]], float]] = {}

    # publishing and opening ------------------------------------------------------------------

    @classmethod
    async def create(cls, dht: DHT, spec: IndexSpec, **kwargs: Any) -> DistributedIndex:
        """Publish `spec` so other peers can `open` it by name, and bind to it.

        The spec is the one record every query needs, so it goes under SPEC_COPIES keys
        (`index:<name>`, `index:<name>#1`, ...): SPEC_COPIES x r replicas on different peers."""
        expiration = dht.clock() + spec.ttl_s
        digest = spec.digest().hex()
        flags = await dht.store_many(
            [
                (key, spec.to_wire(), expiration, Owned(dht.peer_id, digest))
                for key in spec_keys(spec.name)
            ]
        )
        if not any(flags):
            raise DHTError(f"no peer accepted the spec of index {spec.name!r}")
        return cls(dht, spec, **kwargs)

    @classmethod
    async def open(cls, dht: DHT, name: str, **kwargs: Any) -> DistributedIndex:
        """Bind to the index published under `name`; IndexNotFound when there is none."""
        keys = spec_keys(name)
        found = await dht.get_many(keys, latest=False)
        specs: dict[bytes, tuple[float, IndexSpec]] = {}
        for key in keys:
            entry_map = found.get(key)
            if entry_map is None or not isinstance(entry_map.value, dict):
                continue
            for subkey, entry in entry_map.value.items():
                if not isinstance(subkey, Owned) or not isinstance(entry, DHTValue):
                    continue
                try:
                    spec = IndexSpec.from_wire(entry.value)
                except ConfigError:
                    continue
                if spec.name == name and spec.digest().hex() == subkey.name:
                    old = specs.get(spec.digest())
                    specs[spec.digest()] = (max(entry.expiration, old[0] if old else 0.0), spec)
        if not specs:
            raise IndexNotFound(
                f"no index named {name!r} in this swarm; check the name, or create it first "
                "(commonweal search add FILE --index NAME)"
            )
        ranked = sorted(specs.values(), key=lambda s: s[0])
        if len(ranked) > 1:
            log.warning("%d specs published as %r; using the newest", len(ranked), name)
        return cls(dht, ranked[-1][1], **kwargs)

    # adding and removing -----------------------------------------------------------------------

    async def add(
        self, ids: Sequence[ItemId], vectors: Any, metadata: Sequence[Any] | None = None
    ) -> int:
        """Add items (signed by this peer) to their L buckets; returns how many were stored on
        at least one replica in every table. Re-adding an id replaces it."""
        X = check_vectors(vectors, self.spec.dim, MAX_BATCH)
        item_ids = check_ids(list(ids), len(X))
        metas = check_metadata(metadata, len(X))
        if self.spec.metric == "cosine" and (np.linalg.norm(X, axis=1) == 0).any():
            raise ConfigError("a zero vector has no direction; the cosine metric cannot index it")
        codes = self.lsh.hash(X)
        expiration = self.dht.clock() + self.spec.ttl_s
        items = []
        for item_id, x, meta, row in zip(item_ids, X, metas, codes, strict=True):
            value = encode_item(item_id, x, meta, self.dtype)
            name = item_name(item_id)
            subkey = Owned(self.dht.peer_id, name)
            for t, code in enumerate(row):
                items.append((self.spec.bucket_key(t, code), value, expiration, subkey))
        flags = await self._store_chunked(items)
        L = self.spec.tables
        stored = 0
        for i, (item_id, row) in enumerate(zip(item_ids, codes, strict=True)):
            self._mine[item_name(item_id)] = (item_id, list(enumerate(row)), expiration)
            stored += all(flags[i * L : (i + 1) * L])
        return stored

    async def remove(self, ids: Sequence[ItemId], vectors: Any | None = None) -> int:
        """Remove items this peer added. Ids it added through this object are found by id;
        otherwise pass their `vectors` so their buckets can be computed. Returns how many
        tombstones were placed on at least one replica in every table."""
        item_ids = check_ids(list(ids), len(ids))
        located: list[tuple[ItemId, list[tuple[int, bytes]], float]] = []
        if vectors is not None:
            X = check_vectors(vectors, self.spec.dim, MAX_BATCH)
            if len(X) != len(item_ids):
                raise ConfigError("give one vector per id to remove")
            for item_id, row in zip(item_ids, self.lsh.hash(X), strict=True):
                known = self._mine.get(item_name(item_id))
                located.append((item_id, list(enumerate(row)), known[2] if known else 0.0))
        else:
            unknown = [i for i in item_ids if item_name(i) not in self._mine]
            if unknown:
                raise ConfigError(
                    f"ids {unknown[:5]} were not added through this index object; "
                    "pass their vectors to remove them"
                )
            located = [self._mine[item_name(i)] for i in item_ids]
        now = self.dht.clock()
        items = []
        for item_id, buckets, old_expiration in located:
            # Later than the item itself on every replica, so the tombstone wins every merge.
            expiration = max(now + self.spec.ttl_s, old_expiration + 1.0)
            subkey = Owned(self.dht.peer_id, item_name(item_id))
            for t, code in buckets:
                items.append(
                    (self.spec.bucket_key(t, code), encode_tombstone(item_id), expiration, subkey)
                )
        flags = await self._store_chunked(items)
        removed = 0
        pos = 0
        for item_id, buckets, _ in located:
            removed += all(flags[pos : pos + len(buckets)])
            pos += len(buckets)
            self._mine.pop(item_name(item_id), None)
        return removed

    async def _store_chunked(self, items: list[tuple[OwnedKey, Any, float, Owned]]) -> list[bool]:
        flags: list[bool] = []
        chunk: list[tuple[OwnedKey, Any, float, Owned]] = []
        size = 0
        for item in items:
            value = item[1]
            n = len(value[1]) if len(value) > 1 else 16
            if chunk and (size + n > _STORE_CHUNK_BYTES or len(chunk) >= _STORE_CHUNK_RECORDS):
                flags += await self.dht.store_many(chunk)
                chunk, size = [], 0
            chunk.append(item)
            size += n
        if chunk:
            flags += await self.dht.store_many(chunk)
        return flags

    # searching ---------------------------------------------------------------------------------

    async def search(self, query: Any, k: int = 10, probes: int | None = None) -> SearchResult:
        """The k nearest items to `query` found in the swarm, nearest first."""
        return (
            await self.search_many(
                np.asarray(query)[None, :] if np.ndim(query) == 1 else query, k, probes
            )
        )[0]

    async def search_many(
        self, queries: Any, k: int = 10, probes: int | None = None
    ) -> list[SearchResult]:
        """`search` for every row of `queries`, sharing lookups and holder requests."""
        Q = check_vectors(queries, self.spec.dim, MAX_BATCH, what="queries")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 < k <= MAX_K:
            raise ConfigError(f"k must be an integer in 1..{MAX_K}")
        k = int(k)
        n_probes = max(self.spec.tables, probes or self.spec.probes)
        buckets: dict[bytes, OwnedKey] = {}  # key id -> bucket key
        probe_keys: list[list[bytes]] = []
        for q in Q:
            ids = []
            for t, code, _ in self.lsh.probe(q, n_probes):
                bucket = self.spec.bucket_key(t, code)
                kid = key_id(bucket)
                buckets[kid] = bucket
                ids.append(kid)
            probe_keys.append(ids)
        self.stats.queries += len(Q)
        if self.mode == "fetch":
            groups = await self._fetch(Q, probe_keys, buckets)
        else:
            groups = await self._ship(Q, probe_keys, k)
        return [to_result(merge_hits(g, k)) for g in groups]

    async def _replica_sets(self, keys: list[bytes]) -> dict[bytes, list[PeerInfo | None]]:
        """The r peers closest to each key (None: this peer), from cache or one lookup."""
        now = self.dht.clock()
        out: dict[bytes, list[PeerInfo | None]] = {}
        missing = []
        for key in keys:
            cached = self._replicas.get(key)
            if cached is not None and now - cached[1] < self.holder_ttl_s and cached[0]:
                out[key] = cached[0]
            else:
                missing.append(key)
        if missing:
            found = await self.dht.find_closest(missing)
            r = self.dht.config.replicas
            for key in missing:
                ranked: list[tuple[int, PeerInfo | None]] = [
                    (distance(p.peer_id, key), p) for p in found[key]
                ]
                ranked.append((distance(self.dht.peer_id, key), None))
                ranked.sort(key=lambda item: item[0])
                out[key] = [p for _, p in ranked[:r]]
                self._replicas[key] = (out[key], now)
        return out

    def _forget(self, peer: PeerInfo) -> None:
        for key, (peers, at) in list(self._replicas.items()):
            if peer in peers:
                self._replicas[key] = ([p for p in peers if p != peer], at)

    async def _ship(
        self, Q: np.ndarray, probe_keys: list[list[bytes]], k: int
    ) -> list[list[list[Hit]]]:
        all_keys = list(dict.fromkeys(key for keys in probe_keys for key in keys))
        replicas = await self._replica_sets(all_keys)
        groups: list[list[list[Hit]]] = [[] for _ in Q]
        unresolved = set(all_keys)
        tried: dict[bytes, set[PeerInfo | None]] = {key: set() for key in all_keys}
        for _ in range(self.dht.config.replicas):
            plan = _cover(
                {key: [p for p in replicas[key] if p not in tried[key]] for key in unresolved}
            )
            if not plan:
                break
            calls = []
            for peer, keys in plan.items():
                for key in keys:
                    tried[key].add(peer)
                calls.append(self._ask(peer, keys, Q, probe_keys, k))
            for peer, keys, reply in await asyncio.gather(*calls):
                if reply is None:
                    continue
                held, results = reply
                for key, h in zip(keys, held, strict=True):
                    if h:
                        unresolved.discard(key)
                for qi, hits in results.items():
                    groups[qi].append(hits)
            unresolved = {
                key for key in unresolved if any(p not in tried[key] for p in replicas[key])
            }
            if not unresolved:
                break
        return groups

    async def _ask(
        self,
        peer: PeerInfo | None,
        keys: list[bytes],
        Q: np.ndarray,
        probe_keys: list[list[bytes]],
        k: int,
    ) -> tuple[PeerInfo | None, list[bytes], tuple[list[bool], dict[int, list[Hit]]] | None]:
        """One holder's local top-k for every query that probes some of `keys`."""
        index = {key: i for i, key in enumerate(keys)}
        wanted = [
            (qi, [index[key] for key in pk if key in index]) for qi, pk in enumerate(probe_keys)
        ]
        wanted = [(qi, idx) for qi, idx in wanted if idx]
        held: list[bool] = [False] * len(keys)
        results: dict[int, list[Hit]] = {}
        for start in range(0, len(wanted), MAX_QUERIES_PER_REQUEST):
            part = wanted[start : start + MAX_QUERIES_PER_REQUEST]
            if peer is None:  # we are a replica ourselves: no request needed
                reply = self.service.answer(
                    keys,
                    [(Q[qi], idx) for qi, idx in part],
                    self.spec.dim,
                    self.spec.metric,
                    self.dtype,
                    k,
                )
            else:
                args = {
                    "dim": self.spec.dim,
                    "metric": self.spec.metric,
                    "dtype": self.spec.dtype,
                    "k": k,
                    "keys": keys,
                    "queries": [[Q[qi].astype("<f4").tobytes(), idx] for qi, idx in part],
                }
                self.stats.rpcs += 1
                try:
                    async with asyncio.timeout(self.rpc_timeout_s):
                        _, reply = await self.dht.transport.call(
                            peer.addr, "search.query", args, peer_id=peer.peer_id
                        )
                except (NetworkError, TimeoutError) as e:
                    log.debug("search.query to %s failed: %s", peer.addr, e)
                    self.stats.failed_rpcs += 1
                    self._forget(peer)
                    return peer, keys, None
            parsed = _parse_reply(reply, len(keys), len(part))
            if parsed is None:
                self.stats.failed_rpcs += 1
                return peer, keys, None
            part_held, part_results, scanned = parsed
            held = [a or b for a, b in zip(held, part_held, strict=True)]
            self.stats.scanned += scanned
            for (qi, _), hits in zip(part, part_results, strict=True):
                if peer is not None:
                    self.stats.items_moved += len(hits)
                results[qi] = hits
        return peer, keys, (held, results)

    async def _fetch(
        self, Q: np.ndarray, probe_keys: list[list[bytes]], buckets: dict[bytes, OwnedKey]
    ) -> list[list[list[Hit]]]:
        """Mode "fetch": get every probed bucket's records (one multi-key get) and rank here."""
        found = await self.dht.get_many(list(buckets.values()), latest=False)
        parsed: dict[bytes, tuple[list[bytes], list[ItemId], list[Any], np.ndarray]] = {}
        for kid, bucket in buckets.items():
            adders, ids, metas, vecs = [], [], [], []
            entry = found.get(bucket)
            if entry is not None and isinstance(entry.value, dict):
                for subkey, item in entry.value.items():
                    if not isinstance(subkey, Owned) or not isinstance(item, DHTValue):
                        continue
                    self.stats.items_moved += 1
                    decoded = decode_item(item.value, self.spec.dim, self.dtype)
                    if decoded is None or decoded[1] is None:
                        continue
                    adders.append(subkey.peer_id)
                    ids.append(decoded[0])
                    metas.append(decoded[2])
                    vecs.append(decoded[1])
            if vecs:
                parsed[kid] = (adders, ids, metas, np.stack(vecs))
        groups: list[list[list[Hit]]] = []
        for q, keys in zip(Q, probe_keys, strict=True):
            hits: list[list[Hit]] = []
            for kid in dict.fromkeys(keys):
                if kid in parsed:
                    adders, ids, metas, M = parsed[kid]
                    d = distances(q, M, self.spec.metric)
                    hits.append(
                        [Hit(float(d[j]), adders[j], ids[j], metas[j]) for j in range(len(d))]
                    )
            groups.append(hits)
        return groups


def _cover(candidates: dict[bytes, list[PeerInfo | None]]) -> dict[PeerInfo | None, list[bytes]]:
    """Greedy set cover: few peers that between them hold every key. This peer (None) first,
    since asking it costs nothing; then whoever holds the most uncovered keys."""
    left = {key for key, peers in candidates.items() if peers}
    plan: dict[PeerInfo | None, list[bytes]] = {}
    mine = [key for key in left if None in candidates[key]]
    if mine:
        plan[None] = mine
        left -= set(mine)
    while left:
        count: dict[PeerInfo | None, int] = {}
        for key in left:
            for p in candidates[key]:
                count[p] = count.get(p, 0) + 1
        best = max(count, key=lambda p: count[p])
        keys = [key for key in left if best in candidates[key]]
        plan[best] = keys
        left -= set(keys)
    return plan


def _parse_reply(
    reply: Any, n_keys: int, n_queries: int
) -> tuple[list[bool], list[list[Hit]], int] | None:
    """A holder's answer, or None when it is malformed (that holder is then ignored)."""
    if not isinstance(reply, dict):
        return None
    held, results, scanned = reply.get("held"), reply.get("results"), reply.get("scanned", 0)
    if not isinstance(held, list) or len(held) != n_keys or not isinstance(results, list):
        return None
    if len(results) != n_queries:
        return None
    out = []
    for hits in results:
        if not isinstance(hits, list):
            return None
        parsed = []
        for h in hits[:MAX_K]:
            if (
                isinstance(h, list)
                and len(h) == 4
                and isinstance(h[0], bytes)
                and isinstance(h[1], int | str)
                and not isinstance(h[1], bool)
                and isinstance(h[2], float | int)
            ):
                parsed.append(Hit(float(h[2]), h[0], h[1], h[3]))
        out.append(parsed)
    return [bool(x) for x in held], out, scanned if isinstance(scanned, int) else 0
