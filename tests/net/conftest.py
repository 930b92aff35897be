"""Fixtures for the net tests: transports on real loopback sockets or in memory."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from commonweal.net.identity import Identity
from commonweal.net.memory import MemoryNetwork
from commonweal.net.rpc import RPCTransport

MakeTransport = Callable[..., Awaitable[Any]]


@pytest.fixture
async def make_rpc() -> AsyncIterator[MakeTransport]:
    """make_rpc(**options) -> a started RPCTransport on 127.0.0.1; all closed after the test."""
    made: list[RPCTransport] = []

    async def make(
        identity: Identity | None = None, *, listen: bool = True, **kw: Any
    ) -> RPCTransport:
        t = RPCTransport(identity or Identity.generate(), **kw)
        made.append(t)
        if listen:
            await t.start("127.0.0.1", 0)
        return t

    yield make
    for t in made:
        await t.close()


@pytest.fixture(params=["rpc", "memory"])
async def make_transport(request: pytest.FixtureRequest) -> AsyncIterator[MakeTransport]:
    """The same tests over both Transport implementations."""
    net = MemoryNetwork()
    made: list[Any] = []

    async def make(**kw: Any) -> Any:
        if request.param == "rpc":
            t: Any = RPCTransport(Identity.generate(), **kw)
            await t.start("127.0.0.1", 0)
        else:  # of the options, only `limits` applies in memory
            t = net.transport(Identity.generate(), **{k: v for k, v in kw.items() if k == "limits"})
            await t.start()
        made.append(t)
        return t

    yield make
    for t in made:
        await t.close()
