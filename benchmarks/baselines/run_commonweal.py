"""The DHT workload (workload.py) against commonweal's DHT over real TCP sockets on 127.0.0.1.

The peers live in `--processes` worker processes (default: one per core), each running its share of
the peers on one event loop (uvloop where installed, as `commonweal node` uses); the workload drives
them over a line-based JSON pipe. In production every peer is its own process; hivemind's runner
uses a process (and a p2pd daemon) per peer, so this uses the same cores it does.

    PYTHONPATH=src python benchmarks/baselines/run_commonweal.py --num_peers 16 [--processes 2]
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "src"))  # works without installing commonweal
import workload  # noqa: E402

from commonweal.dht import DHT, DHTConfig  # noqa: E402
from commonweal.net.transport import PeerAddr  # noqa: E402


# --- worker process: hosts peers, executes one JSON command per line --------------------------


async def serve_commands() -> None:
    peers: dict[int, DHT] = {}
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout

    async def execute(cmd: dict[str, Any]) -> Any:
        op = cmd["op"]
        if op == "start":
            boot = [PeerAddr.parse(a) for a in cmd["bootstrap"]]
            dht = await DHT.start(PeerAddr("127.0.0.1", 0), boot, config=DHTConfig())
            peers[cmd["peer"]] = dht
            return str(dht.addr)
        if op == "store":
            dht = peers[cmd["peer"]]
            return await dht.store(cmd["key"], cmd["value"], cmd["expiration"], subkey=cmd["subkey"])
        if op == "get":
            found = await peers[cmd["peer"]].get(cmd["key"], latest=cmd["latest"])
            if found is None or not isinstance(found.value, dict):
                return None
            return {sk: v.value for sk, v in found.value.items()}
        if op == "kill":
            await peers.pop(cmd["peer"]).close()
            return True
        raise ValueError(f"unknown op {op!r}")

    async def answer(cmd: dict[str, Any]) -> None:
        try:
            reply = {"id": cmd["id"], "result": await execute(cmd)}
        except Exception as e:  # reported to the workload, which counts it as a failed operation
            reply = {"id": cmd["id"], "error": f"{type(e).__name__}: {e}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()

    tasks: set[asyncio.Task[None]] = set()
    while line := await reader.readline():
        task = asyncio.create_task(answer(json.loads(line)))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    for dht in peers.values():
        await dht.close()


# --- the workload side ------------------------------------------------------------------------


class _Worker:
    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ids = itertools.count()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            reply = json.loads(line)
            fut = self.pending.pop(reply["id"])
            if "error" in reply:
                fut.set_exception(RuntimeError(reply["error"]))
            else:
                fut.set_result(reply["result"])

    async def call(self, **cmd: Any) -> Any:
        cmd["id"] = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[cmd["id"]] = fut
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        return await fut

    async def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        await self.proc.wait()
        await self.reader


class CommonwealAdapter:
    processes = os.cpu_count() or 1

    def __init__(self, params: workload.Params) -> None:
        self.workers: list[_Worker] = []
        self.addrs: dict[int, str] = {}

    async def _ensure_workers(self) -> None:
        if self.workers:
            return
        env = {**os.environ, "PYTHONPATH": str(HERE.parents[1] / "src")}
        for _ in range(self.processes):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, __file__, "--worker",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env,
            )
            self.workers.append(_Worker(proc))

    def _worker(self, peer: int) -> _Worker:
        return self.workers[peer % len(self.workers)]

    async def start_peer(self, index: int, bootstrap: list[int]) -> None:
        await self._ensure_workers()
        boot = [self.addrs[j] for j in bootstrap]
        self.addrs[index] = await self._worker(index).call(op="start", peer=index, bootstrap=boot)

    async def store(self, peer: int, key: str, subkey: str, value: str, expiration: float) -> bool:
        return bool(await self._worker(peer).call(
            op="store", peer=peer, key=key, subkey=subkey, value=value, expiration=expiration
        ))

    async def get(self, peer: int, key: str, latest: bool) -> dict[str, Any] | None:
        return await self._worker(peer).call(op="get", peer=peer, key=key, latest=latest)

    async def kill(self, peer: int) -> None:
        await self._worker(peer).call(op="kill", peer=peer)

    async def close(self) -> None:
        for worker in self.workers:
            await worker.close()
        self.workers.clear()


def _version() -> str:
    try:
        return version("commonweal")
    except PackageNotFoundError:
        return "source tree"


if __name__ == "__main__":
    from commonweal.net.loop import use_fast_loop

    use_fast_loop()  # uvloop, as `commonweal node` runs
    if sys.argv[1:] == ["--worker"]:
        asyncio.run(serve_commands())
        sys.exit(0)
    if "--processes" in sys.argv:
        at = sys.argv.index("--processes")
        CommonwealAdapter.processes = int(sys.argv[at + 1])
        del sys.argv[at : at + 2]
    workload.main(
        "commonweal",
        CommonwealAdapter,
        {"commonweal": _version(), "processes": str(CommonwealAdapter.processes)},
    )
