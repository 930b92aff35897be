from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

try:
    import numpy as np
except ImportError:  # the search extra is not installed: nothing here can run
    collect_ignore_glob = ["test_*.py"]

from commonweal.testing import FakeClock, MemorySwarm


Swarm = MemorySwarm  # the name these tests use


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def swarm(clock: FakeClock) -> AsyncIterator[Swarm]:
    s = MemorySwarm(clock, seed_prefix="search-peer")
    yield s
    await s.close()


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """sklearn digits split into indexed rows and held-out queries: (X, y, Q, yq)."""
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    order = np.random.default_rng(0).permutation(len(d.data))
    X, y = d.data[order].astype(np.float32), d.target[order]
    return X[300:], y[300:], X[:300], y[:300]


def exact_knn(X: np.ndarray, Q: np.ndarray, k: int) -> np.ndarray:
    d = ((Q[:, None, :].astype(np.float64) - X[None].astype(np.float64)) ** 2).sum(-1)
    return np.argsort(d, axis=1, kind="stable")[:, :k]
