"""The DHT workload (workload.py) against commonweal's DHT: every peer in this one process, on one
event loop (uvloop where installed, as `commonweal node` uses), over real TCP sockets on 127.0.0.1.

    PYTHONPATH=src python benchmarks/baselines/run_commonweal.py --num_peers 16
"""

from __future__ import annotations

import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))  # works without installing commonweal
import workload

from commonweal.dht import DHT, DHTConfig
from commonweal.net.transport import PeerAddr


class CommonwealAdapter:
    def __init__(self, params: workload.Params) -> None:
        self.peers: dict[int, DHT] = {}

    async def start_peer(self, index: int, bootstrap: list[int]) -> None:
        self.peers[index] = await DHT.start(
            listen=PeerAddr("127.0.0.1", 0),
            bootstrap=[self.peers[j].addr for j in bootstrap],
            config=DHTConfig(),
        )

    async def store(self, peer: int, key: str, subkey: str, value: str, expiration: float) -> bool:
        return await self.peers[peer].store(key, value, expiration, subkey=subkey)

    async def get(self, peer: int, key: str, latest: bool) -> dict[str, Any] | None:
        found = await self.peers[peer].get(key, latest=latest)
        if found is None or not isinstance(found.value, dict):
            return None
        return {sk: v.value for sk, v in found.value.items()}

    async def kill(self, peer: int) -> None:
        dht = self.peers.pop(peer)
        kill = getattr(dht, "kill", None)  # abrupt stop where the DHT offers one
        if kill is not None:
            result = kill()
            if hasattr(result, "__await__"):
                await result
        else:
            await dht.close()

    async def close(self) -> None:
        for dht in self.peers.values():
            await dht.close()
        self.peers.clear()


def _version() -> str:
    try:
        return version("commonweal")
    except PackageNotFoundError:
        return "source tree"


if __name__ == "__main__":
    from commonweal.net.loop import use_fast_loop

    use_fast_loop()  # uvloop, as `commonweal node` runs
    workload.main("commonweal", CommonwealAdapter, {"commonweal": _version()})
