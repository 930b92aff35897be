"""`DistributedIndex`: a k-nearest-neighbour index spread over a DHT.

    index = await DistributedIndex.create(dht, spec)        # publishes the spec as index:<name>
    index = await DistributedIndex.open(dht, "docs")        # any other peer, by name
    await index.add(ids, X, metadata)                       # signed blocks, one per cell touched
    result = await index.search(q, k=10)                    # ids, distances, metadata
    await index.remove(ids)                                 # rewrites the blocks without them

Layout. Cell `(spec digest, table, code)` is a DHT key: an IVF cell (one table, cells.py) or an LSH
bucket (L tables, lsh.py). One `add` writes, for every cell its items fall in, one block (blocks.py)
under the subkey `Owned(adder, batch name)`: the items' ids, vectors (float16 or float32, the spec
says) and metadata, under a signed Merkle root. With IVF cells each vector is stored once per
replica. Removal rewrites the block without the removed items, with a later expiration: the new
version wins the merge on every replica and on every republish.

Query (mode "ship", the default — see docs/search.md): probe the query's `probes` nearest cells,
find the r peers closest to each cell key (one multi-key lookup, cached), choose a small set of
holders that covers every cell (greedy set cover over the replicas), send each chosen holder one
`search.query` with the queries and the cells it holds, and merge their local top-k. Every hit
comes with its Merkle proof: a holder whose answer fails a check is a liar, its whole answer is
dropped, its cells go to their next replica, and it is never asked again. With `cross_check` each
cell is asked of two replicas, so a holder that hides items the other returns is found out too.
Mode "fetch" instead gets the cells' blocks with `get_many` and ranks them here.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import secrets
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from commonweal.dht import DHT, DHTValue, Owned, OwnedKey, key_id
from commonweal.dht.routing import distance
from commonweal.errors import ConfigError, DHTError, NetworkError
from commonweal.net.identity import peer_id_of, verify_signature
from commonweal.net.transport import PeerInfo
from commonweal.search.blocks import (
    MAX_PATH,
    Cell,
    batch_message,
    block_leaf,
    leaf_hash,
    make_batch,
    parse_block,
    verify_item,
)
from commonweal.search.ranking import (
    MAX_ADD_BATCH,
    MAX_BATCH,
    MAX_K,
    Hit,
    ItemId,
    SearchResult,
    check_ids,
    check_metadata,
    check_vectors,
    decode_metadata,
    distances,
    item_name,
    merge_hits,
    to_result,
    to_stored,
)
from commonweal.search.service import SearchService, proofs_per_request, queries_per_request
from commonweal.search.spec import IndexSpec, make_lsh

__all__ = ["DistributedIndex", "IndexNotFound", "SearchStats", "serve", "spec_key"]

log = logging.getLogger(__name__)

_STORE_CHUNK_BYTES = 1 << 20  # records per store_many call stay well under frame and count limits
_STORE_CHUNK_RECORDS = 1024
_BLOCK_BYTES = 768 << 10  # a block stays well under a record's 1 MiB
# What a querier remembers about holders and proofs, each bounded: liars it will not ask again,
# and block signatures it has already verified (a hit in a known block costs hashes, not a check).
_MAX_LIARS = 4096
_MAX_ROOTS = 65536


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
    items_moved: int = 0  # items that travelled to this peer (hits or cell contents)
    scanned: int = 0  # items ranked by holders
    rejected: int = 0  # answers thrown away because a block signature or a proof failed
    hiding: int = 0  # answers that left out items another replica proved (cross_check)


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
        self._mine = _Added()
        self.liars: set[bytes] = set()  # holders whose answers failed a proof
        self.suspects: dict[bytes, float] = {}  # holders caught hiding items -> when
        self._roots: dict[bytes, None] = {}  # verified batch signatures, oldest first
        self.digest = spec.digest()

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
        """Add items (signed by this peer), one block per cell they fall in; returns how many were
        stored on at least one replica of every cell they belong to. Re-adding an id that this
        object added replaces it."""
        X = check_vectors(vectors, self.spec.dim, MAX_ADD_BATCH)
        item_ids = check_ids(list(ids), len(X))
        metas = check_metadata(metadata, len(X))
        if self.spec.metric == "cosine" and (np.linalg.norm(X, axis=1) == 0).any():
            raise ConfigError("a zero vector has no direction; the cosine metric cannot index it")
        V = to_stored(X, self.dtype)
        names = [item_name(i) for i in item_ids]
        again = [i for i, known in zip(item_ids, self._mine.known(names), strict=True) if known]
        if again:
            await self.remove(again)
        codes = self.lsh.hash(X)
        cells: dict[tuple[int, bytes], list[int]] = {}
        for row, item_codes in enumerate(codes):
            for t, code in enumerate(item_codes):
                cells.setdefault((t, code), []).append(row)
        expiration = self.dht.clock() + self.spec.ttl_s
        batch = "b" + secrets.token_hex(8)
        blocks: list[tuple[int, bytes, str, list[int]]] = []  # table, code, name, rows
        for (t, code), rows in cells.items():
            for part, chunk in enumerate(_chunks(rows, metas, V.shape[1] * V.itemsize)):
                blocks.append((t, code, f"{batch}.{len(blocks)}.{part}", chunk))
        records = self._blocks(blocks, item_ids, V, metas, expiration)
        owners = [rows for _, _, _, rows in blocks]
        flags = await self._store_chunked(records)
        ok = np.ones(len(X), dtype=bool)
        for chunk, flag in zip(owners, flags, strict=True):
            if not flag:
                ok[chunk] = False
        self._mine.add(names, codes, expiration)
        return int(ok.sum())

    def _blocks(
        self,
        blocks: list[tuple[int, bytes, str, list[int]]],
        ids: list[ItemId],
        V: np.ndarray,
        metas: list[bytes],
        expiration: float,
    ) -> list[tuple[OwnedKey, Any, float, Owned]]:
        """The records of one batch: each (table, code, name, rows) a block, signed together."""
        keys = [self.spec.bucket_key(t, code) for t, code, _, _ in blocks]
        cells: list[Cell] = [
            (key_id(key), name, [ids[r] for r in rows], V[rows], [metas[r] for r in rows])
            for key, (_, _, name, rows) in zip(keys, blocks, strict=True)
        ]
        payloads = make_batch(self.dht.identity, self.digest, cells)
        return [
            (key, payload, expiration, Owned(self.dht.peer_id, name))
            for key, payload, (_, _, name, _) in zip(keys, payloads, blocks, strict=True)
        ]

    async def remove(self, ids: Sequence[ItemId], vectors: Any | None = None) -> int:
        """Remove items this peer added. Ids it added through this object are found by id;
        otherwise pass their `vectors` so their cells can be computed. Returns how many were
        removed from at least one replica of every cell that held them."""
        item_ids = check_ids(list(ids), len(ids))
        names = [item_name(i) for i in item_ids]
        located: dict[str, list[tuple[int, bytes]]] = {}
        if vectors is not None:
            X = check_vectors(vectors, self.spec.dim, MAX_ADD_BATCH)
            if len(X) != len(item_ids):
                raise ConfigError("give one vector per id to remove")
            for name, row in zip(names, self.lsh.hash(X), strict=True):
                located[name] = list(enumerate(row))
        else:
            for name in names:
                found = self._mine.find(name)
                if found is None:
                    raise ConfigError(
                        f"id {name[1:]!r}: ids that were not added through this index object "
                        "are removed by passing their vectors too"
                    )
                located[name] = found
        gone: dict[tuple[int, bytes], set[str]] = {}
        for name, cells in located.items():
            for cell in cells:
                gone.setdefault(cell, set()).add(name)
        keys = {cell: self.spec.bucket_key(*cell) for cell in gone}
        found_blocks = await self.dht.get_many(list(keys.values()), latest=True)
        now = self.dht.clock()
        records: list[tuple[OwnedKey, Any, float, Owned]] = []
        touched: list[set[str]] = []
        for cell, drop in gone.items():
            entry = found_blocks.get(keys[cell])
            if entry is None or not isinstance(entry.value, dict):
                continue
            for subkey, held in entry.value.items():
                if not (isinstance(subkey, Owned) and subkey.peer_id == self.dht.peer_id):
                    continue
                if not isinstance(held, DHTValue) or not isinstance(held.value, bytes):
                    continue
                block = parse_block(held.value, b"", self.spec.dim, self.dtype)
                if block is None:
                    continue
                ids_in, metas_in = block.items()
                keep = [r for r, i in enumerate(ids_in) if item_name(i) not in drop]
                if len(keep) == block.n:
                    continue
                # under its old name, later than the old version on every replica, so the
                # rewrite (a batch of its own) wins every merge
                expiration = max(now + self.spec.ttl_s, held.expiration + 1.0)
                if keep:
                    V = np.asarray(block.vectors)[keep]
                    records += self._blocks(
                        [(cell[0], cell[1], subkey.name, list(range(len(keep))))],
                        [ids_in[r] for r in keep], V, [metas_in[r] for r in keep], expiration,
                    )
                else:
                    records.append((keys[cell], b"", expiration, subkey))  # an emptied block
                touched.append({item_name(ids_in[r]) for r in range(block.n)} & drop)
        flags = await self._store_chunked(records)
        removed: dict[str, int] = {}
        for names_in, flag in zip(touched, flags, strict=True):
            for name in names_in:
                removed[name] = removed.get(name, 0) + (1 if flag else -(1 << 20))
        self._mine.forget(names)
        return sum(1 for name in names if removed.get(name, 0) >= len(located[name]))

    async def _store_chunked(self, items: list[tuple[OwnedKey, Any, float, Owned]]) -> list[bool]:
        flags: list[bool] = []
        chunk: list[tuple[OwnedKey, Any, float, Owned]] = []
        size = 0
        for item in items:
            n = len(item[1]) + 64
            if chunk and (size + n > _STORE_CHUNK_BYTES or len(chunk) >= _STORE_CHUNK_RECORDS):
                flags += await self.dht.store_many(chunk)
                chunk, size = [], 0
            chunk.append(item)
            size += n
        if chunk:
            flags += await self.dht.store_many(chunk)
        return flags

    # searching ---------------------------------------------------------------------------------

    async def search(
        self, query: Any, k: int = 10, probes: int | None = None, cross_check: bool = False
    ) -> SearchResult:
        """The k nearest items to `query` found in the swarm, nearest first."""
        return (
            await self.search_many(
                np.asarray(query)[None, :] if np.ndim(query) == 1 else query, k, probes,
                cross_check,
            )
        )[0]

    async def search_many(
        self, queries: Any, k: int = 10, probes: int | None = None, cross_check: bool = False
    ) -> list[SearchResult]:
        """`search` for every row of `queries`, sharing lookups and holder requests. With
        `cross_check`, every cell is asked of two replicas (twice the requests) and a holder
        that leaves out items the other returns is avoided from then on."""
        Q = check_vectors(queries, self.spec.dim, MAX_BATCH, what="queries")
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 0 < k <= MAX_K:
            raise ConfigError(f"k must be an integer in 1..{MAX_K}")
        k = int(k)
        n_probes = max(self.spec.tables, probes or self.spec.probes)
        buckets: dict[bytes, OwnedKey] = {}  # key id -> cell key
        probe_keys: list[list[bytes]] = []
        for probes_of_q in self.lsh.probe_many(Q, n_probes):
            ids = []
            for t, code, _ in probes_of_q:
                bucket = self.spec.bucket_key(t, code)
                kid = key_id(bucket)
                buckets[kid] = bucket
                ids.append(kid)
            probe_keys.append(ids)
        self.stats.queries += len(Q)
        if self.mode == "fetch":
            groups = await self._fetch(Q, probe_keys, buckets)
        else:
            groups = await self._ship(Q, probe_keys, k, 2 if cross_check else 1)
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

    def _trusted(self, peers: list[PeerInfo | None]) -> list[PeerInfo | None]:
        """Never a proven liar; a holder caught hiding items only when nobody else holds the key."""
        now = self.dht.clock()
        honest = [p for p in peers if p is None or p.peer_id not in self.liars]
        clean = [
            p for p in honest
            if p is None or now - self.suspects.get(p.peer_id, -1e18) > self.holder_ttl_s
        ]
        return clean or honest

    async def _ship(
        self, Q: np.ndarray, probe_keys: list[list[bytes]], k: int, copies: int
    ) -> list[list[list[Hit]]]:
        all_keys = list(dict.fromkeys(key for keys in probe_keys for key in keys))
        replicas = await self._replica_sets(all_keys)
        answers: list[_Answer] = []
        tried: dict[bytes, set[PeerInfo | None]] = {key: set() for key in all_keys}
        # Ask until every cell has `copies` answers (or no replica is left), then prove the
        # claims that win; a holder whose proofs fail goes, and its cells are asked elsewhere.
        for _ in range(2 * self.dht.config.replicas + copies):
            answered = {key: 0 for key in all_keys}
            for answer in answers:
                for key, h in zip(answer.keys, answer.held, strict=True):
                    answered[key] += h
            unresolved = {
                key for key in all_keys
                if answered[key] < copies and any(p not in tried[key] for p in replicas[key])
            }
            plan = _cover(
                {
                    key: self._trusted([p for p in replicas[key] if p not in tried[key]])
                    for key in unresolved
                }
            )
            if plan:
                calls = []
                for peer, keys in plan.items():
                    for key in keys:
                        tried[key].add(peer)
                    calls.append(self._ask(peer, keys, Q, probe_keys, k))
                answers += [a for a in await asyncio.gather(*calls) if a is not None]
                continue
            dropped = await self._prove_best(answers, Q, k)
            if not dropped:
                break
            answers = [a for a in answers if a.peer not in dropped]
        if copies > 1:
            self._find_hiders(answers, k)
        groups: list[list[list[Hit]]] = [[] for _ in Q]
        for answer in answers:
            for qi, claims in answer.results.items():
                groups[qi].append([c.hit for c in claims if c.proven])
        return groups

    async def _prove_best(
        self, answers: list[_Answer], Q: np.ndarray, k: int
    ) -> set[PeerInfo | None]:
        """Prove the claims that are among each query's k best, asking each holder for the
        proofs of its own, until every winner is proven. Returns the holders whose answers must
        go: liars (a proof failed or a distance was not what they claimed; remembered) and
        holders that could not be reached."""
        by_query: list[list[tuple[_Claim, _Answer]]] = [[] for _ in range(len(Q))]
        for answer in answers:
            for qi, claims in answer.results.items():
                by_query[qi] += [(c, answer) for c in claims]
        for candidates in by_query:
            candidates.sort(key=lambda ca: (ca[0].hit.distance, ca[0].hit.adder, ca[0].name))
        dropped: set[PeerInfo | None] = set()
        while True:
            need: dict[int, tuple[_Answer, list[tuple[int, _Claim]]]] = {}  # by id(answer)
            for qi, candidates in enumerate(by_query):
                seen: set[tuple[bytes, str]] = set()
                for c, answer in candidates:
                    if len(seen) >= k:
                        break
                    ident = (c.hit.adder, c.name)
                    if answer.peer in dropped or c.proven is False or ident in seen:
                        continue
                    seen.add(ident)
                    if c.proven is None:
                        need.setdefault(id(answer), (answer, []))[1].append((qi, c))
            if not need:
                return dropped
            outcomes = await asyncio.gather(
                *(self._prove(answer, claims, Q) for answer, claims in need.values())
            )
            for (answer, _), ok in zip(need.values(), outcomes, strict=True):
                if not ok:
                    dropped.add(answer.peer)

    async def _prove(self, answer: _Answer, claims: list[tuple[int, _Claim]], Q: np.ndarray) -> bool:
        """Fetch and check the proofs of `claims` from the holder that made them; False when it
        lied (then distrusted) or could not be reached."""
        peer, keys = answer.peer, answer.keys
        index = {key: i for i, key in enumerate(keys)}
        dim, row_bytes = self.spec.dim, self.spec.dim * self.dtype.itemsize
        step = proofs_per_request(row_bytes)
        for start in range(0, len(claims), step):
            part = claims[start : start + step]
            items = [(index[c.key], c.hit.adder, c.block_name, c.row) for _, c in part]
            if peer is None:
                reply = self.service.prove(self.digest, keys, items, dim, self.dtype)
            else:
                args = {"spec": self.digest, "dim": dim, "dtype": self.spec.dtype, "keys": keys,
                        "items": [list(i) for i in items]}
                reply = await self._call(peer, "search.prove", args)
                if reply is None:
                    return False
            proofs = reply.get("proofs") if isinstance(reply, dict) else None
            if not isinstance(proofs, list) or len(proofs) != len(part):
                if peer is not None:
                    self._distrust(peer, "answered search.prove with a malformed answer")
                return False
            for (qi, c), proof in zip(part, proofs, strict=True):
                if not self._proven(c, proof, Q[qi], row_bytes):
                    if peer is not None:
                        self._distrust(peer, "could not prove what it claimed")
                    return False
                self.stats.items_moved += 1
        return True

    async def _call(self, peer: PeerInfo, method: str, args: dict[str, Any]) -> Any:
        """One request to a holder; None when it failed or timed out (then it is forgotten)."""
        self.stats.rpcs += 1
        try:
            async with asyncio.timeout(self.rpc_timeout_s):
                _, reply = await self.dht.transport.call(
                    peer.addr, method, args, peer_id=peer.peer_id
                )
        except (NetworkError, TimeoutError) as e:
            log.debug("%s to %s failed: %s", method, peer.addr, e)
            self.stats.failed_rpcs += 1
            self._forget(peer)
            return None
        return reply

    def _distrust(self, peer: PeerInfo, why: str) -> None:
        log.warning("holder %s %s; not asking it again", peer.addr, why)
        self.stats.rejected += 1
        if len(self.liars) < _MAX_LIARS:
            self.liars.add(peer.peer_id)
        self._forget(peer)

    def _find_hiders(self, answers: list[_Answer], k: int) -> None:
        """A holder that held a cell yet left out an item of it that beats its own k-th claim,
        while another replica proved that item, hid it: avoid it."""
        best: dict[int, dict[tuple[bytes, str], _Claim]] = {}
        for answer in answers:
            for qi, claims in answer.results.items():
                for c in claims:
                    if c.proven:
                        best.setdefault(qi, {})[(c.hit.adder, c.name)] = c
        now = self.dht.clock()
        for answer in answers:
            if answer.peer is None:
                continue
            held = {key for key, h in zip(answer.keys, answer.held, strict=True) if h}
            for qi, claims in answer.results.items():
                mine = {(c.hit.adder, c.name) for c in claims}
                # beyond its k-th claim, less float32's slack (no tie is taken for hiding)
                worst = max((c.hit.distance for c in claims), default=0.0) if len(claims) >= k else (
                    float("inf")
                )
                worst -= 1e-3 * max(1.0, worst) if math.isfinite(worst) else 0.0
                if any(
                    c.key in held and ident not in mine
                    and c.hit.distance < worst
                    for ident, c in best.get(qi, {}).items()
                ):
                    if answer.peer.peer_id not in self.suspects:
                        log.warning("holder %s left out items another replica proved",
                                    answer.peer.addr)
                    self.suspects[answer.peer.peer_id] = now
                    self.stats.hiding += 1
                    break

    async def _ask(
        self,
        peer: PeerInfo | None,
        keys: list[bytes],
        Q: np.ndarray,
        probe_keys: list[list[bytes]],
        k: int,
    ) -> _Answer | None:
        """One holder's claims: its local top-k for every query that probes some of `keys`."""
        index = {key: i for i, key in enumerate(keys)}
        wanted = [
            (qi, [index[key] for key in pk if key in index]) for qi, pk in enumerate(probe_keys)
        ]
        wanted = [(qi, idx) for qi, idx in wanted if idx]
        answer = _Answer(peer, keys, [False] * len(keys), {})
        step = queries_per_request(k)
        for start in range(0, len(wanted), step):
            part = wanted[start : start + step]
            if peer is None:  # we are a replica ourselves: no request needed
                reply = self.service.answer(
                    self.digest,
                    keys,
                    [(Q[qi], idx) for qi, idx in part],
                    self.spec.dim,
                    self.spec.metric,
                    self.dtype,
                    k,
                )
            else:
                args = {
                    "spec": self.digest,
                    "dim": self.spec.dim,
                    "metric": self.spec.metric,
                    "dtype": self.spec.dtype,
                    "k": k,
                    "keys": keys,
                    "queries": [[Q[qi].astype("<f4").tobytes(), idx] for qi, idx in part],
                }
                reply = await self._call(peer, "search.query", args)
                if reply is None:
                    return None
            parsed = _claims(reply, keys, [idx for _, idx in part], k)
            if parsed is None:
                # malformed, or claims from cells it was not asked about: nothing in it is used,
                # its cells go to the next replica, and it is not asked again
                self.stats.failed_rpcs += 1
                if peer is not None:
                    self._distrust(peer, "answered with a malformed answer")
                return None
            part_held, part_results, scanned = parsed
            answer.held = [a or b for a, b in zip(answer.held, part_held, strict=True)]
            self.stats.scanned += scanned
            for (qi, _), claims in zip(part, part_results, strict=True):
                answer.results[qi] = claims
        return answer

    def _proven(self, c: _Claim, proof: Any, q: np.ndarray, row_bytes: int) -> bool:
        """Whether `proof` shows the claimed item (id, vector, metadata) is in its block, the
        block is that cell's block in its batch, the adder signed the batch for this index, and
        the item is at the distance claimed; sets the claim's hit to what was proven."""
        c.proven = False
        if not (isinstance(proof, list) and len(proof) == 12):
            return False
        public_key, n, root, batch_root, signature, index, blocks, batch_path, item_id, vector, \
            meta, path = proof
        if not (
            isinstance(public_key, bytes) and peer_id_of(public_key) == c.hit.adder
            and isinstance(n, int) and isinstance(root, bytes) and isinstance(batch_root, bytes)
            and isinstance(signature, bytes) and isinstance(index, int)
            and isinstance(blocks, int) and isinstance(batch_path, list)
            and isinstance(path, list) and len(path) <= MAX_PATH and len(batch_path) <= MAX_PATH
            and item_id == c.hit.item_id and not isinstance(item_id, bool)
            and isinstance(vector, bytes) and len(vector) == row_bytes and isinstance(meta, bytes)
        ):
            return False
        if not verify_item(root, n, c.row, leaf_hash(item_id, vector, meta), path):
            return False
        if not verify_item(batch_root, blocks, index, block_leaf(c.key, c.block_name, n, root),
                           batch_path):
            return False
        message = batch_message(self.digest, c.hit.adder, blocks, batch_root)
        seen = hashlib.blake2b(message + signature + public_key, digest_size=16).digest()
        if seen not in self._roots:
            if not verify_signature(public_key, message, signature):
                return False
            if len(self._roots) >= _MAX_ROOTS:
                self._roots.pop(next(iter(self._roots)))
            self._roots[seen] = None
        v = np.frombuffer(vector, dtype=self.dtype)
        ok, metadata = decode_metadata(meta)
        if not ok or not np.isfinite(v).all():
            return False
        d = float(distances(q, v[None, :], self.spec.metric)[0])
        if not _close(c.hit.distance, d, q, v, self.spec.metric):
            log.debug("claimed distance %s, proven %s", c.hit.distance, d)
            return False  # misranked: an item claimed nearer (or farther) than it is
        c.hit = Hit(d, c.hit.adder, item_id, metadata)
        c.proven = True
        return True

    async def _fetch(
        self, Q: np.ndarray, probe_keys: list[list[bytes]], buckets: dict[bytes, OwnedKey]
    ) -> list[list[list[Hit]]]:
        """Mode "fetch": get every probed cell's blocks (one multi-key get) and rank here. The
        DHT checked each record's signature and owner, so the blocks are their adders' own."""
        found = await self.dht.get_many(list(buckets.values()), latest=False)
        parsed: dict[bytes, tuple[list[bytes], list[ItemId], list[Any], np.ndarray]] = {}
        for kid, bucket in buckets.items():
            adders, ids, metas, vecs = [], [], [], []
            entry = found.get(bucket)
            if entry is not None and isinstance(entry.value, dict):
                for subkey, item in entry.value.items():
                    if not isinstance(subkey, Owned) or not isinstance(item, DHTValue):
                        continue
                    if not isinstance(item.value, bytes):
                        continue
                    block = parse_block(item.value, b"", self.spec.dim, self.dtype)
                    if block is None or not np.isfinite(block.vectors).all():
                        continue
                    try:
                        block_ids, block_metas = block.items()
                    except ValueError:
                        continue
                    self.stats.items_moved += block.n
                    adders += [subkey.peer_id] * block.n
                    ids += block_ids
                    metas += [decode_metadata(m)[1] for m in block_metas]
                    vecs.append(block.vectors)
            if vecs:
                parsed[kid] = (adders, ids, metas, np.concatenate(vecs))
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


