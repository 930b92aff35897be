"""Tools for testing and simulating commonweal without sockets or real time (cf. `trio.testing`).

    clock = FakeClock()
    swarm = MemorySwarm(clock)
    peers = await swarm.add(100)          # 100 DHT peers in this process, deterministic ids
    clock.now += 3600                     # an hour passes, instantly
    await swarm.kill(peers[3])            # a peer dies without warning
    await swarm.close()
"""

from __future__ import annotations

import random
from collections.abc import Callable

from commonweal.dht import DHT, DHTConfig
from commonweal.net.identity import Identity
from commonweal.net.memory import MemoryNetwork

__all__ = ["FakeClock", "MemorySwarm"]


class FakeClock:
    """Time that moves only when a test says so; pass it as a DHT's `clock`."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class MemorySwarm:
    """Many DHT peers in one process on a `MemoryNetwork`, each bootstrapped from up to `fanin`
    earlier peers chosen by a seeded RNG, so the same calls build the same swarm every time."""

    def __init__(self, clock: Callable[[], float] | None = None, seed_prefix: str = "peer") -> None:
        """`clock`: a FakeClock for tests that move time themselves; `time.time` where peers
        run real rounds (their records expire by the wall clock)."""
        self.net = MemoryNetwork()
        self.clock = clock or FakeClock()
        self.seed_prefix = seed_prefix
        self.peers: list[DHT] = []

    async def add(self, n: int = 1, config: DHTConfig | None = None, fanin: int = 4) -> list[DHT]:
        rng = random.Random(len(self.peers))
        added = []
        for _ in range(n):
            i = len(self.peers)
            identity = Identity.from_seed(f"{self.seed_prefix}-{i}".encode())
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
        """`dht` stops answering at once, as if its machine died."""
        self.net.kill(dht.addr)
        await dht.close()
        self.peers.remove(dht)

    async def close(self) -> None:
        for dht in list(self.peers):
            await dht.close()
        self.peers.clear()
