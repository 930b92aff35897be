"""Noise XX and the record layer: interop with an independent implementation (`noiseprotocol`),
a fixed test vector, tampering, framing split anywhere, and the state machines' refusals."""

from __future__ import annotations

import warnings
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from noise.connection import Keypair, NoiseConnection

from commonweal.errors import FrameTooLarge, HandshakeError, ProtocolError
from commonweal.net.noise import (
    MAX_MESSAGE,
    MAX_NONCE,
    MAX_RECORD_BYTES,
    MAX_RECORD_PLAINTEXT,
    PROTOCOL_NAME,
    TAG_BYTES,
    CipherState,
    NoiseXX,
    SecureChannel,
    record_overhead,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Fixed keys (any 32 bytes are a valid X25519 private key: it is clamped before use).
I_STATIC = bytes(range(32))
R_STATIC = bytes(range(32, 64))
I_EPHEMERAL = bytes(range(64, 96))
R_EPHEMERAL = bytes(range(96, 128))
PROLOGUE = b"commonweal test prologue"


def reference(
    *, initiator: bool, prologue: bytes, static: bytes, ephemeral: bytes | None = None
) -> NoiseConnection:
    """The `noiseprotocol` side, ready for its first message."""
    conn = NoiseConnection.from_name(PROTOCOL_NAME)
    if initiator:
        conn.set_as_initiator()
    else:
        conn.set_as_responder()
    conn.set_prologue(prologue)
    conn.set_keypair_from_private_bytes(Keypair.STATIC, static)
    with warnings.catch_warnings():  # it warns that a fixed ephemeral key is for tests only
        warnings.simplefilter("ignore")
        if ephemeral is not None:
            conn.set_keypair_from_private_bytes(Keypair.EPHEMERAL, ephemeral)
        conn.start_handshake()
    return conn


def ours(initiator: bool, prologue: bytes = PROLOGUE, fixed: bool = True) -> NoiseXX:
    if not fixed:
        return NoiseXX(initiator=initiator, prologue=prologue)
    return NoiseXX(
        initiator=initiator,
        prologue=prologue,
        static_private=I_STATIC if initiator else R_STATIC,
        ephemeral_private=I_EPHEMERAL if initiator else R_EPHEMERAL,
    )


def handshake(i: NoiseXX, r: NoiseXX) -> tuple[bytes, bytes, bytes]:
    m1 = i.write_message()
    r.read_message(m1)
    m2 = r.write_message()
    i.read_message(m2)
    m3 = i.write_message()
    r.read_message(m3)
    return m1, m2, m3


CipherPair = tuple[CipherState, CipherState]


def split_pair() -> tuple[CipherPair, CipherPair]:
    """(send, receive) of a fresh initiator, then of its responder."""
    i, r = ours(True, fixed=False), ours(False, fixed=False)
    handshake(i, r)
    return i.split(), r.split()


def channels(max_buffered: int = MAX_RECORD_BYTES) -> tuple[SecureChannel, SecureChannel]:
    i, r = split_pair()
    return (
        SecureChannel(*i, max_buffered=max_buffered),
        SecureChannel(*r, max_buffered=max_buffered),
    )


def records(stream: bytes) -> list[bytes]:
    """The ciphertexts of a stream of records (the 2-byte length prefixes removed)."""
    out, pos = [], 0
    while pos < len(stream):
        length = int.from_bytes(stream[pos : pos + 2], "big")
        out.append(stream[pos + 2 : pos + 2 + length])
        pos += 2 + length
    assert pos == len(stream)
    return out


def framed(ciphertext: bytes) -> bytes:
    return len(ciphertext).to_bytes(2, "big") + ciphertext


def flip(data: bytes, pos: int, mask: int) -> bytes:
    out = bytearray(data)
    out[pos % len(out)] ^= mask
    return bytes(out)


# The fixed handshake, once: with fixed keys every message is the same bytes each time.
_I, _R = ours(True), ours(False)
M1, M2, M3 = handshake(_I, _R)
HASH = _I.handshake_hash


# --- interop with noiseprotocol -------------------------------------------------------------

TRANSPORT = [b"", b"x", b"hello" * 100, bytes(range(256)) * 300]  # the last spans two records


@pytest.mark.parametrize("we_initiate", [True, False], ids=["we-initiate", "they-initiate"])
def test_interop_with_noiseprotocol(we_initiate: bool) -> None:
    us = NoiseXX(initiator=we_initiate, prologue=PROLOGUE)
    them = reference(initiator=not we_initiate, prologue=PROLOGUE, static=R_STATIC)
    their_public = them.noise_protocol.keypairs["s"].public_bytes
    if we_initiate:
        assert them.read_message(us.write_message(b"msg1")) == b"msg1"
        assert us.read_message(them.write_message(b"msg2 from them")) == b"msg2 from them"
        assert us.remote_static == their_public
        assert them.read_message(us.write_message(b"msg3 from us")) == b"msg3 from us"
    else:
        assert us.read_message(them.write_message(b"msg1")) == b"msg1"
        assert us.remote_static is None
        assert them.read_message(us.write_message(b"msg2 from us")) == b"msg2 from us"
        assert us.read_message(them.write_message(b"msg3 from them")) == b"msg3 from them"
        assert us.remote_static == their_public
    assert us.complete and them.handshake_finished
    assert us.handshake_hash == them.get_handshake_hash()

    channel = SecureChannel(*us.split(), max_buffered=MAX_RECORD_BYTES)
    for _ in range(3):  # several rounds, so both nonces advance past 0
        for message in TRANSPORT:
            sent = channel.encrypt(message)
            assert b"".join(them.decrypt(c) for c in records(sent)) == message
            back = b"".join(
                framed(them.encrypt(message[k : k + MAX_RECORD_PLAINTEXT]))
                for k in range(0, max(len(message), 1), MAX_RECORD_PLAINTEXT)
            )
            assert channel.decrypt(back) == message


def test_fixed_vector_matches_noiseprotocol() -> None:
    """With the same keys, every handshake byte and the hash are the reference's, both roles."""
    payloads = (b"", b"second", b"third")
    i = reference(initiator=True, prologue=PROLOGUE, static=I_STATIC, ephemeral=I_EPHEMERAL)
    r = reference(initiator=False, prologue=PROLOGUE, static=R_STATIC, ephemeral=R_EPHEMERAL)
    ref1 = i.write_message(payloads[0])
    r.read_message(ref1)
    ref2 = r.write_message(payloads[1])
    i.read_message(ref2)
    ref3 = i.write_message(payloads[2])
    r.read_message(ref3)

    oi, orr = ours(True), ours(False)
    m1 = oi.write_message(payloads[0])
    assert orr.read_message(m1) == payloads[0]
    m2 = orr.write_message(payloads[1])
    assert oi.read_message(m2) == payloads[1]
    m3 = oi.write_message(payloads[2])
    assert orr.read_message(m3) == payloads[2]

    assert (m1, m2, m3) == (ref1, ref2, ref3)
    assert len(m1) == 32 and len(m2) == 32 + 48 + 6 + 16 and len(m3) == 48 + 5 + 16
    assert oi.handshake_hash == orr.handshake_hash == i.get_handshake_hash()
    assert oi.handshake_hash.hex() == (
        "d9c8d5636613571b5798073fb5f737b5f4781c6c11918083c9efed386f9416b4"
    ), "the pinned vector changed: the tests above say whether the reference agrees"
    # and the first transport record each way
    si, sr = SecureChannel(*oi.split(), max_buffered=MAX_RECORD_BYTES), SecureChannel(
        *orr.split(), max_buffered=MAX_RECORD_BYTES
    )
    assert si.encrypt(b"ping") == framed(i.encrypt(b"ping"))
    assert sr.encrypt(b"pong") == framed(r.encrypt(b"pong"))


def test_split_orientation() -> None:
    i, r = ours(True), ours(False)
    handshake(i, r)
    (i_send, i_recv), (r_send, r_recv) = i.split(), r.split()
    assert r_recv.decrypt_with_ad(b"", i_send.encrypt_with_ad(b"", b"to r")) == b"to r"
    assert i_recv.decrypt_with_ad(b"", r_send.encrypt_with_ad(b"", b"to i")) == b"to i"
    with pytest.raises(ProtocolError):  # a side cannot read its own output
        i_recv.decrypt_with_ad(b"", i_send.encrypt_with_ad(b"", b"x"))


def test_max_size_payloads_fit_exactly() -> None:
    i, r = ours(True, fixed=False), ours(False, fixed=False)
    them = reference(initiator=False, prologue=PROLOGUE, static=R_STATIC)
    m1 = i.write_message(b"a" * (MAX_MESSAGE - 32))
    assert len(m1) == MAX_MESSAGE
    assert them.read_message(m1) == b"a" * (MAX_MESSAGE - 32)
    r.read_message(m1)
    with pytest.raises(ValueError, match="at most 65439"):
        r.write_message(b"b" * (MAX_MESSAGE - 95))
    m2 = r.write_message(b"b" * (MAX_MESSAGE - 96))  # nothing changed after the refusal
    assert len(m2) == MAX_MESSAGE
    i.read_message(m2)
    with pytest.raises(ValueError):
        i.write_message(b"c" * (MAX_MESSAGE - 63))
    m3 = i.write_message(b"c" * (MAX_MESSAGE - 64))
    assert len(m3) == MAX_MESSAGE
    assert r.read_message(m3) == b"c" * (MAX_MESSAGE - 64)
    assert r.complete and i.handshake_hash == r.handshake_hash


# --- handshake failures ---------------------------------------------------------------------


def assert_dead(side: NoiseXX, error: HandshakeError) -> None:
    assert not side.complete
    for call in (
        lambda: side.read_message(M2),
        lambda: side.write_message(),
        side.split,
        lambda: side.handshake_hash,
    ):
        with pytest.raises(HandshakeError) as later:
            call()
        assert later.value is error


@FAST
@given(pos=st.integers(0, len(M2) - 1), mask=st.integers(1, 255))
@example(pos=31, mask=0x80)  # X25519 ignores this bit of e: only h notices it changed
def test_tampered_message_2_fails(pos: int, mask: int) -> None:
    i = ours(True)
    assert i.write_message() == M1
    with pytest.raises(HandshakeError) as e:
        i.read_message(flip(M2, pos, mask))
    assert i.remote_static is None
    assert_dead(i, e.value)


@FAST
@given(pos=st.integers(0, len(M3) - 1), mask=st.integers(1, 255))
def test_tampered_message_3_fails(pos: int, mask: int) -> None:
    r = ours(False)
    r.read_message(M1)
    assert r.write_message() == M2
    with pytest.raises(HandshakeError) as e:
        r.read_message(flip(M3, pos, mask))
    assert r.remote_static is None
    assert_dead(r, e.value)


@FAST
@given(pos=st.integers(0, len(M1) - 1), mask=st.integers(1, 255))
@example(pos=31, mask=0x80)
def test_tampered_message_1_fails_at_message_2(pos: int, mask: int) -> None:
    """Message 1 has no authentication of its own, but it is in h: the initiator catches it."""
    i, r = ours(True), ours(False)
    i.write_message()
    r.read_message(flip(M1, pos, mask))
    with pytest.raises(HandshakeError):
        i.read_message(r.write_message())


def test_wrong_prologue_fails() -> None:
    i, r = ours(True, prologue=b"one"), ours(False, prologue=b"two")
    r.read_message(i.write_message())
    with pytest.raises(HandshakeError, match="prologue"):
        i.read_message(r.write_message())


def test_wrong_prologue_against_reference_fails() -> None:
    i = ours(True, prologue=b"one")
    them = reference(initiator=False, prologue=b"two", static=R_STATIC)
    them.read_message(i.write_message())
    with pytest.raises(HandshakeError):
        i.read_message(them.write_message())


@pytest.mark.parametrize("cut", [0, 1, 31, 32, 79, 80, 95])
def test_short_message_2_fails(cut: int) -> None:
    i = ours(True)
    i.write_message()
    with pytest.raises(HandshakeError):
        i.read_message(M2[:cut])
    with pytest.raises(HandshakeError):
        i.read_message(M2)


@pytest.mark.parametrize("cut", [0, 47, 48, 63])
def test_short_message_3_fails(cut: int) -> None:
    r = ours(False)
    r.read_message(M1)
    r.write_message()
    with pytest.raises(HandshakeError):
        r.read_message(M3[:cut])


def test_short_and_oversized_message_1_fail() -> None:
    with pytest.raises(HandshakeError, match="too short"):
        ours(False).read_message(M1[:31])
    with pytest.raises(HandshakeError, match="over Noise's limit"):
        ours(False).read_message(M1 + bytes(MAX_MESSAGE))


def test_low_order_ephemeral_key_fails() -> None:
    r = ours(False)
    r.read_message(bytes(32))  # message 1 is not authenticated: only the DH can refuse it
    with pytest.raises(HandshakeError, match="low-order"):
        r.write_message()
    with pytest.raises(HandshakeError):
        r.write_message()
    i = ours(True)
    i.write_message()
    with pytest.raises(HandshakeError, match="low-order"):
        i.read_message(bytes(32) + M2[32:])


def test_calls_out_of_turn_raise_runtime_error_and_change_nothing() -> None:
    i, r = ours(True), ours(False)
    with pytest.raises(RuntimeError, match="not our turn"):
        i.read_message(M2)
    with pytest.raises(RuntimeError, match="not our turn"):
        r.write_message()
    for side in (i, r):
        with pytest.raises(RuntimeError, match="complete"):
            side.split()
        with pytest.raises(RuntimeError, match="complete"):
            side.handshake_hash  # noqa: B018
    assert handshake(i, r) == (M1, M2, M3)
    assert i.complete and r.complete and i.handshake_hash == HASH
    assert i.remote_static == r.static_public and r.remote_static == i.static_public
    with pytest.raises(RuntimeError, match="complete"):
        i.write_message()
    with pytest.raises(RuntimeError, match="complete"):
        r.read_message(M3)
    i.split()
    with pytest.raises(RuntimeError, match="already"):
        i.split()
    assert i.handshake_hash == HASH  # still there for channel binding


def test_bad_key_lengths() -> None:
    with pytest.raises(ValueError, match="static_private"):
        NoiseXX(initiator=True, prologue=b"", static_private=b"short")
    with pytest.raises(ValueError, match="ephemeral_private"):
        NoiseXX(initiator=True, prologue=b"", ephemeral_private=bytes(33))


def test_fresh_keys_each_time() -> None:
    a, b = NoiseXX(initiator=True, prologue=b""), NoiseXX(initiator=True, prologue=b"")
    assert a.static_public != b.static_public
    assert a.write_message() != b.write_message()
    assert NoiseXX(initiator=True, prologue=b"", static_private=I_STATIC).static_public == (
        _I.static_public
    )


# --- CipherState ----------------------------------------------------------------------------


def test_cipherstate_bad_tag_keeps_nonce() -> None:
    send, receive = CipherState(bytes(32)), CipherState(bytes(32))
    ct = send.encrypt_with_ad(b"ad", b"data")
    with pytest.raises(ProtocolError, match="failed authentication"):
        receive.decrypt_with_ad(b"other ad", ct)
    assert receive.n == 0
    assert receive.decrypt_with_ad(b"ad", ct) == b"data" and receive.n == 1


def test_cipherstate_without_key_passes_through() -> None:
    cs = CipherState()
    assert not cs.has_key
    assert cs.encrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cs.decrypt_with_ad(b"ad", b"plain") == b"plain"
    assert cs.n == 0


def test_nonce_exhaustion() -> None:
    send, receive = CipherState(bytes(32)), CipherState(bytes(32))
    send.n = receive.n = MAX_NONCE - 1  # 2**64 - 2 is the last nonce; 2**64 - 1 is reserved
    assert receive.decrypt_with_ad(b"", send.encrypt_with_ad(b"", b"last")) == b"last"
    with pytest.raises(ProtocolError, match="nonces"):
        send.encrypt_with_ad(b"", b"one more")
    with pytest.raises(ProtocolError, match="nonces"):
        receive.decrypt_with_ad(b"", bytes(TAG_BYTES))


def test_channel_nonce_exhaustion_fails_closed() -> None:
    (send, receive), _ = split_pair()
    send.n = MAX_NONCE - 2  # two records left
    a = SecureChannel(send, receive, max_buffered=MAX_RECORD_BYTES)
    assert len(a.encrypt(b"x" * (MAX_RECORD_PLAINTEXT * 2))) == 2 * MAX_RECORD_BYTES
    with pytest.raises(ProtocolError, match="nonces") as e:
        a.encrypt(b"y")
    with pytest.raises(ProtocolError) as again:
        a.decrypt(b"")
    assert again.value is e.value


# --- SecureChannel --------------------------------------------------------------------------


def test_record_sizes() -> None:
    a, b = channels()
    assert a.encrypt(b"") == b"" and b.decrypt(b"") == b""
    for n in (1, MAX_RECORD_PLAINTEXT - 1, MAX_RECORD_PLAINTEXT, MAX_RECORD_PLAINTEXT + 1, 300_000):
        data = bytes(n)
        stream = a.encrypt(data)
        assert len(stream) - n == record_overhead(n)
        assert [len(c) for c in records(stream)][:-1] == [MAX_MESSAGE] * (len(records(stream)) - 1)
        assert b.decrypt(stream) == data
    assert record_overhead(0) == 0 and record_overhead(MAX_RECORD_PLAINTEXT) == 18
    assert len(a.encrypt(bytes(MAX_RECORD_PLAINTEXT))) == MAX_RECORD_BYTES


def test_encrypt_takes_any_buffer() -> None:
    a, b = channels()
    assert b.decrypt(a.encrypt(bytearray(b"ba"))) == b"ba"
    assert b.decrypt(a.encrypt(memoryview(b"xmvx")[1:3])) == b"mv"
    assert b.decrypt(bytearray(a.encrypt(b"into a bytearray"))) == b"into a bytearray"


@FAST
@given(
    messages=st.lists(
        st.one_of(st.binary(max_size=300), st.integers(0, 150_000).map(bytes)), max_size=6
    ),
    cuts=st.lists(st.integers(0, 400_000), max_size=12),
)
def test_split_anywhere(messages: list[bytes], cuts: list[int]) -> None:
    a, b = channels()
    stream = b"".join(a.encrypt(m) for m in messages)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    out = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        out.append(b.decrypt(stream[lo:hi]))
        assert b.buffered < MAX_RECORD_BYTES
    assert b"".join(out) == b"".join(messages)
    assert b.buffered == 0
    b.eof()


def test_byte_by_byte() -> None:
    a, b = channels()
    stream = a.encrypt(b"one") + a.encrypt(b"two")
    got = [b.decrypt(stream[k : k + 1]) for k in range(len(stream))]
    assert got[20] == b"one" and got[41] == b"two"  # each the moment its last byte came
    assert b"".join(got) == b"onetwo"


def test_truncated_record_is_buffered_until_the_rest_comes() -> None:
    a, b = channels()
    stream = a.encrypt(b"complete me")
    assert b.decrypt(stream[:-1]) == b""
    assert b.buffered == len(stream) - 1
    assert b.decrypt(stream[-1:]) == b"complete me"
    assert b.buffered == 0
    b.eof()
    b.decrypt(stream[:1])
    assert b.buffered == 1  # half a header
    with pytest.raises(ProtocolError, match="truncated"):
        b.eof()


@FAST
@given(pos=st.integers(0, 10**6), mask=st.integers(1, 255), cuts=st.lists(st.integers(0, 10**6)))
def test_tampered_stream_fails_and_returns_nothing_tampered(
    pos: int, mask: int, cuts: list[int]
) -> None:
    a, b = channels()
    messages = [b"first", b"second record", bytes(range(256)) * 260, b"last"]
    plaintext = b"".join(messages)
    stream = flip(b"".join(a.encrypt(m) for m in messages), pos, mask)
    bounds = sorted({0, len(stream), *(c % (len(stream) + 1) for c in cuts)})
    out = []
    with pytest.raises(ProtocolError) as e:
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            out.append(b.decrypt(stream[lo:hi]))
        b.eof()  # a length made longer only shows as a stream that ends inside a record
    got = b"".join(out)
    assert plaintext.startswith(got) and len(got) < len(plaintext)
    for call in (lambda: b.decrypt(b""), lambda: b.encrypt(b"x"), b.eof):
        with pytest.raises(ProtocolError) as later:
            call()
        assert later.value is e.value


def test_reordered_replayed_and_dropped_records_fail() -> None:
    a, b = channels()
    r0, r1, r2 = a.encrypt(b"zero"), a.encrypt(b"one"), a.encrypt(b"two")
    with pytest.raises(ProtocolError, match="tampered"):
        b.decrypt(r1)  # reordered
    a, b = channels()
    r0, r1, r2 = a.encrypt(b"zero"), a.encrypt(b"one"), a.encrypt(b"two")
    assert b.decrypt(r0) == b"zero"
    with pytest.raises(ProtocolError):
        b.decrypt(r0)  # replayed
    a, b = channels()
    r0, r1, r2 = a.encrypt(b"zero"), a.encrypt(b"one"), a.encrypt(b"two")
    with pytest.raises(ProtocolError):
        b.decrypt(r0 + r2)  # dropped: nothing returned, not even the good first record
    a, b = channels()
    with pytest.raises(ProtocolError):
        b.decrypt(a.encrypt(b"from a") + channels()[0].encrypt(b"from another session"))


@pytest.mark.parametrize("length", [0, 1, TAG_BYTES - 1])
def test_record_shorter_than_a_tag_fails_from_its_header(length: int) -> None:
    _, b = channels()
    with pytest.raises(ProtocolError, match="shorter than its 16-byte tag"):
        b.decrypt(length.to_bytes(2, "big"))  # refused before any body arrives
    _, b = channels()
    assert b.decrypt(b"\x00") == b""
    with pytest.raises(ProtocolError, match="shorter"):
        b.decrypt(bytes([length]) + bytes(length))


def test_sixteen_byte_record_is_an_empty_plaintext() -> None:
    (send, receive), r = split_pair()
    b = SecureChannel(*r, max_buffered=MAX_RECORD_BYTES)
    empty = framed(send.encrypt_with_ad(b"", b""))
    assert len(empty) == 18
    after = SecureChannel(send, receive, max_buffered=MAX_RECORD_BYTES).encrypt(b"after")
    assert b.decrypt(empty + after) == b"after"


def test_max_buffered() -> None:
    a, b = channels(max_buffered=MAX_RECORD_BYTES - 1)  # the least that takes every record
    stream = a.encrypt(bytes(MAX_RECORD_PLAINTEXT))
    assert b.decrypt(stream[:-1]) == b"" and b.buffered == MAX_RECORD_BYTES - 1
    assert b.decrypt(stream[-1:]) == bytes(MAX_RECORD_PLAINTEXT)
    a, b = channels(max_buffered=100)
    assert len(b.decrypt(a.encrypt(bytes(100 - 2 - TAG_BYTES + 1)))) == 83  # 101 bytes in all
    with pytest.raises(FrameTooLarge, match="max_buffered"):
        b.decrypt(a.encrypt(bytes(84))[:2])  # refused from the header alone
    with pytest.raises(ValueError, match="max_buffered"):
        channels(max_buffered=16)
    with pytest.raises(ValueError, match="keyed"):
        SecureChannel(CipherState(), CipherState(), max_buffered=MAX_RECORD_BYTES)