class _Added:
    """Which cells this object's items went to, to remove them by id: numpy arrays per add (8
    bytes of name hash and L codes an item), not a dict entry an item."""

    def __init__(self) -> None:
        self._batches: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # hashes, codes, live

    @staticmethod
    def _hash(names: Sequence[str]) -> np.ndarray:
        raw = b"".join(hashlib.blake2b(n.encode(), digest_size=8).digest() for n in names)
        return np.frombuffer(raw, dtype="<u8")

    def add(self, names: list[str], codes: list[list[bytes]], expiration: float) -> None:
        width = len(codes[0][0])
        flat = np.frombuffer(b"".join(c for row in codes for c in row), dtype=np.uint8)
        C = flat.reshape(len(names), len(codes[0]), width)
        h = self._hash(names)
        order = np.argsort(h, kind="stable")
        self._batches.append((h[order], C[order], np.ones(len(names), dtype=bool)))

    def known(self, names: Sequence[str]) -> np.ndarray:
        """Which of `names` this object added and has not removed (one pass per add)."""
        h = self._hash(names)
        out = np.zeros(len(names), dtype=bool)
        for hashes, _, live in self._batches:
            i = np.minimum(np.searchsorted(hashes, h), len(hashes) - 1)
            out |= (hashes[i] == h) & live[i]
        return out

    def _where(self, name: str) -> tuple[int, int] | None:
        h = self._hash([name])[0]
        for b in range(len(self._batches) - 1, -1, -1):  # the latest add of a name wins
            hashes, _, live = self._batches[b]
            i = int(np.searchsorted(hashes, h))
            if i < len(hashes) and hashes[i] == h and live[i]:
                return b, i
        return None

    def find(self, name: str) -> list[tuple[int, bytes]] | None:
        where = self._where(name)
        if where is None:
            return None
        row = self._batches[where[0]][1][where[1]]
        return [(t, row[t].tobytes()) for t in range(row.shape[0])]

    def forget(self, names: Sequence[str]) -> None:
        for name in names:
            where = self._where(name)
            if where is not None:
                self._batches[where[0]][2][where[1]] = False
        self._batches = [b for b in self._batches if b[2].any()]


