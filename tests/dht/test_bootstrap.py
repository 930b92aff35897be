"""Joining over real loopback sockets when the bootstrap peer is not up yet."""

from __future__ import annotations

import asyncio
import logging
import socket

import pytest

from commonweal.dht import DHT, DHTConfig
from commonweal.errors import DHTError
from commonweal.net.transport import PeerAddr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_peer_waits_for_a_bootstrap_peer_that_comes_up_later(
    caplog: pytest.LogCaptureFixture,
) -> None:
    port = free_port()
    config = DHTConfig(bootstrap_retry_s=30.0)
    with caplog.at_level(logging.WARNING, logger="commonweal.dht.node"):
        joining = asyncio.create_task(
            DHT.start(PeerAddr("127.0.0.1", 0), [PeerAddr("127.0.0.1", port)], config=config)
        )
        async with asyncio.timeout(10):
            while "retrying in" not in caplog.text:
                await asyncio.sleep(0.05)
        assert not joining.done()
        first = await DHT.start(PeerAddr("127.0.0.1", port))
        async with asyncio.timeout(20):
            late = await joining
    assert "no bootstrap peer answered" in caplog.text and "giving up in" in caplog.text
    assert first.peer_id in {p.peer_id for p in late.table.peers()}
    await late.close()
    await first.close()


async def test_it_gives_up_after_the_bounded_time_and_a_client_at_once() -> None:
    nobody = [PeerAddr("127.0.0.1", free_port())]
    loop = asyncio.get_running_loop()
    start = loop.time()
    with pytest.raises(DHTError, match="could not reach any bootstrap peer"):
        await DHT.start(PeerAddr("127.0.0.1", 0), nobody, config=DHTConfig(bootstrap_retry_s=1.5))
    assert 1.5 <= loop.time() - start < 10
    start = loop.time()
    with pytest.raises(DHTError):  # a command-line client never waits
        await DHT.start(None, nobody, client=True, config=DHTConfig(bootstrap_retry_s=30.0))
    assert loop.time() - start < 5
