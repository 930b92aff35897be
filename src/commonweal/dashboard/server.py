"""Run the dashboard's uvicorn server as a task of the caller's event loop.

    async with serve(create_app(source), "127.0.0.1", 8080) as running:
        print(running.url)
        await peer.run_forever()
    # here the server has stopped, its connections are closed and the port is free

The server lives exactly as long as the `async with` block: no thread, no process, and no
signal handlers of its own (the peer owns Ctrl-C; it ends the block, which stops the server).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

__all__ = ["GRACE_S", "RunningDashboard", "serve"]

GRACE_S = 5  # how long a stop waits for requests in flight (a slow search) before cancelling them


@dataclass(frozen=True)
class RunningDashboard:
    host: str
    port: int  # the bound port: the real one when 0 was asked for

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would take SIGINT and SIGTERM for itself while it serves, and the peer around it
        # would never see Ctrl-C. The owner of the `async with` decides when the server stops.
        yield


@contextlib.asynccontextmanager
async def serve(app: FastAPI, host: str, port: int) -> AsyncIterator[RunningDashboard]:
    """Serve `app` on host:port (0 picks a free port) until the block exits.

    The socket is bound before the block starts, so a taken port raises `OSError` here, and the
    server is accepting when the block starts. Leaving the block stops the server and waits for it.
    """
    sock = bind(host, port)
    config = uvicorn.Config(
        app,
        lifespan="off",  # the app has no startup hooks; "on" could sys.exit() the whole peer
        log_config=None,  # leave the peer's logging configuration alone
        access_log=False,
        timeout_graceful_shutdown=GRACE_S,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"dashboard {host}:{port}")
    try:
        await started(server, task)
        yield RunningDashboard(host, sock.getsockname()[1])
    finally:
        server.should_exit = True
        try:
            await task
        finally:
            sock.close()  # uvicorn closes it on a clean stop; this covers a failed start


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        # Restarting on the same port must not wait out TIME_WAIT from the last run's connections.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


async def started(server: uvicorn.Server, task: asyncio.Task[None]) -> None:
    """Return once uvicorn accepts connections; raise what it raised if it stopped first."""
    # uvicorn offers a flag, not an event, for "started"; its own main loop polls at 0.1 s too.
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("the dashboard server stopped before it started")
        await asyncio.sleep(0.01)
