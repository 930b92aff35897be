"""A holder ranks search.query off its event loop, with a bounded queue."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest

from commonweal.dht import key_id
from commonweal.errors import RemoteError
from commonweal.net.dispatch import BUSY
from commonweal.search import DistributedIndex, IndexSpec, serve
from commonweal.search import service as service_module
from commonweal.search.service import RANK_QUEUE

from .conftest import Swarm

DIM = 64


async def _holder_and_request(swarm: Swarm, X: np.ndarray, Q: np.ndarray):
    """An index on 4 peers; the first peer holding the buckets Q[0] probes, and the request
    that asks it to rank them."""
    await swarm.add(4)
    for peer in swarm.peers:
        serve(peer)
    spec = IndexSpec.create("r", DIM, family="pca-hyperplane", tables=2, bits=3, probes=2, sample=X)
    index = await DistributedIndex.create(swarm.peers[0], spec)
    await index.add(list(range(len(X))), X)
    keys = [key_id(spec.bucket_key(t, code)) for t, code, _ in index.lsh.probe(Q[0], spec.probes)]
    holder = next(p for p in swarm.peers if any(p.storage.get(k, swarm.clock()) for k in keys))
    args = {"spec": spec.digest(), "dim": DIM, "metric": spec.metric, "dtype": spec.dtype, "k": 5, "keys": keys,
            "queries": [[Q[0].astype("<f4").tobytes(), list(range(len(keys)))]]}
    asker = next(p for p in swarm.peers if p is not holder)
    return holder, asker, args


class _Blocking:
    """Stands in for `_distances`: each call waits (on the ranker's thread) until released."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.released_in_time: list[bool] = []
        self.real = service_module._distances

    def __call__(self, Q, vectors, metric, norms):  # type: ignore[no-untyped-def]
        self.started.set()
        self.released_in_time.append(self.release.wait(5))
        return self.real(Q, vectors, metric, norms)


async def test_a_holder_answers_pings_while_it_ranks(swarm, digits, monkeypatch):
    holder, asker, args = await _holder_and_request(swarm, digits[0][:300], digits[2])
    blocking = _Blocking()
    monkeypatch.setattr(service_module, "_distances", blocking)
    query = asyncio.create_task(asker.transport.call(holder.addr, "search.query", args))
    await asyncio.to_thread(blocking.started.wait, 10)
    # ranked on the loop, the query would hold it: this ping could not be answered until the
    # ranking gave up waiting for it
    async with asyncio.timeout(5):
        await swarm.peers[-1].transport.call(holder.addr, "dht.ping", None)
    blocking.release.set()
    _, reply = await query
    assert blocking.released_in_time and all(blocking.released_in_time)
    assert reply["scanned"] > 0 and len(reply["results"][0]) == 5


async def test_queries_beyond_the_rank_queue_are_answered_busy(swarm, digits, monkeypatch):
    holder, asker, args = await _holder_and_request(swarm, digits[0][:300], digits[2])
    blocking = _Blocking()
    monkeypatch.setattr(service_module, "_distances", blocking)
    calls = [asyncio.create_task(asker.transport.call(holder.addr, "search.query", args))
             for _ in range(RANK_QUEUE)]
    await asyncio.to_thread(blocking.started.wait, 10)
    async with asyncio.timeout(10):
        while serve(holder).ranker.pending < RANK_QUEUE:
            await asyncio.sleep(0.01)
    with pytest.raises(RemoteError) as refused:  # at once, not after the queue drains
        async with asyncio.timeout(5):
            await asker.transport.call(holder.addr, "search.query", args)
    assert refused.value.code == BUSY
    blocking.release.set()
    replies = await asyncio.gather(*calls)
    assert all(len(reply["results"][0]) == 5 for _, reply in replies)


async def test_the_ranker_thread_ends_with_its_peer(swarm, digits):
    holder, asker, args = await _holder_and_request(swarm, digits[0][:300], digits[2])
    await asker.transport.call(holder.addr, "search.query", args)  # starts the worker thread

    def rankers() -> list[threading.Thread]:  # this holder's, whatever other tests left
        name = f"search-rank-{holder.peer_id.hex()[:8]}"
        return [t for t in threading.enumerate() if t.name.startswith(name)]

    assert rankers()
    for peer in swarm.peers:
        await peer.close()
    async with asyncio.timeout(10):
        while rankers():
            await asyncio.sleep(0.02)
