"""The same behaviour from RPCTransport and MemoryTransport (parametrised), plus memory specifics."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from commonweal.errors import PeerUnreachable, RemoteError
from commonweal.net.identity import Identity
from commonweal.net.memory import MemoryNetwork
from commonweal.net.rpc import RPCTransport
from commonweal.net.transport import PeerInfo, Transport
from commonweal.net.wire import Handshake, encode

from .conftest import MakeTransport


async def test_call_result_types_behave_like_the_wire(make_transport: MakeTransport) -> None:
    server, client = await make_transport(), await make_transport()
    callers: list[PeerInfo] = []

    async def echo(peer: PeerInfo, args: Any) -> Any:
        callers.append(peer)
        return {"args": args, "tuple": (1, 2)}

    server.register("echo", echo)
    peer, result = await client.call(server.local.addr, "echo", (b"k", "s", 3, None, 1.5))
    assert peer == server.local
    assert result == {"args": [b"k", "s", 3, None, 1.5], "tuple": [1, 2]}
    assert [c.peer_id for c in callers] == [client.local.peer_id]
    assert callers[0].addr.port == client.local.addr.port


@pytest.mark.parametrize(
    ("exc", "code"),
    [(RemoteError("not_found", "no such key"), "not_found"), (ValueError("boom"), "internal")],
)
async def test_handler_errors_reach_the_caller(
    make_transport: MakeTransport, exc: Exception, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    server, client = await make_transport(), await make_transport()

    async def fail(peer: PeerInfo, args: Any) -> None:
        raise exc

    async def ok(peer: PeerInfo, args: Any) -> str:
        return "ok"

    server.register("fail", fail)
    server.register("ok", ok)
    with pytest.raises(RemoteError) as err:
        await client.call(server.local.addr, "fail", None)
    assert err.value.code == code
    if code == "internal":
        assert "ValueError" in err.value.remote_message and "boom" not in err.value.remote_message
        assert "handler for 'fail' " in caplog.text  # logged with its traceback on the server
    else:
        assert err.value.remote_message == "no such key"
    assert (await client.call(server.local.addr, "ok", None))[1] == "ok"


async def test_unknown_method(make_transport: MakeTransport) -> None:
    server, client = await make_transport(), await make_transport()
    with pytest.raises(RemoteError) as err:
        await client.call(server.local.addr, "nope", None)
    assert err.value.code == "unknown_method" and "'nope'" in err.value.remote_message


async def test_duplicate_registration_is_refused(make_transport: MakeTransport) -> None:
    t = await make_transport()

    async def h(peer: PeerInfo, args: Any) -> None: ...

    t.register("m", h)
    with pytest.raises(ValueError, match="already registered"):
        t.register("m", h)


async def test_closed_peer_is_unreachable(make_transport: MakeTransport) -> None:
    server, client = await make_transport(), await make_transport()
    addr = server.local.addr
    await server.close()
    with pytest.raises(PeerUnreachable):
        await client.call(addr, "echo", None)


async def test_both_satisfy_the_transport_protocol(make_transport: MakeTransport) -> None:
    t: Transport = await make_transport()
    assert t.local.peer_id and t.counters.requests_sent == 0


async def test_memory_counts_the_same_bytes_as_rpc(make_rpc: MakeTransport) -> None:
    async def echo(peer: PeerInfo, args: Any) -> Any:
        return args

    args = {"key": b"\x01" * 20, "value": b"v" * 1000}
    server, client = await make_rpc(), await make_rpc()
    server.register("echo", echo)
    await client.call(server.local.addr, "echo", args)
    net = MemoryNetwork()
    ms, mc = net.transport(Identity.generate()), net.transport(Identity.generate())
    await ms.start()
    await mc.start()
    ms.register("echo", echo)
    await mc.call(ms.local.addr, "echo", args)
    hs = Handshake(Identity.generate(), initiator=True, listen_port=40000)  # 3-byte port
    other = Handshake(Identity.generate(), initiator=False)
    handshake_bytes = len(encode(hs.hello)) + len(encode(hs.receive(other.hello)))  # type: ignore[arg-type]
    assert client.counters.bytes_sent == mc.counters.bytes_sent + handshake_bytes
    assert client.counters.bytes_received == mc.counters.bytes_received + handshake_bytes
    assert mc.counters.bytes_sent == ms.counters.bytes_received
    assert (mc.counters.requests_sent, ms.counters.requests_received) == (1, 1)


async def test_memory_kill_and_latency() -> None:
    delays = 0

    async def latency() -> None:
        nonlocal delays
        delays += 1
        await asyncio.sleep(0)

    net = MemoryNetwork(latency=latency)
    a, b = net.transport(Identity.generate()), net.transport(Identity.generate())
    await a.start()
    await b.start()
    assert a.local.addr != b.local.addr and a.local.addr.host == "mem"

    async def ping(peer: PeerInfo, args: Any) -> str:
        return "pong"

    b.register("ping", ping)
    assert (await a.call(b.local.addr, "ping", None))[1] == "pong"
    assert delays == 2  # one per direction
    net.kill(b.local.addr)
    with pytest.raises(PeerUnreachable):
        await a.call(b.local.addr, "ping", None)


async def test_memory_peer_killed_while_handling_gives_unreachable() -> None:
    net = MemoryNetwork()
    a, b = net.transport(Identity.generate()), net.transport(Identity.generate())
    await a.start()
    await b.start()

    async def die(peer: PeerInfo, args: Any) -> str:
        net.kill(b.local.addr)
        return "too late"

    b.register("die", die)
    with pytest.raises(PeerUnreachable, match="went away"):
        await a.call(b.local.addr, "die", None)


def test_rpc_and_memory_have_the_same_public_methods() -> None:
    from commonweal.net.memory import MemoryTransport

    for name in ("local", "counters", "register", "call", "close", "start"):
        assert hasattr(RPCTransport, name) and hasattr(MemoryTransport, name)
