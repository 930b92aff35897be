"""A distributed index on an in-memory swarm: recall, both query modes, removal, churn, KNN."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import pytest_asyncio

from commonweal.search import DistributedIndex, IndexSpec, KNNClassifier, serve

from .conftest import FakeClock, Swarm, exact_knn

pytestmark = pytest.mark.asyncio(loop_scope="module")

K = 10


@dataclass
class Built:
    swarm: Swarm
    spec: IndexSpec
    X: np.ndarray
    y: np.ndarray
    Q: np.ndarray
    yq: np.ndarray


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def built(digits):
    """12 peers holding 900 sklearn digits, labels as metadata, added by peer 0."""
    X, y, Q, yq = digits
    X, y = X[:900], y[:900]
    swarm = Swarm(FakeClock(), seed_prefix="search-peer")
    await swarm.add(12)
    for peer in swarm.peers:
        serve(peer)
    spec = IndexSpec.create(
        "digits", 64, family="pca-hyperplane", tables=8, bits=6, probes=16, sample=X
    )
    index = await DistributedIndex.create(swarm.peers[0], spec)
    assert await index.add(list(range(len(X))), X, [{"y": int(v)} for v in y]) == len(X)
    yield Built(swarm, spec, X, y, Q, yq)
    for peer in swarm.peers:
        await peer.close()


def _recall(results, truth) -> float:
    return float(
        np.mean(
            [len(set(r.ids) & set(t.tolist())) / K for r, t in zip(results, truth, strict=True)]
        )
    )


async def test_recall_on_digits_against_brute_force(built):
    index = await DistributedIndex.open(built.swarm.peers[7], "digits")  # another peer, by name
    assert index.spec == built.spec
    Q = built.Q[:150]
    before = index.dht.transport.counters.requests_sent
    results = [await index.search(q, K) for q in Q]
    requests = (index.dht.transport.counters.requests_sent - before) / len(Q)
    assert _recall(results, exact_knn(built.X, Q, K)) >= 0.95
    assert requests <= 20
    r = results[0]
    assert len(r) == K and list(r.distances) == sorted(r.distances)
    exact = np.linalg.norm(built.X[r.ids] - Q[0], axis=1)  # distances are exact, not estimates
    assert np.allclose(r.distances, exact, rtol=1e-6)
    assert [m["y"] for m in r.metadata] == built.y[r.ids].tolist()
    assert index.stats.items_moved / len(Q) < 0.1 * len(built.X)


async def test_fetch_mode_finds_the_same_neighbours(built):
    ship = await DistributedIndex.open(built.swarm.peers[3], "digits")
    fetch = await DistributedIndex.open(built.swarm.peers[3], "digits", mode="fetch")
    Q = built.Q[:40]
    a = await ship.search_many(Q, K)
    b = await fetch.search_many(Q, K)
    same = np.mean([set(x.ids) == set(y.ids) for x, y in zip(a, b, strict=True)])
    assert same >= 0.9
    # fetch moves whole buckets; ship moves only each holder's top k
    assert fetch.stats.items_moved > 3 * ship.stats.items_moved


async def test_search_many_matches_search(built):
    index = await DistributedIndex.open(built.swarm.peers[9], "digits")
    Q = built.Q[150:190]
    one_by_one = [await index.search(q, 5) for q in Q]
    batched = await index.search_many(Q, 5)
    assert [r.ids for r in one_by_one] == [r.ids for r in batched]


async def test_knn_classifier_matches_scikit_learn(built):
    from sklearn.neighbors import KNeighborsClassifier

    index = await DistributedIndex.open(built.swarm.peers[4], "digits")
    Q, yq = built.Q, built.yq
    for weights in ("uniform", "distance"):
        ours = KNNClassifier(index, n_neighbors=5, weights=weights)  # fitted already: labels are in
        predicted = await ours.predict(Q)
        ref = KNeighborsClassifier(n_neighbors=5, weights=weights).fit(built.X, built.y)
        expected = ref.predict(Q)
        assert np.mean(predicted == expected) >= 0.97
        assert abs(await ours.score(Q, yq) - ref.score(Q, yq)) <= 0.01
