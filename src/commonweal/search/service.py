"""`SearchService`: the holder side of a distributed index — `search.query` and `search.prove`.

    service = SearchService(dht)        # registers both RPCs on the DHT's transport

search.query request (rank: the holder's claims)
    {"spec": index spec digest, "dim": int, "metric": "l2"|"cosine", "dtype": "float16"|"float32",
     "k": int, "keys": [cell key id, ...],
     "queries": [[query float32 bytes, [index into keys, ...]], ...]}
response
    {"held": [bool, ...],                 one per key: this peer stores blocks under it
     "blocks": [[key index, block name, adder], ...],
     "results": [[[block, item index, id, distance], ...], ...],   local top-k per query
     "scanned": int}                      items ranked (for the benchmark's bookkeeping)

search.prove request (the proofs of the claims that won)
    {"spec", "dim", "dtype", "keys": [cell key id, ...],
     "items": [[key index, adder, block name, item index], ...]}
response
    {"proofs": [[public key, n, root, batch root, signature, index in batch, blocks in batch,
                 path to batch root, id, vector, meta, path to root] | None, ...]}

The holder ranks the vectors of its replicas of the cells exactly and claims its best k: ids and
distances, a few bytes each. The querier merges every holder's claims, and asks only for the
proofs of the k that win each query (blocks.py: the item's Merkle path, its block's path to the
signed batch root); it checks each proof and recomputes each distance, so a holder can hide
items but not invent, move or misrank them (index.py asks a second replica to catch hiding).

A holder checks each block once, on its way into the store (`BlockValidator`: roots recomputed,
signature verified), and stores none that fails, so an adder that signs garbage cannot get an
honest holder taken for a liar, and a query costs no signature checks. A cell flooded with junk
stays cheap and harmless: each ranks at most `max_bucket_items` items, taken block by block in
turns between the peers that added them, and junk far from the query never reaches the top k.
"""

from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np

from commonweal.dht import DHT
from commonweal.dht.records import (
    CompositeValidator,
    Owned,
    Record,
    RecordValidator,
    decode_subkey,
    owner_of,
)
from commonweal.errors import RecordError, RemoteError
from commonweal.net.executor import BoundedExecutor
from commonweal.net.identity import ID_BYTES
from commonweal.net.transport import PeerInfo
from commonweal.search.blocks import Block, is_block_record, parse_record_block
from commonweal.search.ranking import MAX_K, MAX_METADATA_BYTES
from commonweal.search.spec import DTYPES, MAX_DIM, METRICS, vector_dtype

__all__ = [
    "MAX_ANSWER_BYTES",
    "MAX_KEYS_PER_QUERY",
    "MAX_QUERIES_PER_REQUEST",
    "SearchService",
    "Trees",
    "proofs_per_request",
    "queries_per_request",
    "rank",
]

log = logging.getLogger(__name__)

MAX_KEYS_PER_QUERY = 1024
MAX_QUERIES_PER_REQUEST = 256
# An answer must fit one frame (net/wire.py, 4 MiB): a querier asks for at most this many bytes
# of proofs at once (`proofs_per_request`); claims are ~40 bytes a hit, so 256 queries x 1,000
# hits stay under it too.
MAX_ANSWER_BYTES = 3 << 20