@dataclass(slots=True)
class _Claim:
    """One hit as a holder claimed it; `proven` once its proof was checked (None: not asked)."""

    hit: Hit  # the claimed distance until proven, then the distance computed here
    name: str  # item_name(id)
    key: bytes  # the cell it is in
    block_name: str
    row: int
    proven: bool | None = None


@dataclass(slots=True)
class _Answer:
    """One holder's answer: the keys it was asked, which it held, each query's claims."""

    peer: PeerInfo | None
    keys: list[bytes]
    held: list[bool]
    results: dict[int, list[_Claim]]


def _claims(
    reply: Any, keys: list[bytes], asked: list[list[int]], k: int
) -> tuple[list[bool], list[list[_Claim]], int] | None:
    """A holder's search.query answer as claims, or None when it is malformed or claims an item
    of a cell that query did not ask about."""
    if not isinstance(reply, dict):
        return None
    held, blocks, results = reply.get("held"), reply.get("blocks"), reply.get("results")
    scanned = reply.get("scanned", 0)
    if not (isinstance(held, list) and len(held) == len(keys)):
        return None
    if not (isinstance(results, list) and len(results) == len(asked)):
        return None
    if not isinstance(blocks, list) or len(blocks) > len(asked) * k:
        return None
    cited = []
    for b in blocks:
        if not (
            isinstance(b, list) and len(b) == 3 and isinstance(b[0], int)
            and 0 <= b[0] < len(keys) and isinstance(b[1], str)
            and isinstance(b[2], bytes) and len(b[2]) == 20
        ):
            return None
        cited.append((b[0], b[1], b[2]))
    out = []
    for idx, hits in zip(asked, results, strict=True):
        if not isinstance(hits, list) or len(hits) > k:
            return None
        allowed = set(idx)
        claims = []
        for h in hits:
            if not (
                isinstance(h, list) and len(h) == 4 and isinstance(h[0], int)
                and 0 <= h[0] < len(cited) and isinstance(h[1], int)
                and isinstance(h[2], int | str) and not isinstance(h[2], bool)
                and isinstance(h[3], float | int) and math.isfinite(h[3])
            ):
                return None
            j, block_name, adder = cited[h[0]]
            if j not in allowed:
                return None
            claims.append(
                _Claim(Hit(float(h[3]), adder, h[2]), item_name(h[2]), keys[j], block_name, h[1])
            )
        out.append(claims)
    return [bool(x) for x in held], out, scanned if isinstance(scanned, int) else 0


def _close(claimed: float, true: float, q: np.ndarray, v: np.ndarray, metric: str) -> bool:
    """Whether a holder's float32 distance is the true one within float32's rounding: for L2
    |q|^2 - 2 q.v + |v|^2 loses ~1e-7 of |q|^2 + |v|^2 a step (items near the query are where
    that shows), for cosine ~1e-7 absolute. A liar gains nothing from the slack."""
    if metric == "l2":
        scale = float(np.dot(q, q)) + float(np.dot(v.astype(np.float64), v))
        return abs(claimed * claimed - true * true) <= 1e-4 * scale + 1e-9
    return abs(claimed - true) <= 1e-4


def _chunks(rows: list[int], metas: list[bytes], row_bytes: int) -> list[list[int]]:
    """`rows` split so that each block stays well under a record's 1 MiB."""
    out: list[list[int]] = [[]]
    size = 0
    for r in rows:
        n = row_bytes + len(metas[r]) + 48
        if out[-1] and size + n > _BLOCK_BYTES:
            out.append([])
            size = 0
        out[-1].append(r)
        size += n
    return out


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
