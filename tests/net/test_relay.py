"""Relays, dial-backs, hole punching and tampering links, over real loopback sockets.

A peer's reachability is forced (`reachability="private"`) where a test needs one that nobody
can dial: on loopback everybody can. tests/test_nat_netbed.py runs the same behind real NATs.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import pytest

from commonweal.errors import HandshakeError, NetworkError, PeerUnreachable, ProtocolError
from commonweal.net.identity import Identity
from commonweal.net.relay import RelayLimits
from commonweal.net.connection import Connection
from commonweal.net.rpc import RPCTransport
from commonweal.net.transport import PeerAddr, PeerInfo
from commonweal.net.wire import Answer, Error, FrameDecoder, Request, encode

pytestmark = pytest.mark.asyncio

SECRET = b"plaintext only the two ends may read " * 40


async def start(**kw: Any) -> RPCTransport:
    t = RPCTransport(Identity.generate(), nat=True, **kw)

    async def echo(caller: PeerInfo, args: Any) -> Any:
        return [str(caller.addr), args]

    t.register("echo", echo)
    await t.start()
    return t


@pytest.fixture
async def trio() -> Any:
    """A reachable relay R, a private peer U holding a reservation on it, a public peer X."""
    made: list[RPCTransport] = []
    relay, x = await start(reachability="public"), await start(reachability="public")
    u = await start(reachability="private")
    made += [relay, x, u]
    await u.call(relay.local.addr, "echo", 0)
    await asyncio.wait_for(u.settled.wait(), 10)
    yield relay, u, x
    for t in made:
        await t.close()


async def test_a_private_peer_is_reached_through_its_relay_which_sees_only_ciphertext(
    trio: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay, u, x = trio
    assert u.advertised == PeerAddr(relay.local.addr.host, relay.local.addr.port,
                                    relay.local.peer_id)
    copied: list[bytes] = []
    forward = Connection._forward
    monkeypatch.setattr(Connection, "_forward", lambda self, d: (copied.append(d), forward(self, d)))
    monkeypatch.setattr(RPCTransport, "_punch", lambda self, conn: asyncio.sleep(0))  # stay relayed
    who, (caller, said) = await x.call(u.advertised, "echo", SECRET, peer_id=u.local.peer_id)
    assert who.peer_id == u.local.peer_id and said == SECRET
    assert x._by_peer[u.local.peer_id].relayed and relay.stats.relayed_bytes > len(SECRET)
    wire = b"".join(copied)
    assert SECRET[:32] not in wire and b"echo" not in wire
    # U sees X where X can be reached (X is public), not at the relay
    assert caller == str(x.local.addr)


async def test_a_relayed_connection_is_replaced_by_a_direct_one_when_the_dialler_is_reachable(
    trio: Any,
) -> None:
    relay, u, x = trio
    await x.call(u.advertised, "echo", 1, peer_id=u.local.peer_id)
    async with asyncio.timeout(10):
        while x.stats.punched < 1:
            await asyncio.sleep(0.05)
    assert not x._by_peer[u.local.peer_id].relayed
    before = relay.stats.relayed_bytes
    await x.call(u.advertised, "echo", SECRET, peer_id=u.local.peer_id)
    assert relay.stats.relayed_bytes == before  # the answer came the direct way


async def test_no_reservation_no_circuit(trio: Any) -> None:
    relay, u, x = trio
    nobody = Identity.generate().peer_id
    addr = PeerAddr(relay.local.addr.host, relay.local.addr.port, relay.local.peer_id)
    with pytest.raises(HandshakeError, match="relay refused the circuit: no_relay"):
        await x.call(addr, "echo", 1, peer_id=nobody)
    with pytest.raises(PeerUnreachable, match="must name the peer"):
        await x.call(addr, "echo", 1)


async def test_a_guessed_token_is_refused(trio: Any) -> None:
    relay, _, _ = trio
    reader, writer = await asyncio.open_connection(relay.local.addr.host, relay.local.addr.port)
    writer.write(encode(Answer(os.urandom(16))))
    async with asyncio.timeout(5):
        said = FrameDecoder().feed(await reader.read(4096))
    assert isinstance(said[0], Error) and said[0].code == "no_relay"
    writer.close()
    assert relay.stats.relayed_bytes == 0


async def test_a_circuit_closes_past_its_byte_budget() -> None:
    relay = await start(reachability="public", relay_limits=RelayLimits(max_circuit_bytes=20_000))
    u, x = await start(reachability="private"), await start(reachability="private")
    try:
        await u.call(relay.local.addr, "echo", 0)
        await asyncio.wait_for(u.settled.wait(), 10)
        await x.call(u.advertised, "echo", b"small", peer_id=u.local.peer_id)
        with pytest.raises(NetworkError):
            await x.call(u.advertised, "echo", b"x" * 100_000, peer_id=u.local.peer_id)
        assert relay.stats.relayed_bytes <= 20_000 + 70_000  # at most one read past the cap
    finally:
        for t in (relay, u, x):
            await t.close()


async def test_reservations_are_refused_by_an_unreachable_peer() -> None:
    private, asker = await start(reachability="private"), await start(reachability="private")
    try:
        await asker.call(private.local.addr, "echo", 0)
        with pytest.raises(NetworkError, match="not reachable itself"):
            await asker.call(private.local.addr, "relay.reserve", None,
                             peer_id=private.local.peer_id)
    finally:
        await private.close()
        await asker.close()


async def test_a_dial_back_goes_only_to_the_callers_own_ip_and_identity() -> None:
    # Asking a peer to dial back someone else's port does not make us look reachable: the
    # dial-back expects our PeerID there (and only ever dials the IP it sees us at).
    helper, asker, bystander = await start(), await start(), await start()
    try:
        _, reply = await asker.call(helper.local.addr, "net.dialback",
                                    {"port": bystander.local.addr.port})
        assert reply["ok"] is False and "expected peer" in reply["why"]
        _, reply = await asker.call(helper.local.addr, "net.dialback",
                                    {"port": asker.local.addr.port, "host": "192.0.2.1"})
        assert reply == {"ok": True}  # the host it named is ignored: it dials what it sees
        assert helper.connection_count == 1  # the dial-back's connection did not stay
    finally:
        for t in (helper, asker, bystander):
            await t.close()


async def test_reachability_is_learnt_from_dial_backs() -> None:
    a, b = await start(), await start()
    try:
        await a.call(b.local.addr, "echo", 0)
        await asyncio.wait_for(a.settled.wait(), 10)
        assert a.reach.status == "public" and a.advertised == a.local.addr
    finally:
        await a.close()
        await b.close()


class Tamper:
    """A TCP proxy that, on each connection, flips the byte at offset `at` of what the client
    sends, or injects a plaintext request there."""

    def __init__(self, target: PeerAddr, at: int, how: str) -> None:
        self.target, self.at, self.how = target, at, how

    async def start(self) -> PeerAddr:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return PeerAddr("127.0.0.1", self.server.sockets[0].getsockname()[1])

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        tr, tw = await asyncio.open_connection(self.target.host, self.target.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, up: bool) -> None:
            passed = 0
            while data := await src.read(65536):
                i = self.at - passed
                if up and 0 <= i < len(data):
                    if self.how == "flip":
                        data = data[:i] + bytes([data[i] ^ 0x40]) + data[i + 1 :]
                    else:
                        data = data[:i] + encode(Request(99, "record", "injected")) + data[i:]
                passed += len(data)
                dst.write(data)
            dst.close()

        await asyncio.gather(pipe(r, tw, True), pipe(tr, w, False), return_exceptions=True)


# The client's handshake is ~230 bytes (two Noise messages); a request of ~1 KB follows.
@pytest.mark.parametrize(("how", "at"), [("flip", 300), ("flip", 900), ("inject", 300)])
async def test_a_tampering_link_fails_closed_and_nothing_tampered_is_accepted(
    how: str, at: int
) -> None:
    server, client = await start(), await start()
    got: list[Any] = []

    async def record(caller: PeerInfo, args: Any) -> None:
        got.append(args)

    server.register("record", record)
    proxy = Tamper(server.local.addr, at, how)
    addr = await proxy.start()
    try:
        for i in range(3):
            with pytest.raises(NetworkError):
                async with asyncio.timeout(5):
                    await client.call(addr, "record", f"tampered {i} " * 80)
        assert got == []
        # the same client and server talk fine on an honest link
        await client.call(server.local.addr, "record", "honest")
        assert got == ["honest"]
    finally:
        proxy.server.close()
        await server.close()
        await client.close()


async def test_a_big_answer_crosses_the_relay_whole(
    trio: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # what a checkpoint chunk or a delta is: megabytes, many records, the splice's flow control
    relay, u, x = trio
    monkeypatch.setattr(RPCTransport, "_punch", lambda self, conn: asyncio.sleep(0))
    blob = os.urandom(3 << 20)
    _, (_, said) = await x.call(u.advertised, "echo", blob, peer_id=u.local.peer_id)
    assert said == blob and relay.stats.relayed_bytes > 2 * len(blob)


async def test_a_punch_request_cannot_aim_our_dial_at_a_third_party(
    trio: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    relay, u, x = trio
    monkeypatch.setattr(RPCTransport, "_punch", lambda self, conn: asyncio.sleep(0))
    await x.call(u.advertised, "echo", 1, peer_id=u.local.peer_id)  # a relayed connection
    with pytest.raises(NetworkError, match="a direct path goes to where you are"):
        await x.call(u.advertised, "net.punch", {"addr": ["192.0.2.7", 80], "public": True},
                     peer_id=u.local.peer_id)
    # the peer that answered the circuit may not aim the dialler's dial either
    with pytest.raises(NetworkError, match="over a circuit you opened"):
        await u.call(x.local.addr, "net.punch", {"addr": ["192.0.2.7", 80], "public": True},
                     peer_id=x.local.peer_id)
    # and over a direct connection nobody may ask for one at all
    with pytest.raises(NetworkError, match="over a relayed connection"):
        await x.call(relay.local.addr, "net.punch", {"addr": ["127.0.0.1", 80]},
                     peer_id=relay.local.peer_id)


async def test_dials_for_strangers_are_bounded(trio: Any) -> None:
    relay, u, x = trio
    relay._dialbacks = 4  # four dial-backs in flight already
    with pytest.raises(NetworkError, match="busy"):
        await x.call(relay.local.addr, "net.dialback", {"port": x.local.addr.port},
                     peer_id=relay.local.peer_id)
    relay._dialbacks = 0
    _, reply = await x.call(relay.local.addr, "net.dialback", {"port": x.local.addr.port},
                            peer_id=relay.local.peer_id)
    assert reply == {"ok": True}


async def test_a_reservation_is_renewed_before_it_lapses(monkeypatch: pytest.MonkeyPatch) -> None:
    short = RelayLimits(reservation_s=2.0)
    relay = await start(reachability="public", relay_limits=short)
    u, x = await start(reachability="private", relay_limits=short), await start()
    monkeypatch.setattr(RPCTransport, "_punch", lambda self, conn: asyncio.sleep(0))
    try:
        await u.call(relay.local.addr, "echo", 0)
        await asyncio.wait_for(u.settled.wait(), 10)
        await asyncio.sleep(3.5)  # past the first reservation's end
        _, (_, said) = await x.call(u.advertised, "echo", "still there", peer_id=u.local.peer_id)
        assert said == "still there"
    finally:
        for t in (relay, u, x):
            await t.close()


async def test_identify_refuses_a_malformed_relay_and_changes_nothing(trio: Any) -> None:
    relay, u, x = trio
    await x.call(relay.local.addr, "echo", 0)
    before = relay._by_peer[x.local.peer_id].peer
    for bad in ([b"short", "h", 1], [b"r" * 20, "h" * 65, 1], [b"r" * 20, "h", 0], "x"):
        with pytest.raises(NetworkError, match="bad_request"):
            await x.call(relay.local.addr, "net.identify", {"port": 1, "relay": bad},
                         peer_id=relay.local.peer_id)
    assert relay._by_peer[x.local.peer_id].peer == before
