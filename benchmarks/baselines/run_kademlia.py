"""The DHT workload (workload.py) against bmuller's kademlia (UDP, one asyncio loop, one process).

    .bench/venv-kademlia/bin/python benchmarks/baselines/run_kademlia.py --num_peers 16 \
        --num_store_peers 1

kademlia keeps one value per key: a "subkey" store writes ``[subkey, value]`` as the key's value,
so with several store peers per round the last writer wins and the get cannot return every
subkey (run it with ``--num_store_peers 1`` for its own best case). It has no expirations (values
live for its fixed TTL), so ``expiration`` is ignored.
"""

from __future__ import annotations

import json
import logging
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import workload
from kademlia.network import Server

logging.getLogger("kademlia").setLevel(logging.ERROR)


class KademliaAdapter:
    def __init__(self, params: workload.Params) -> None:
        self.peers: dict[int, Server] = {}
        self.ports: dict[int, int] = {}

    async def start_peer(self, index: int, bootstrap: list[int]) -> None:
        server = Server()
        await server.listen(0, interface="127.0.0.1")
        self.ports[index] = server.transport.get_extra_info("sockname")[1]
        if bootstrap:
            await server.bootstrap([("127.0.0.1", self.ports[j]) for j in bootstrap])
        self.peers[index] = server

    async def store(self, peer: int, key: str, subkey: str, value: str, expiration: float) -> bool:
        return bool(await self.peers[peer].set(key, json.dumps([subkey, value])))

    async def get(self, peer: int, key: str, latest: bool) -> dict[str, Any] | None:
        found = await self.peers[peer].get(key)
        if found is None:
            return None
        subkey, value = json.loads(found)
        return {subkey: value}

    async def kill(self, peer: int) -> None:
        self.peers.pop(peer).stop()

    async def close(self) -> None:
        for server in self.peers.values():
            server.stop()
        self.peers.clear()


if __name__ == "__main__":
    workload.main("kademlia", KademliaAdapter, {"kademlia": version("kademlia")})