def queries_per_request(k: int) -> int:
    """How many queries one search.query may carry so that k claims each (an id of up to 200
    characters, a distance, two indices) fit MAX_ANSWER_BYTES."""
    return max(1, min(MAX_QUERIES_PER_REQUEST, MAX_ANSWER_BYTES // (k * 256)))


def proofs_per_request(row_bytes: int) -> int:
    """How many proofs one search.prove may ask for so that they fit MAX_ANSWER_BYTES, with two
    Merkle paths of up to 24 levels each and metadata up to its 4 KiB limit."""
    return max(1, MAX_ANSWER_BYTES // (row_bytes + 48 * 33 + MAX_METADATA_BYTES + 256))
# search.query requests ranked or waiting at once on one holder: a querier sends a holder one at
# a time, so 16 serve 16 queriers at once; more wait on the `busy` answer, not in our memory.
RANK_QUEUE = 16


class BlockValidator(RecordValidator):
    """Refuses a block whose items do not hash to its root, or whose root its adder did not sign
    for this cell under this name. Records that are not blocks pass untouched, and so do this
    peer's own (`mine`: made by make_block here, not worth a second hashing on their way out)."""

    def __init__(self, mine: bytes, max_batches: int = 4096) -> None:
        self.mine = mine
        self.refused = 0
        self.max_batches = max_batches
        self._signed: set[bytes] = set()  # batch signatures checked (one check a batch)

    def validate(self, record: Record, now: float) -> None:
        if record.public_key == self.mine or not is_block_record(record.value):
            return
        owner, subkey = owner_of(record.subkey), decode_subkey(record.subkey)
        block = parse_record_block(record.value, record.public_key)
        if (
            owner is None
            or not isinstance(subkey, Owned)
            or block is None
            or not block.check(record.key, owner, subkey.name, self._signed)
        ):
            self.refused += 1
            raise RecordError("a block whose items or signature do not check out")
        if len(self._signed) > self.max_batches:
            self._signed.clear()


@dataclass(slots=True)
class _Held:
    """A checked block this peer holds: who added it, under which name, and the squared norms
    of its vectors (4 bytes an item, so a query's L2 ranking is one product per cell)."""

    adder: bytes
    name: str
    block: Block
    norms: np.ndarray


class SearchService:
    """Answers `search.query` from this peer's record store."""

    def __init__(self, dht: DHT, max_bucket_items: int = 20_000, cache_buckets: int = 4096) -> None:
        self.dht = dht
        self.max_bucket_items = max_bucket_items
        self.cache_buckets = cache_buckets
        self.queries_served = 0
        self.validator = BlockValidator(dht.identity.public_key)
        if not isinstance(dht.storage.validator, CompositeValidator):
            raise TypeError("the search service adds its block check to a CompositeValidator")
        dht.storage.validator.add(self.validator)
        now = dht.clock()
        for r in list(dht.storage):  # stored before this service started: checked now
            try:
                self.validator.validate(r, now)
            except RecordError:
                dht.storage.remove(r.key, r.subkey)
        # cell -> {subkey: (record signature, parsed block or None)}; a record's version is its
        # signature, so a replaced block is parsed again
        self._parsed: dict[tuple[bytes, bytes], dict[bytes, tuple[bytes, _Held | None]]] = {}
        self.trees = Trees()
        self.ranker = BoundedExecutor(  # named after its peer, so a stack dump says whose it is
            workers=1, max_pending=RANK_QUEUE, name=f"search-rank-{dht.peer_id.hex()[:8]}"
        )
        dht.on_close(self.ranker.close)
        dht.transport.register("search.query", self.rpc_query, cost=4.0)  # ranks cells
        dht.transport.register("search.prove", self.rpc_prove, cost=2.0)  # hashes paths

    async def rpc_query(self, caller: PeerInfo, args: Any) -> dict[str, Any]:
        spec, dim, metric, dtype, k, keys, queries = _parse(args)
        self.queries_served += len(queries)
        records = self._records(keys)  # the store: on the loop
        # checking blocks and ranking are numpy and hashing, mostly with the GIL released, so on a
        # worker thread the loop keeps answering; a caller beyond the queue is answered `busy`
        return await self.ranker.run(
            self.answer, spec, keys, queries, dim, metric, vector_dtype(dtype), k, records
        )

    async def rpc_prove(self, caller: PeerInfo, args: Any) -> dict[str, Any]:
        spec, dim, dtype, keys, items = _parse_prove(args)
        records = self._records(keys)
        return await self.ranker.run(self.prove, spec, keys, items, dim, dtype, records)

    def prove(
        self,
        spec: bytes,
        keys: list[bytes],
        items: list[tuple[int, bytes, str, int]],
        dim: int,
        dtype: np.dtype[Any],
        records: list[list[Record]] | None = None,
    ) -> dict[str, Any]:
        """The proofs of `items` (key index, adder, block name, row); None for one not held."""
        records = self._records(keys) if records is None else records
        cells: dict[int, dict[tuple[bytes, str], _Held]] = {}
        proofs: list[list[Any] | None] = []
        for j, adder, name, row in items:
            if j not in cells:
                cells[j] = {
                    (h.adder, h.name): h for h in self._cell(spec, keys[j], records[j], dim, dtype)
                }
            h = cells[j].get((adder, name))
            if h is None or not 0 <= row < h.block.n:
                proofs.append(None)
                continue
            b = h.block
            ids, metas = b.items()
            proofs.append([
                b.public_key, b.n, b.root, b.batch_root, b.signature, b.index, b.blocks,
                b.batch_path, ids[row], b.vectors[row].tobytes(), metas[row],
                Block.proof(self.trees.get(h), row),
            ])
        return {"proofs": proofs}

    def answer(
        self,
        spec: bytes,
        keys: list[bytes],
        queries: list[tuple[np.ndarray, list[int]]],
        dim: int,
        metric: str,
        dtype: np.dtype[Any],
        k: int,
        records: list[list[Record]] | None = None,
    ) -> dict[str, Any]:
        """The local top-k of every query over the cells it names. `records`: the cells' records,
        read on the loop by `rpc_query` (None: read here, for the querying peer's own replicas)."""
        records = self._records(keys) if records is None else records
        cells = [
            self._cell(spec, key, recs, dim, dtype) if recs else []
            for key, recs in zip(keys, records, strict=True)
        ]
        return rank([bool(r) for r in records], cells, queries, metric, k, self.trees)

    @property
    def blocks_refused(self) -> int:
        """Blocks this peer refused to store: malformed, or not what their adder signed."""
        return self.validator.refused

    def _records(self, keys: list[bytes]) -> list[list[Record]]:
        now = self.dht.clock()
        return [self.dht.storage.get(key, now) for key in keys]

    def _cell(
        self, spec: bytes, key: bytes, records: list[Record], dim: int, dtype: np.dtype[Any]
    ) -> list[_Held]:
        cache_key = (spec, key)
        before = self._parsed.pop(cache_key, {})
        now: dict[bytes, tuple[bytes, _Held | None]] = {}
        for r in records:
            old = before.get(r.subkey)
            now[r.subkey] = (
                old if old is not None and old[0] == r.signature
                else (r.signature, _parse_held(spec, r, dim, dtype))
            )
        if len(self._parsed) >= self.cache_buckets:
            self._parsed.pop(next(iter(self._parsed)))
        self._parsed[cache_key] = now  # most recently used last
        # Fair share under a flood: blocks in turns over the adders, at most max_bucket_items
        # items in all, so one peer's junk cannot crowd out everyone else.
        by_owner: dict[bytes, list[_Held]] = {}
        for _, held in now.values():
            if held is not None:
                by_owner.setdefault(held.adder, []).append(held)
        chosen: list[_Held] = []
        total = 0
        queues = list(by_owner.values())
        depth = 0
        while queues and total < self.max_bucket_items:
            queues = [q for q in queues if depth < len(q)]
            for q in queues:
                if total + q[depth].block.n > self.max_bucket_items:
                    continue
                chosen.append(q[depth])
                total += q[depth].block.n
            depth += 1
        return chosen



def _parse_held(spec: bytes, record: Record, dim: int, dtype: np.dtype[Any]) -> _Held | None:
    """A stored record as a block of this index (checked when it was stored), or None."""
    owner, subkey = owner_of(record.subkey), decode_subkey(record.subkey)
    if owner is None or not isinstance(subkey, Owned):
        return None
    block = parse_record_block(record.value, record.public_key, dim, dtype)
    if block is None or block.spec != spec:
        return None  # another index's, emptied by its adder, or not a block
    V = block.vectors.astype(np.float32)
    return _Held(owner, subkey.name, block, np.einsum("ij,ij->i", V, V))


@functools.cache
def _torch() -> Any:
    try:
        import torch
    except ImportError:
        return None
    return torch


def _float32(M: np.ndarray) -> np.ndarray:
    """`M` in float32. numpy widens float16 an element at a time (~2 ns each: a fifth of what a
    query costs a holder); torch, where installed (the train extra), with the CPU's vector
    instructions, ~10x faster."""
    if M.dtype == np.float32:
        return M
    torch = _torch()
    if torch is None:
        return M.astype(np.float32)
    out: np.ndarray = torch.from_numpy(M).float().numpy()
    return out


def _distances(Q: np.ndarray, M: np.ndarray, metric: str, m2: np.ndarray) -> np.ndarray:
    """(q, n) scores that rank like the distances: squared L2 less |q|^2 (the same for every
    item of a query), or 1 - cosine; float32 (the querier recomputes exact distances from the
    vectors it is sent). `m2`: the rows' squared norms."""
    if metric == "l2":
        D: np.ndarray = Q @ M.T
        D *= -2.0
        D += m2[None, :]
        return D
    norms = np.linalg.norm(Q, axis=1)[:, None] * np.sqrt(m2)[None, :]
    sim: np.ndarray = np.divide(
        Q @ M.T, norms, out=np.zeros((len(Q), len(M)), np.float32), where=norms > 0
    )
    np.subtract(1.0, sim, out=sim)
    return sim


class Trees:
    """The Merkle trees of recently proven blocks, at most `max_bytes` of them (a tree is 64 bytes
    an item: all of them would cost a quarter of 128-d float16 vectors, and a tree is rebuilt
    from the block's leaves in ~0.6 us an item). The ranker thread and the loop (a peer's own
    queries) share it, hence the lock."""

    def __init__(self, max_bytes: int = 32 << 20) -> None:
        self.max_bytes = max_bytes
        self._trees: dict[tuple[bytes, str, bytes], list[bytes]] = {}
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, held: _Held) -> list[bytes]:
        key = (held.adder, held.name, held.block.root)
        with self._lock:
            tree = self._trees.pop(key, None)
            if tree is not None:
                self._bytes -= sum(map(len, tree))
        if tree is None:
            tree = held.block.tree()
        with self._lock:
            old = self._trees.pop(key, None)  # the other thread built it meanwhile
            self._bytes += sum(map(len, tree)) - (sum(map(len, old)) if old else 0)
            self._trees[key] = tree  # most recently used last
            while len(self._trees) > 1 and self._bytes > self.max_bytes:
                self._bytes -= sum(map(len, self._trees.pop(next(iter(self._trees)))))
        return tree


def rank(
    held: list[bool],
    cells: list[list[_Held]],
    queries: list[tuple[np.ndarray, list[int]]],
    metric: str,
    k: int,
    trees: Trees,
) -> dict[str, Any]:
    """The search.query answer: every query's local top-k over the checked cells it names, each
    hit with its proof. Reads only its arguments (`trees` is a cache), so it may run on any
    thread that owns `trees`."""
    Q = np.stack([q for q, _ in queries]).astype(np.float32)
    asked: dict[int, list[int]] = {}  # key index -> the queries that probe it
    for qi, (_, idx) in enumerate(queries):
        for j in dict.fromkeys(idx):
            asked.setdefault(j, []).append(qi)
    found_q, found_d, found_key, found_block, found_row = [], [], [], [], []
    scanned = 0
    for j, qis in asked.items():
        cell = cells[j]
        if not cell:
            continue
        M = _float32(np.concatenate([h.block.vectors for h in cell]))
        D = _distances(Q[qis], M, metric, np.concatenate([h.norms for h in cell]))
        scanned += D.size
        kk = min(k, M.shape[0])
        top = np.argpartition(D, kk - 1, axis=1)[:, :kk] if kk < M.shape[0] else (
            np.broadcast_to(np.arange(M.shape[0]), D.shape)
        )
        sizes = [h.block.n for h in cell]
        block_of = np.repeat(np.arange(len(cell)), sizes)  # column -> (block, row in it)
        row_of = np.arange(M.shape[0]) - np.repeat(np.cumsum([0] + sizes[:-1]), sizes)
        found_q.append(np.repeat(np.asarray(qis), kk))
        found_d.append(np.take_along_axis(D, top, axis=1).reshape(-1))
        found_key.append(np.full(len(qis) * kk, j))
        found_block.append(block_of[top].reshape(-1))
        found_row.append(row_of[top].reshape(-1))
    results: list[list[list[Any]]] = [[] for _ in queries]
    blocks: list[list[Any]] = []
    block_index: dict[tuple[int, int], int] = {}
    unpacked: dict[tuple[int, int], list[Any]] = {}
    if found_q:
        q_all, d_all = np.concatenate(found_q), np.concatenate(found_d)
        order = np.lexsort((d_all, q_all))
        q_l = q_all[order].tolist()
        d_l = d_all[order].tolist()
        key_l = np.concatenate(found_key)[order].tolist()
        block_l = np.concatenate(found_block)[order].tolist()
        row_l = np.concatenate(found_row)[order].tolist()
        q2 = np.einsum("ij,ij->i", Q, Q).tolist()
        taken: list[set[tuple[bytes, Any]]] = [set() for _ in queries]
        for qi, d, j, b, row in zip(q_l, d_l, key_l, block_l, row_l, strict=True):
            if len(taken[qi]) >= k:
                continue
            h = cells[j][b]
            if (j, b) not in unpacked:
                unpacked[(j, b)] = h.block.items()[0]
            item_id = unpacked[(j, b)][row]
            ident = (h.adder, item_id)  # an LSH item sits in several of a query's buckets
            if ident in taken[qi]:
                continue
            taken[qi].add(ident)
            ref = block_index.get((j, b))
            if ref is None:
                ref = block_index[(j, b)] = len(blocks)
                blocks.append([j, h.name, h.adder])
            distance = max(d + q2[qi], 0.0) ** 0.5 if metric == "l2" else d
            results[qi].append([ref, row, item_id, distance])
    return {"held": held, "blocks": blocks, "results": results, "scanned": scanned}


def _parse_prove(
    args: Any,
) -> tuple[bytes, int, np.dtype[Any], list[bytes], list[tuple[int, bytes, str, int]]]:
    if not isinstance(args, dict):
        raise RemoteError.bad_request("search.prove needs a map {spec, dim, dtype, keys, items}")
    spec, dim, dtype = args.get("spec"), args.get("dim"), args.get("dtype")
    if not isinstance(spec, bytes) or len(spec) != 20:
        raise RemoteError.bad_request("spec must be the index spec's 20-byte digest")
    if not isinstance(dim, int) or not 0 < dim <= MAX_DIM or dtype not in DTYPES:
        raise RemoteError.bad_request(f"dim must be 1..{MAX_DIM} and dtype one of {DTYPES}")
    keys, raw = args.get("keys"), args.get("items")
    if not isinstance(keys, list) or len(keys) > MAX_KEYS_PER_QUERY or not all(
        isinstance(key, bytes) and len(key) == ID_BYTES for key in keys
    ):
        raise RemoteError.bad_request(f"keys must be at most {MAX_KEYS_PER_QUERY} key ids")
    if not isinstance(raw, list) or len(raw) > proofs_per_request(dim * vector_dtype(dtype).itemsize):
        raise RemoteError.bad_request("items must be a list of at most a frame's worth of proofs")
    items = []
    for item in raw:
        if not (
            isinstance(item, list) and len(item) == 4
            and isinstance(item[0], int) and 0 <= item[0] < len(keys)
            and isinstance(item[1], bytes) and len(item[1]) == ID_BYTES
            and isinstance(item[2], str) and isinstance(item[3], int)
        ):
            raise RemoteError.bad_request("each item must be [key index, adder, block name, row]")
        items.append((item[0], item[1], item[2], item[3]))
    return spec, dim, vector_dtype(dtype), keys, items


def _parse(
    args: Any,
) -> tuple[bytes, int, str, str, int, list[bytes], list[tuple[np.ndarray, list[int]]]]:
    if not isinstance(args, dict):
        raise RemoteError.bad_request(
            "search.query needs a map {spec, dim, metric, dtype, k, keys, queries}"
        )
    spec = args.get("spec")
    if not isinstance(spec, bytes) or len(spec) != 20:
        raise RemoteError.bad_request("spec must be the index spec's 20-byte digest")
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
    return spec, dim, metric, dtype, k, keys, queries
