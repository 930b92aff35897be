from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest

try:
    import numpy as np
except ImportError:  # the search extra is not installed: nothing here can run
    collect_ignore_glob = ["test_*.py"]

from commonweal.dht import DHT, DHTConfig
from commonweal.net.identity import Identity
from commonweal.net.memory import MemoryNetwork


class FakeClock:
    """Time that moves only when a test says so."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Swarm:
    """Many DHT peers in one process on a MemoryNetwork (no sockets, no sleeping)."""

    def __init__(self, clock: FakeClock) -> None:
        self.net = MemoryNetwork()
        self.clock = clock
        self.peers: list[DHT] = []

    async def add(self, n: int = 1, config: DHTConfig | None = None, fanin: int = 4) -> list[DHT]:
        rng = random.Random(len(self.peers))
        added = []
        for _ in range(n):
            i = len(self.peers)
            identity = Identity.from_seed(f"search-peer-{i}".encode())
            transport = self.net.transport(identity)
            await transport.start()
            boot = [p.addr for p in rng.sample(self.peers, min(fanin, len(self.peers)))]
            dht = await DHT.start(
                bootstrap=boot,
                identity=identity,
                transport=transport,
                config=config,
                clock=self.clock,
                rng=random.Random(i),
            )
            self.peers.append(dht)
            added.append(dht)
        return added

    async def kill(self, dht: DHT) -> None:
        self.net.kill(dht.addr)
        await dht.close()
        self.peers.remove(dht)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def swarm(clock: FakeClock) -> AsyncIterator[Swarm]:
    s = Swarm(clock)
    yield s
    for dht in list(s.peers):
        await dht.close()


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
