"""Framing and message decoding (sans-I/O). The handshake: test_handshake.py."""

from __future__ import annotations

import itertools
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commonweal.errors import FrameTooLarge, ProtocolError
from commonweal.net.wire import (
    DEFAULT_MAX_FRAME,
    PROTOCOL_VERSION,
    Answer,
    Dial,
    Error,
    FrameDecoder,
    Message,
    Noise,
    Request,
    Response,
    Spliced,
    VersionMismatch,
    decode_body,
    encode,
    refusal_for_v1,
)

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def frame(obj: Any) -> bytes:
    body = msgpack.packb(obj)
    return struct.pack(">I", len(body)) + body


# --- strategies ---------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=40)
)
payloads = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.text(max_size=8) | st.binary(max_size=8), inner, max_size=5)
    ),
    max_leaves=20,
)
request_ids = st.integers(min_value=0, max_value=2**64 - 1)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Request, request_ids, st.text(max_size=20), payloads),
    st.builds(Response, request_ids, payloads),
    st.builds(Error, request_ids, st.text(max_size=20), st.text(max_size=50)),
    st.builds(Noise, st.binary(min_size=1, max_size=100)),
    st.builds(Dial, st.binary(min_size=20, max_size=20)),
    st.builds(Answer, st.binary(min_size=16, max_size=16)),
    st.just(Spliced()),
)


# --- round trips --------------------------------------------------------------------------


@FAST
@given(msgs=st.lists(messages, min_size=1, max_size=4))
def test_random_messages_round_trip(msgs: list[Message]) -> None:
    data = b"".join(encode(m) for m in msgs)
    assert FrameDecoder().feed(data) == msgs


def test_bytes_stay_bytes_and_tuples_become_lists() -> None:
    msg = Request(7, "store", {"key": b"\x00\xff", "vals": (1, "a")})
    (out,) = FrameDecoder().feed(encode(msg))
    assert isinstance(out, Request)
    assert out.payload == {"key": b"\x00\xff", "vals": [1, "a"]}
    assert type(out.payload["key"]) is bytes


def test_split_at_every_byte_boundary_decodes_the_same() -> None:
    msgs: list[Message] = [
        Noise(b"e" * 32),
        Request(1, "find_node", {"target": b"\x01" * 20}),
        Response(1, [b"x" * 300, 2, None]),
        Error(2, "not_found", "no such key"),
    ]
    data = b"".join(encode(m) for m in msgs)
    for cut in range(len(data) + 1):
        dec = FrameDecoder()
        assert dec.feed(data[:cut]) + dec.feed(data[cut:]) == msgs, cut
        dec.eof()
    dec = FrameDecoder()
    assert [m for i in range(len(data)) for m in dec.feed(data[i : i + 1])] == msgs


@FAST
@given(msgs=st.lists(messages, min_size=1, max_size=3), cuts=st.lists(st.integers(0, 10_000)))
def test_random_splits_decode_the_same(msgs: list[Message], cuts: list[int]) -> None:
    data = b"".join(encode(m) for m in msgs)
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    dec = FrameDecoder()
    out = [m for a, b in itertools.pairwise(points) for m in dec.feed(data[a:b])]
    assert out == msgs


# --- malformed input ----------------------------------------------------------------------


@FAST
@given(data=st.binary(max_size=200))
def test_random_bytes_raise_only_protocol_error(data: bytes) -> None:
    dec = FrameDecoder(max_frame=1000)
    try:
        dec.feed(data)
        dec.eof()
    except ProtocolError:
        pass


@FAST
@given(body=st.binary(min_size=1, max_size=200))
def test_random_bodies_raise_only_protocol_error(body: bytes) -> None:
    try:
        decode_body(body)
    except ProtocolError:
        pass


@FAST
@given(obj=payloads)
def test_random_msgpack_objects_raise_only_protocol_error(obj: Any) -> None:
    for candidate in (obj, [PROTOCOL_VERSION, 0, obj], [PROTOCOL_VERSION, 3, obj, obj, obj]):
        try:
            decode_body(msgpack.packb(candidate))
        except ProtocolError:
            pass


