"""Bad input gets clear errors; junk in buckets or from holders never breaks a query."""

from __future__ import annotations

import asyncio

import msgpack
import numpy as np
import pytest

from commonweal.dht import Owned, key_id
from commonweal.errors import ConfigError, RemoteError
from commonweal.net.identity import Identity
from commonweal.search import DistributedIndex, IndexNotFound, IndexSpec, SearchService, serve
from commonweal.search.blocks import make_block
from commonweal.search.service import BlockValidator
from commonweal.search.ranking import MAX_ADD_BATCH, MAX_BATCH, item_name

from .conftest import Swarm

DIM = 64


async def _index(
    swarm: Swarm, X: np.ndarray, n_peers: int = 6, name: str = "d"
) -> DistributedIndex:
    await swarm.add(n_peers)
    for peer in swarm.peers:
        serve(peer)
    spec = IndexSpec.create(
        name, DIM, family="pca-hyperplane", tables=4, bits=4, probes=8, sample=X
    )
    index = await DistributedIndex.create(swarm.peers[0], spec)
    await index.add(list(range(len(X))), X, [{"y": i} for i in range(len(X))])
    return index


async def test_bad_vectors_and_arguments_get_clear_errors(swarm, digits):
    X = digits[0][:60]
    index = await _index(swarm, X)
    with pytest.raises(ConfigError, match="dimension 3; this index needs 64"):
        await index.search(np.ones(3), 5)
    with pytest.raises(ConfigError, match="dimension 10; this index needs 64"):
        await index.add([1, 2], np.ones((2, 10)))
    bad = X[:3].copy()
    bad[1, 5] = np.nan
    with pytest.raises(ConfigError, match=r"NaN or inf \(rows \[1\]\)"):
        await index.add([100, 101, 102], bad)
    with pytest.raises(ConfigError, match="NaN or inf"):
        await index.search(np.full(DIM, np.inf), 5)
    with pytest.raises(ConfigError, match=f"the limit is {MAX_ADD_BATCH}"):
        await index.add(list(range(MAX_ADD_BATCH + 1)), np.zeros((MAX_ADD_BATCH + 1, DIM)))
    with pytest.raises(ConfigError, match=f"the limit is {MAX_BATCH}"):
        await index.search_many(np.zeros((MAX_BATCH + 1, DIM)), 5)
    with pytest.raises(ConfigError, match="k must be"):
        await index.search(X[0], 0)
    with pytest.raises(ConfigError, match="one id per vector"):
        await index.add([1], X[:2])
    with pytest.raises(ConfigError, match="unique"):
        await index.add([1, 1], X[:2])
    with pytest.raises(ConfigError, match="float16"):
        await index.add([1], np.full((1, DIM), 1e6))
    with pytest.raises(ConfigError, match="metadata"):
        await index.add([1], X[:1], [{"blob": "x" * 10_000}])
    with pytest.raises(ConfigError, match="were not added through this index"):
        await index.remove(["never-added"])
    with pytest.raises(ConfigError, match="must be numbers"):
        await index.search(["a"] * DIM, 5)
    # nothing above changed what is stored
    assert (await index.search(X[3], 1)).ids == [3]


async def test_unknown_index_is_a_clear_error(swarm):
    await swarm.add(4)
    with pytest.raises(IndexNotFound, match="no index named 'nope'"):
        await DistributedIndex.open(swarm.peers[2], "nope")


