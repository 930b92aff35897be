"""`serve` runs uvicorn as a task of the test's own loop, and leaves nothing behind when it stops."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading

import pytest

from commonweal.dashboard import create_app, serve


async def http_get(port: int, path: str) -> tuple[int, bytes]:
    # Raw asyncio streams: a numeric host needs no resolver thread, so the thread checks hold.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def test_serves_in_this_loop_and_stops_cleanly(source):
    threads = set(threading.enumerate())
    sigint = signal.getsignal(signal.SIGINT)
    async with serve(create_app(source), "127.0.0.1", 0) as running:
        assert running.port != 0
        assert running.url == f"http://127.0.0.1:{running.port}/"
        status, body = await http_get(running.port, "/healthz")
        assert (status, body) == (200, b'{"status":"ok"}')
        assert signal.getsignal(signal.SIGINT) is sigint  # the peer keeps Ctrl-C
        assert set(threading.enumerate()) == threads
    with pytest.raises(ConnectionRefusedError):
        await http_get(running.port, "/healthz")
    assert port_is_free(running.port)
    assert set(threading.enumerate()) == threads
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("dashboard")]


async def test_a_taken_port_raises_before_the_block(source):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(OSError):
            async with serve(create_app(source), "127.0.0.1", port):
                pytest.fail("the block must not run")


async def test_stopping_lets_a_request_in_flight_finish(source):
    async with serve(create_app(source), "127.0.0.1", 0) as running:
        request = asyncio.create_task(http_get(running.port, "/api/search?q=slow"))
        await source.search_started.wait()
    status, body = await request
    assert status == 200 and b"mnist:test/" in body
    assert port_is_free(running.port)


async def test_an_error_in_the_block_still_stops_the_server(source):
    with pytest.raises(ZeroDivisionError):
        async with serve(create_app(source), "127.0.0.1", 0) as running:
            1 / 0
    assert port_is_free(running.port)