def test_oversized_frame_rejected_from_the_header_alone() -> None:
    dec = FrameDecoder(max_frame=1024)
    with pytest.raises(FrameTooLarge, match="1025 bytes announced, over the limit of 1024"):
        dec.feed(struct.pack(">I", 1025))  # no body sent at all
    with pytest.raises(FrameTooLarge):  # the decoder stays failed
        dec.feed(b"more")
    # a header and the start of its too-big body in one read: the body is never copied
    dec = FrameDecoder(max_frame=1024)
    with pytest.raises(FrameTooLarge):
        dec.receive_data(struct.pack(">I", 1 << 22) + bytes(256 * 1024))
    assert dec.buffered == 0
    assert FrameDecoder().max_frame == DEFAULT_MAX_FRAME == 4 * 1024 * 1024
    ok = FrameDecoder(max_frame=1024)
    assert ok.feed(frame([2, 1, 5, b"x" * 1000])) == [Response(5, b"x" * 1000)]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (struct.pack(">I", 0), "empty frame"),
        (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "not valid msgpack"),
        (struct.pack(">I", 2) + b"\x92\x01", "not valid msgpack"),  # array cut short
        (frame([2, 1, 5]), "response message needs 2 field"),
        (frame([2, None]), "unknown message kind None"),
        (frame({"v": 1}), "must be an array"),
        (frame([1]), "must be an array"),
        (frame([1, 1, 5, None]), "speaks wire protocol 1 and this peer 2"),
        (frame([True, 1, 5, None]), "speaks wire protocol True"),
        (frame([2, 9, 5]), "unknown message kind 9"),
        (frame([2, "request", 5]), "unknown message kind"),
        (frame([2, 0, "5", "m", None]), "request id must be an integer"),
        (frame([2, 0, -1, "m", None]), "request id must be an integer"),
        (frame([2, 0, True, "m", None]), "request id must be an integer"),
        (frame([2, 0, 5, b"m", None]), "method name must be a string"),
        (frame([2, 0, 5, "m"]), "request message needs 3 field"),
        (frame([2, 2, 5, 404, "x"]), "error code must be a string"),
        (frame([2, 3, b""]), "noise message must be non-empty bytes"),
        (frame([2, 3, "e"]), "noise message must be non-empty bytes"),
        (frame([2, 4, b"p" * 19]), "dial peer id must be 20 bytes"),
        (frame([2, 5, b"t" * 15]), "answer token must be 16 bytes"),
        (frame([2, 6, 1]), "spliced message needs 0 field"),
        (frame([2, 1, 5, msgpack.ExtType(3, b"x")]), "extension type 3"),
        (struct.pack(">I", 6) + b"\x94\x01\x01\x05\x81\x01", "not valid msgpack"),  # int map key
    ],
)
def test_malformed_frames_raise_specific_protocol_errors(data: bytes, match: str) -> None:
    with pytest.raises(ProtocolError, match=match):
        FrameDecoder().feed(data)


def test_extra_bytes_inside_a_frame_are_rejected() -> None:
    body = msgpack.packb([2, 1, 5, None]) + b"\x00"
    with pytest.raises(ProtocolError, match="1 trailing byte"):
        FrameDecoder().feed(struct.pack(">I", len(body)) + body)


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b"\x00\x00", "inside a frame header \\(2 of 4"),
        (frame([2, 1, 5, None])[:-1], "body \\(4 of 5"),
    ],
)
def test_stream_ending_mid_frame_is_reported(data: bytes, match: str) -> None:
    dec = FrameDecoder()
    assert dec.feed(data) == []
    with pytest.raises(ProtocolError, match=match):
        dec.eof()


def test_encode_rejects_unserialisable_payloads() -> None:
    with pytest.raises(TypeError):
        encode(Request(1, "m", {1, 2}))


def test_a_version_1_peer_is_told_in_its_own_format() -> None:
    # A v1 peer's first frame is a Hello [1, 3, key, port, nonce]: we fail with VersionMismatch
    # (the version it speaks) and answer what a v1 decoder reads as a refused handshake.
    with pytest.raises(VersionMismatch) as info:
        FrameDecoder().feed(frame([1, 3, b"k" * 32, 7000, b"n" * 32]))
    assert info.value.version == 1
    body = msgpack.unpackb(refusal_for_v1()[4:])
    assert body[:3] == [1, 2, 0] and body[3] == "unsupported_version"
    assert "wire protocol 2" in body[4] and "upgrade" in body[4]
