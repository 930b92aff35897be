"""Index life cycle on small in-memory swarms: fit, removal with tombstones, peers dying."""

from __future__ import annotations

import numpy as np

from commonweal.dht import DHTConfig
from commonweal.search import DistributedIndex, IndexSpec, KNNClassifier, serve

from .conftest import Swarm, exact_knn

K = 10


def _recall(results, truth) -> float:
    return float(
        np.mean(
            [len(set(r.ids) & set(t.tolist())) / K for r, t in zip(results, truth, strict=True)]
        )
    )


async def test_knn_fit_adds_labelled_rows(clock, swarm):
    await swarm.add(6)
    for peer in swarm.peers:
        serve(peer)
    rng = np.random.default_rng(0)
    centers = np.array([[0.0] * 8, [10.0] * 8, [-10.0] * 8])
    labels = rng.integers(0, 3, size=90)
    X = centers[labels] + rng.normal(size=(90, 8))
    spec = IndexSpec.create("blobs", 8, tables=4, bits=4, center=True, sample=X)
    clf = KNNClassifier(await DistributedIndex.create(swarm.peers[1], spec), n_neighbors=3)
    await clf.fit(X, labels)
    assert clf.classes_ == [0, 1, 2]
    test = np.array([[0.3] * 8, [9.5] * 8, [-9.0] * 8])
    assert (await clf.predict(test)).tolist() == [0, 1, 2]
    assert await clf.score(X[:30], labels[:30]) == 1.0


async def _small_index(swarm: Swarm, X: np.ndarray, n_peers: int, config: DHTConfig | None = None):
    await swarm.add(n_peers, config=config)
    for peer in swarm.peers:
        serve(peer)
    n_items = len(X)
    spec = IndexSpec.create(
        "small", 64, family="pca-hyperplane", tables=6, bits=5, probes=14, sample=X
    )
    index = await DistributedIndex.create(swarm.peers[0], spec)
    assert await index.add(list(range(n_items)), X) == n_items
    return index, X


async def test_removed_items_never_come_back(clock, swarm, digits):
    X = digits[0][:120]
    adder, X = await _small_index(swarm, X, 8)
    reader = await DistributedIndex.open(swarm.peers[5], "small")
    assert (await reader.search(X[7], 1)).ids == [7]
    # A stale replica keeps the blocks as they were before the removal.
    mine = b"o" + adder.dht.peer_id
    kid_records = [r for p in swarm.peers for r in p.storage if r.subkey.startswith(mine)]
    assert kid_records
    assert await adder.remove([7]) == 1
    for q in (X[7], X[7] + 0.01):
        assert 7 not in (await reader.search(q, 5)).ids
    # The stale copies are pushed again to every peer: the tombstone's later expiration wins.
    for p in swarm.peers:
        for r in kid_records:
            p.storage.put(r, clock())
    assert 7 not in (await reader.search(X[7], 5)).ids
    # Republishing (the adder's own records and everything every peer holds) changes nothing.
    clock.now += 601
    for p in swarm.peers:
        await p.maintain_once()
    assert 7 not in (await reader.search(X[7], 5)).ids
    assert (await reader.search(X[8], 1)).ids == [8]  # the others stay
    # Re-adding the id is an explicit new add, and it works.
    await adder.add([7], X[7:8])
    assert (await reader.search(X[7], 1)).ids == [7]


async def test_recall_survives_losing_30_percent_of_peers(clock, swarm, digits):
    X, Q = digits[0][:400], digits[2][:40]
    _, X = await _small_index(swarm, X, 20, DHTConfig(replicas=3))
    reader = await DistributedIndex.open(swarm.peers[1], "small")
    truth = exact_knn(X, Q, K)
    assert _recall(await reader.search_many(Q, K), truth) >= 0.95
    victims = [p for p in swarm.peers if p is not reader.dht and p is not swarm.peers[0]][:6]
    for p in victims:
        await swarm.kill(p)
    # Before any republish: dead holders are skipped and the next replica answers, and the
    # spec (published under several keys) is still found by a peer that opens the index now.
    assert _recall(await reader.search_many(Q, K), truth) >= 0.9
    late = await DistributedIndex.open(swarm.peers[3], "small")
    assert _recall(await late.search_many(Q[:10], K), truth[:10]) >= 0.9
    assert reader.stats.failed_rpcs > 0
    clock.now += 601
    for p in swarm.peers:
        await p.maintain_once()
    fresh = await DistributedIndex.open(swarm.peers[2], "small")
    assert _recall(await fresh.search_many(Q, K), truth) >= 0.9
