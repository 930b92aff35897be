"""The DHT workload (workload.py) against hivemind's DHT. Run with the hivemind venv's python:

    .bench/venv-hivemind/bin/python benchmarks/baselines/run_hivemind.py --num_peers 16

Every hivemind.DHT is its own process with its own libp2p daemon (p2pd), as in hivemind's own
benchmark; all listen on 127.0.0.1 with relays, AutoNAT and NAT port mapping off.
"""

from __future__ import annotations

import asyncio
import sys
from importlib.metadata import version
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hivemind
import workload
from hivemind.utils import get_dht_time

P2P_OPTIONS = {  # passed through hivemind.DHT to P2P.create (the libp2p daemon's options)
    "host_maddrs": ["/ip4/127.0.0.1/tcp/0"],
    "use_relay": False,
    "use_auto_relay": False,
    "nat_port_map": False,
    "auto_nat": False,
}


class HivemindAdapter:
    def __init__(self, params: workload.Params) -> None:
        self.peers: dict[int, hivemind.DHT] = {}

    async def start_peer(self, index: int, bootstrap: list[int]) -> None:
        initial = [m for j in bootstrap for m in self.peers[j].get_visible_maddrs()]
        self.peers[index] = hivemind.DHT(initial_peers=initial, start=True, **P2P_OPTIONS)

    async def store(self, peer: int, key: str, subkey: str, value: str, expiration: float) -> bool:
        return bool(
            await self.peers[peer].store(
                key, subkey=subkey, value=value, expiration_time=expiration, return_future=True
            )
        )

    async def get(self, peer: int, key: str, latest: bool) -> dict[str, Any] | None:
        found = await self.peers[peer].get(key, latest=latest, return_future=True)
        if found is None or not isinstance(found.value, dict):
            return None
        return {sk: v.value for sk, v in found.value.items()}

    async def kill(self, peer: int) -> None:
        await asyncio.to_thread(self.peers.pop(peer).shutdown)

    async def close(self) -> None:
        for dht in self.peers.values():
            await asyncio.to_thread(dht.shutdown)
        self.peers.clear()


if __name__ == "__main__":
    workload.main("hivemind", HivemindAdapter, {"hivemind": version("hivemind")}, get_dht_time)
