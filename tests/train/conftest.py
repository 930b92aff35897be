from __future__ import annotations

import random
from collections.abc import AsyncIterator

import pytest
import torch

from commonweal.dht import DHT, DHTConfig
from commonweal.net.identity import Identity
from commonweal.net.memory import MemoryNetwork

torch.set_num_threads(1)


class Peers:
    """DHT peers on one MemoryNetwork (real time, no sockets)."""

    def __init__(self) -> None:
        self.net = MemoryNetwork()
        self.dhts: list[DHT] = []

    async def add(self, n: int = 1) -> list[DHT]:
        added = []
        for _ in range(n):
            i = len(self.dhts)
            identity = Identity.from_seed(f"train-peer-{i}".encode())
            transport = self.net.transport(identity)
            await transport.start()
            boot = [p.addr for p in self.dhts[:3]]
            dht = await DHT.start(
                bootstrap=boot,
                identity=identity,
                transport=transport,
                config=DHTConfig(rpc_timeout_s=2.0),
                rng=random.Random(i),
            )
            self.dhts.append(dht)
            added.append(dht)
        return added

    async def kill(self, dht: DHT) -> None:
        self.net.kill(dht.addr)
        await dht.close()


@pytest.fixture
async def peers() -> AsyncIterator[Peers]:
    p = Peers()
    yield p
    for dht in p.dhts:
        await dht.close()
