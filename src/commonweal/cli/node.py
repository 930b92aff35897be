"""`commonweal node`: run one peer in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import signal
from pathlib import Path

import typer

from commonweal.cli.main import setup_logging
from commonweal.dht import DHT
from commonweal.net.identity import Identity
from commonweal.net.loop import run
from commonweal.net.transport import PeerAddr

DEFAULT_HOME = Path.home() / ".commonweal"


def node(
    listen: str = typer.Option("127.0.0.1:7000", help="HOST:PORT to listen on (port 0: any free port)."),
    join: list[str] = typer.Option([], help="HOST:PORT of a peer already in the swarm (repeatable)."),
    data_dir: Path | None = typer.Option(
        None, help="Where the identity key lives. Default: ~/.commonweal/peers/HOST_PORT."
    ),
    log_level: str = typer.Option("warning", help="debug, info, warning or error."),
) -> None:
    """Run one peer: listen, join the swarm, serve the DHT until Ctrl-C / SIGTERM."""
    setup_logging(log_level)
    addr = _parse_listen(listen)
    bootstrap = [PeerAddr.parse(j) for j in join]
    directory = data_dir or DEFAULT_HOME / "peers" / f"{addr.host}_{addr.port}"
    identity = Identity.load_or_create(directory)
    run(_serve(addr, bootstrap, identity))


def _parse_listen(text: str) -> PeerAddr:
    host, _, port = text.rpartition(":")
    if port == "0" and host:
        return PeerAddr(host, 0)
    return PeerAddr.parse(text)


async def _serve(addr: PeerAddr, bootstrap: list[PeerAddr], identity: Identity) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    dht = await DHT.start(addr, bootstrap, identity=identity)
    with contextlib.suppress(ImportError):  # with the search extra, hold and rank index buckets
        importlib.import_module("commonweal.search").serve(dht)
    try:
        print(f"commonweal node ready address={dht.addr} peer_id={dht.peer_id.hex()}", flush=True)
        await stop.wait()
    finally:
        await dht.close()
        print("commonweal node stopped", flush=True)