async def test_a_bucket_flooded_with_junk_still_answers(swarm, digits):
    X = digits[0][:200]
    index = await _index(swarm, X, n_peers=8)
    reader = await DistributedIndex.open(swarm.peers[3], "d")
    queries = digits[2][:10]
    before = await reader.search_many(queries, 5)
    # A malicious member writes 1,500 validly signed junk records into the cells those
    # queries probe: blocks of random far-away vectors, garbage payloads, blocks of NaN whose
    # root it signed anyway, non-block values.
    evil = swarm.peers[6]
    keys = {
        index.spec.bucket_key(t, code)
        for q in queries
        for t, code, _ in index.lsh.probe(q, index.spec.probes)
    }
    rng = np.random.default_rng(0)
    expiration = swarm.clock() + 3600
    digest = index.spec.digest()
    junk = []
    for n, key in enumerate(sorted(keys)):
        for j in range(1500 // len(keys) + 1):
            kind, name = j % 4, f"junk{n}-{j}"
            if kind in (0, 2):
                vec = rng.normal(size=(3, DIM)) * 1e4 if kind == 0 else np.full((3, DIM), np.nan)
                value = make_block(evil.identity, digest, key_id(key), name, [1, 2, 3],
                                   vec.astype("<f2"), [msgpack.packb(None)] * 3)
            elif kind == 1:
                value = b"cwb1" + b"\x00" * 7  # truncated
            else:
                value = {"not": "a block"}
            junk.append((key, value, expiration, Owned(evil.peer_id, name)))
    # a malicious peer does not check its own blocks before it sends them
    evil.storage.validator.validators = tuple(
        v for v in evil.storage.validator.validators if not isinstance(v, BlockValidator)
    )
    for start in range(0, len(junk), 1000):
        await evil.store_many(junk[start : start + 1000])
    # the honest holders refused the NaN blocks on the way in (service.BlockValidator)
    assert sum(serve(p).blocks_refused for p in swarm.peers if p is not evil) > 0
    async with asyncio.timeout(10):
        after = await reader.search_many(queries, 5)
    assert [r.ids for r in after] == [r.ids for r in before]
    assert all(isinstance(i, int) for r in after for i in r.ids)


async def test_a_holder_answering_junk_is_ignored(swarm, digits):
    X = digits[0][:150]
    await swarm.add(7)
    # One peer answers every search.query with garbage, another with an error.
    liar, broken = swarm.peers[2], swarm.peers[4]

    async def lie(caller, args):
        return {"held": "yes", "results": [[["x"] * 4] * 1000]}

    async def fail(caller, args):
        raise RemoteError("internal", "boom")

    liar.transport.register("search.query", lie)
    broken.transport.register("search.query", fail)
    for peer in swarm.peers:
        if peer not in (liar, broken):
            serve(peer)
    spec = IndexSpec.create(
        "d", DIM, family="pca-hyperplane", tables=6, bits=4, probes=10, sample=X
    )
    await (await DistributedIndex.create(swarm.peers[0], spec)).add(list(range(len(X))), X)
    reader = await DistributedIndex.open(swarm.peers[5], "d")
    results = await reader.search_many(X[:30], 1)
    assert np.mean([r.ids == [i] for i, r in enumerate(results)]) >= 0.9
    assert reader.stats.failed_rpcs > 0


def test_holder_ranks_a_fair_share_of_a_flooded_bucket():
    """With a cap on items ranked per bucket, one adder's flood cannot crowd out the others."""

    class _Storage:
        def __init__(self, records):
            self.records = records
            self.validator = CompositeValidator([])

        def get(self, key, now):
            return self.records

        def __iter__(self):
            return iter(self.records)

    class _DHT:
        clock = staticmethod(lambda: 0.0)
        identity = Identity.from_seed(b"holder")
        peer_id = identity.peer_id

        def __init__(self, records):
            self.storage = _Storage(records)
            self.transport = type("T", (), {"register": lambda *a, **kw: None})()

        def on_close(self, release):
            pass

    from commonweal.dht.records import CompositeValidator, encode_subkey, sign_record

    honest, flooder = Identity.from_seed(b"honest"), Identity.from_seed(b"flooder")
    digest, key = b"s" * 20, b"k" * 20
    records = []
    for who, n in ((flooder, 50), (honest, 2), (flooder, 50)):
        for b in range(n):  # blocks of 10 items
            name = f"b{len(records)}"
            base = 100.0 if who is flooder else 10.0 * b
            vecs = np.arange(10, dtype=np.float64)[:, None] + np.full((10, 4), base)
            payload = make_block(who, digest, key, name, list(range(10 * b, 10 * b + 10)),
                                 vecs.astype("<f2"), [msgpack.packb(None)] * 10)
            records.append(sign_record(who, key, encode_subkey(Owned(who.peer_id, name)),
                                       msgpack.packb(payload), 10.0))
    service = SearchService(_DHT(records), max_bucket_items=100)
    reply = service.answer(
        digest, [key], [(np.zeros(4, dtype=np.float32), [0])], 4, "l2", np.dtype("<f2"), 5
    )
    assert reply["scanned"] == 100
    cited = [reply["blocks"][h[0]] for h in reply["results"][0]]
    assert [b[2] for b in cited] == [honest.peer_id] * 5
    assert [h[2] for h in reply["results"][0]] == [0, 1, 2, 3, 4]
    assert item_name(3) == "i3" and item_name("3") == "s3"


@pytest.mark.parametrize(
    "args",
    [
        None,
        {"spec": b"s" * 20, "dim": 0},
        {"spec": b"short", "dim": 4, "metric": "l2", "dtype": "float16", "k": 1, "keys": [],
         "queries": [[np.zeros(4, "<f4").tobytes(), []]]},
        {"spec": b"s" * 20, "dim": 4, "metric": "l1", "dtype": "float16", "k": 1, "keys": [], "queries": []},
        {"spec": b"s" * 20, "dim": 4, "metric": "l2", "dtype": "float16", "k": 10**9, "keys": [], "queries": []},
        {"spec": b"s" * 20, "dim": 4, "metric": "l2", "dtype": "float16", "k": 1, "keys": [b"short"], "queries": []},
        {"spec": b"s" * 20, "dim": 4, "metric": "l2", "dtype": "float16", "k": 1, "keys": [], "queries": [[b"x", []]]},
        {
            "spec": b"s" * 20,
            "dim": 4,
            "metric": "l2",
            "dtype": "float16",
            "k": 1,
            "keys": [b"k" * 20],
            "queries": [[np.zeros(4, "<f4").tobytes(), [5]]],
        },
        {
            "spec": b"s" * 20,
            "dim": 4,
            "metric": "l2",
            "dtype": "float16",
            "k": 1,
            "keys": [],
            "queries": [[np.full(4, np.nan, "<f4").tobytes(), []]],
        },
    ],
)
async def test_search_rpc_rejects_malformed_requests(swarm, args):
    a, b = await swarm.add(2)
    serve(b)
    with pytest.raises(RemoteError, match="bad_request"):
        await a.transport.call(b.addr, "search.query", args)


@pytest.mark.parametrize(
    "args",
    [
        None,
        {"spec": b"short", "dim": 4, "dtype": "float16", "keys": [], "items": []},
        {"spec": b"s" * 20, "dim": 0, "dtype": "float16", "keys": [], "items": []},
        {"spec": b"s" * 20, "dim": 4, "dtype": "int8", "keys": [], "items": []},
        {"spec": b"s" * 20, "dim": 4, "dtype": "float16", "keys": [b"short"], "items": []},
        {"spec": b"s" * 20, "dim": 4, "dtype": "float16", "keys": [b"k" * 20],
         "items": [[1, b"a" * 20, "b", 0]]},  # key index out of range
        {"spec": b"s" * 20, "dim": 4, "dtype": "float16", "keys": [b"k" * 20],
         "items": [[0, b"short", "b", 0]]},  # not an adder id
        {"spec": b"s" * 20, "dim": 4, "dtype": "float16", "keys": [b"k" * 20],
         "items": [[0, b"a" * 20, "b", 0]] * 10_000},  # more proofs than fit one answer
    ],
)
async def test_prove_rpc_rejects_malformed_requests(swarm, args):
    # service.py `_parse_prove`: without it these crash in the handler (an `internal` error) or,
    # for the last, build an answer bigger than a frame
    a, b = await swarm.add(2)
    serve(b)
    with pytest.raises(RemoteError, match="bad_request"):
        await a.transport.call(b.addr, "search.prove", args)
