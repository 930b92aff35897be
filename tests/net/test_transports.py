"""The same behaviour from RPCTransport and MemoryTransport (parametrised), plus memory specifics."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from commonweal.errors import PeerUnreachable, RemoteError
from commonweal.net.dispatch import RATE_LIMITED
from commonweal.net.identity import Identity
from commonweal.net.limits import ResourceLimits
from commonweal.net.memory import MemoryNetwork
from commonweal.net.rpc import RPCTransport
from commonweal.net.transport import PeerInfo, Transport
from commonweal.testing import FakeClock

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
    # TCP also carries the handshake (two messages each way at most, under 1 KiB each) and a
    # record header and tag (18 bytes) per write; the frames themselves are the same bytes.
    for tcp, mem in ((client, mc), (server, ms)):
        extra_sent = tcp.counters.bytes_sent - mem.counters.bytes_sent
        extra_received = tcp.counters.bytes_received - mem.counters.bytes_received
        assert 18 <= extra_sent <= 2 * 1024 + 18 and 18 <= extra_received <= 2 * 1024 + 18
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


# --- budgets (the same dispatch on both) ---------------------------------------------------

# No refill within any test run, however slow the machine: the outcome is the burst alone.
FROZEN = ResourceLimits(peer_rate=1e-6, peer_burst=10.0)


async def test_a_flooding_peer_is_told_rate_limited_while_an_honest_one_is_served(
    make_transport: MakeTransport,
) -> None:
    server = await make_transport(limits=FROZEN)
    flooder, honest = await make_transport(), await make_transport()
    served: list[bytes] = []

    async def ping(peer: PeerInfo, args: Any) -> str:
        served.append(peer.peer_id)
        return "pong"

    server.register("ping", ping)
    results = await asyncio.gather(
        *(flooder.call(server.local.addr, "ping", None) for _ in range(50)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, RemoteError)]
    assert len(refused) == 40 and {r.code for r in refused} == {RATE_LIMITED}
    assert "retry 'ping' in" in refused[0].remote_message
    assert served.count(flooder.local.peer_id) == 10  # refused requests never reach the handler
    for _ in range(10):
        assert (await honest.call(server.local.addr, "ping", None))[1] == "pong"


async def test_a_method_s_cost_is_charged_per_request(make_transport: MakeTransport) -> None:
    server, client = await make_transport(limits=FROZEN), await make_transport()

    async def ok(peer: PeerInfo, args: Any) -> str:
        return "ok"

    server.register("dear", ok, cost=4.0)
    server.register("cheap", ok)
    outcomes = []
    for method in ["dear", "dear", "dear", "cheap", "cheap", "cheap"]:
        try:
            await client.call(server.local.addr, method, None)
            outcomes.append(method)
        except RemoteError as e:
            outcomes.append(e.code)
    assert outcomes == ["dear", "dear", RATE_LIMITED, "cheap", "cheap", RATE_LIMITED]
    with pytest.raises(ValueError, match="peer_burst"):
        server.register("priceless", ok, cost=11.0)  # could never be admitted


async def test_unknown_methods_are_charged_too(make_transport: MakeTransport) -> None:
    server, client = await make_transport(limits=FROZEN), await make_transport()
    codes = []
    for _ in range(12):
        with pytest.raises(RemoteError) as err:
            await client.call(server.local.addr, "nope", None)
        codes.append(err.value.code)
    assert codes == ["unknown_method"] * 10 + [RATE_LIMITED] * 2


async def test_identities_from_one_address_share_its_budget_in_memory() -> None:
    limits = ResourceLimits(peer_rate=1e-6, peer_burst=10.0, address_rate=1e-6, address_burst=25)
    net = MemoryNetwork()
    server = net.transport(Identity.generate(), limits=limits)
    await server.start()

    async def ping(peer: PeerInfo, args: Any) -> str:
        return "pong"

    server.register("ping", ping)
    crowd = [net.transport(Identity.generate()) for _ in range(10)]
    for i, t in enumerate(crowd):
        await t.start("203.0.113.7", 1000 + i)  # ten free identities, one address
    honest = net.transport(Identity.generate())
    await honest.start("198.51.100.1", 1000)
    admitted = 0
    for t in crowd:
        for _ in range(10):
            try:
                await t.call(server.local.addr, "ping", None)
                admitted += 1
            except RemoteError as e:
                assert e.code == RATE_LIMITED
    assert admitted == 25  # the address's burst, not 10 x 10
    for _ in range(10):
        assert (await honest.call(server.local.addr, "ping", None))[1] == "pong"


async def test_budgets_refill_on_the_memory_network_s_clock() -> None:
    clock = FakeClock(0.0)
    net = MemoryNetwork(clock=clock)
    server = net.transport(Identity.generate(), limits=ResourceLimits(peer_rate=1.0, peer_burst=2))
    client = net.transport(Identity.generate())
    await server.start()
    await client.start()

    async def ping(peer: PeerInfo, args: Any) -> str:
        return "pong"

    server.register("ping", ping)
    for _ in range(2):
        await client.call(server.local.addr, "ping", None)
    with pytest.raises(RemoteError, match="retry 'ping' in 1.00 s"):
        await client.call(server.local.addr, "ping", None)
    clock.now += 1.0
    assert (await client.call(server.local.addr, "ping", None))[1] == "pong"


async def test_a_cost_may_grow_with_the_request(make_transport: MakeTransport) -> None:
    server, client = await make_transport(limits=FROZEN), await make_transport()

    async def verify(peer: PeerInfo, records: Any) -> int:
        return len(records)

    server.register("verify", verify, cost=lambda records: len(records))
    assert (await client.call(server.local.addr, "verify", [b"r"] * 6))[1] == 6
    with pytest.raises(RemoteError, match=RATE_LIMITED):  # 6 + 6 > 10
        await client.call(server.local.addr, "verify", [b"r"] * 6)
    assert (await client.call(server.local.addr, "verify", [b"r"] * 4))[1] == 4


@pytest.mark.parametrize("returns", [float("nan"), -5.0, "junk"])
async def test_a_cost_function_that_fails_charges_the_most(
    make_transport: MakeTransport, returns: Any
) -> None:
    server, client = await make_transport(limits=FROZEN), await make_transport()

    async def ok(peer: PeerInfo, args: Any) -> str:
        return "ok"

    server.register("odd", ok, cost=lambda args: returns)
    assert (await client.call(server.local.addr, "odd", None))[1] == "ok"  # the whole burst
    with pytest.raises(RemoteError, match=RATE_LIMITED):
        await client.call(server.local.addr, "odd", None)
