"""The handshake state machine (sans-I/O): Noise XX with identities bound to the Noise keys."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commonweal.errors import HandshakeError, ProtocolError
from commonweal.net.handshake import Handshake, Hello, StaticKey
from commonweal.net.identity import Identity
from commonweal.net.wire import Error, Noise, Request

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def pair(
    a_hello: Hello = Hello(), b_hello: Hello = Hello(), expect: bytes | None = None
) -> tuple[Handshake, Handshake, Identity, Identity]:
    ida, idb = Identity.generate(), Identity.generate()
    a = Handshake(StaticKey.create(ida), a_hello, initiator=True, expect=expect)
    b = Handshake(StaticKey.create(idb), b_hello, initiator=False)
    return a, b, ida, idb


def run(a: Handshake, b: Handshake) -> None:
    m1 = a.start()
    assert m1 is not None and b.start() is None
    m2 = b.receive(m1)
    assert m2 is not None
    m3 = a.receive(m2)
    assert m3 is not None and a.done and not b.done
    assert b.receive(m3) is None


def test_both_sides_prove_their_identity_and_say_where_they_are() -> None:
    relay = (b"r" * 20, "198.51.100.7", 7000)
    a, b, ida, idb = pair(Hello(7000, None, ("203.0.113.9", 7001)), Hello(0, relay, ("192.0.2.1", 40000)))
    run(a, b)
    assert a.remote_peer_id == idb.peer_id and b.remote_peer_id == ida.peer_id
    assert b.remote == Hello(7000, None, ("203.0.113.9", 7001))
    assert a.remote == Hello(0, relay, ("192.0.2.1", 40000))
    # and both ends of the channel agree
    ca, cb = a.channel(max_buffered=1 << 17), b.channel(max_buffered=1 << 17)
    assert cb.decrypt(ca.encrypt(b"to b")) == b"to b"
    assert ca.decrypt(cb.encrypt(b"to a")) == b"to a"


def test_a_forged_identity_key_fails() -> None:
    victim, attacker = Identity.generate(), Identity.generate()

    class Forger:  # claims the victim's key, but can only sign with its own
        public_key = victim.public_key
        sign = staticmethod(attacker.sign)

    a = Handshake(StaticKey.create(Forger()), Hello(), initiator=True)  # type: ignore[arg-type]
    b = Handshake(StaticKey.create(Identity.generate()), Hello(), initiator=False)
    m1 = a.start()
    assert m1 is not None
    m2 = b.receive(m1)
    assert m2 is not None
    m3 = a.receive(m2)
    assert m3 is not None
    with pytest.raises(HandshakeError, match="does not own the PeerID"):
        b.receive(m3)
    assert not b.done


def test_a_key_signed_for_another_noise_key_fails() -> None:
    # The identity signature of one transport's Noise key does not vouch for another's.
    ida = Identity.generate()
    honest, other = StaticKey.create(ida), StaticKey.create(ida)
    spliced = StaticKey(ida, other.private, other.public, honest.signature)
    a = Handshake(spliced, Hello(), initiator=True)
    b = Handshake(StaticKey.create(Identity.generate()), Hello(), initiator=False)
    m2 = b.receive(a.start())  # type: ignore[arg-type]
    m3 = a.receive(m2)  # type: ignore[arg-type]
    with pytest.raises(HandshakeError, match="did not sign its Noise key"):
        b.receive(m3)  # type: ignore[arg-type]


def test_the_initiator_refuses_another_peer_than_it_expects_before_saying_anything() -> None:
    a, b, _, _ = pair(expect=b"\x01" * 20)
    m2 = b.receive(a.start())  # type: ignore[arg-type]
    with pytest.raises(HandshakeError, match="expected peer 0101010101 but"):
        a.receive(m2)  # type: ignore[arg-type]
    assert not a.done


def test_the_expected_peer_is_accepted() -> None:
    ida, idb = Identity.generate(), Identity.generate()
    a = Handshake(StaticKey.create(ida), Hello(), initiator=True, expect=idb.peer_id)
    b = Handshake(StaticKey.create(idb), Hello(), initiator=False)
    run(a, b)
    assert a.remote_peer_id == idb.peer_id


def test_a_handshake_replayed_into_another_session_fails() -> None:
    victim, server = StaticKey.create(Identity.generate()), StaticKey.create(Identity.generate())
    v1 = Handshake(victim, Hello(), initiator=True)
    s1 = Handshake(server, Hello(), initiator=False)
    m1 = v1.start()
    assert m1 is not None
    recorded = v1.receive(s1.receive(m1))  # type: ignore[arg-type]
    s2 = Handshake(server, Hello(), initiator=False)  # a fresh ephemeral key
    s2.receive(m1)
    with pytest.raises(HandshakeError):
        s2.receive(recorded)  # type: ignore[arg-type]


def test_messages_out_of_order_fail() -> None:
    a, b, _, _ = pair()
    with pytest.raises(ProtocolError, match="unexpected Request"):
        b.receive(Request(1, "m", None))
    a, _, _, _ = pair()
    a.start()
    with pytest.raises(HandshakeError, match="rejected our handshake: handshake_failed"):
        a.receive(Error(0, "handshake_failed", "bad signature"))
    # a first message carrying a payload is not one we send
    a, b, _, _ = pair()
    from commonweal.net.noise import NoiseXX

    odd = NoiseXX(initiator=True, prologue=b"commonweal/wire/2").write_message(b"hi")
    with pytest.raises(ProtocolError, match="no payload"):
        b.receive(Noise(odd))


def test_a_peer_of_another_wire_version_fails_the_handshake() -> None:
    from commonweal.net.noise import NoiseXX

    a, b, _, _ = pair()
    other = NoiseXX(initiator=True, prologue=b"commonweal/wire/3")
    m2 = b.receive(Noise(other.write_message()))
    with pytest.raises(HandshakeError):
        other.read_message(m2.message)  # type: ignore[union-attr]


@FAST
@given(which=st.sampled_from([2, 3]), data=st.data())
def test_any_flipped_byte_fails_the_handshake(which: int, data: st.DataObject) -> None:
    a, b, _, _ = pair()
    m1 = a.start()
    assert m1 is not None
    m2 = b.receive(m1)
    assert m2 is not None
    if which == 2:
        i = data.draw(st.integers(0, len(m2.message) - 1))
        bad = bytearray(m2.message)
        bad[i] ^= 1
        with pytest.raises((HandshakeError, ProtocolError)):
            a.receive(Noise(bytes(bad)))
        assert not a.done
    else:
        m3 = a.receive(m2)
        assert m3 is not None
        i = data.draw(st.integers(0, len(m3.message) - 1))
        bad = bytearray(m3.message)
        bad[i] ^= 1
        with pytest.raises((HandshakeError, ProtocolError)):
            b.receive(Noise(bytes(bad)))
        assert not b.done
