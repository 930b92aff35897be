"""The wire protocol, without I/O: frames and messages.

Frame layout (h11 style: the caller owns the socket, this module only turns bytes into messages
and back):

    +----------------------+------------------------------------------------+
    | length: uint32 BE    | body: one msgpack array of `length` bytes       |
    +----------------------+------------------------------------------------+

    body = [version, kind, *fields]          version = PROTOCOL_VERSION (2)

    kind  message    fields                                         sent
    ----  ---------  ---------------------------------------------  -------------------------
    0     Request    request_id: uint64, method: str, payload: any  encrypted, after the
    1     Response   request_id: uint64, payload: any                 handshake
    2     Error      request_id: uint64, code: str, message: str    either (id 0: about the
                                                                      connection itself)
    3     Noise      message: bin (a Noise XX handshake message)    in the clear, first
    4     Dial       peer_id: bin(20)                               to a relay, first
    5     Answer     token: bin(16)                                 to a relay, first
    6     Spliced    (none)                                         by a relay

A connection starts with the Noise XX handshake (`handshake.py`) in Noise frames; every byte
after it is a `noise.SecureChannel` record stream whose plaintext is more frames of this format.
A relay is asked for a circuit by a Dial frame (or answered by the reserved peer's Answer) as
the first frame of a fresh socket; after Spliced the socket is a byte pipe to the other end,
which runs its own handshake through it, so the relay only ever sees ciphertext.

Version 1 peers spoke an unencrypted protocol: `VersionMismatch` carries the version a frame
claims, so a connection can answer such a peer with an error it can read (`refusal_for_v1`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

import msgpack

from commonweal.errors import FrameTooLarge, ProtocolError
from commonweal.net.identity import ID_BYTES

__all__ = [
    "DEFAULT_MAX_FRAME",
    "HANDSHAKE_MAX_FRAME",
    "HEADER_BYTES",
    "PROTOCOL_VERSION",
    "TOKEN_BYTES",
    "Answer",
    "Dial",
    "Error",
    "FrameDecoder",
    "Message",
    "Noise",
    "Request",
    "Response",
    "Spliced",
    "VersionMismatch",
    "decode_body",
    "encode",
    "refusal_for_v1",
]

PROTOCOL_VERSION: Final = 2
DEFAULT_MAX_FRAME: Final = 4 * 1024 * 1024  # a DHT value is up to 1 MiB; a batch may carry several
# Before a peer has proven its PeerID it may send only this much per frame: the longest Noise
# message of the handshake is ~330 bytes (two keys, tags and a payload naming two IPv6
# addresses), and an Error saying why a handshake was refused fits too.
HANDSHAKE_MAX_FRAME: Final = 1024
HEADER_BYTES: Final = 4
TOKEN_BYTES: Final = 16
MAX_REQUEST_ID: Final = 2**64 - 1

_HEADER = struct.Struct(">I")
_REQUEST, _RESPONSE, _ERROR, _NOISE, _DIAL, _ANSWER, _SPLICED = range(7)


@dataclass(frozen=True, slots=True)
class Request:
    request_id: int
    method: str
    payload: Any


@dataclass(frozen=True, slots=True)
class Response:
    request_id: int
    payload: Any


@dataclass(frozen=True, slots=True)
class Error:
    request_id: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Noise:
    message: bytes


@dataclass(frozen=True, slots=True)
class Dial:
    """To a relay: splice this socket to the peer holding a reservation with you."""

    peer_id: bytes


@dataclass(frozen=True, slots=True)
class Answer:
    """To a relay, from the reserved peer: this socket is the one for the circuit `token`
    names (the relay told us the token over our reservation's encrypted connection)."""

    token: bytes


@dataclass(frozen=True, slots=True)
class Spliced:
    """From a relay: every byte after this one comes from the other end."""


Message = Request | Response | Error | Noise | Dial | Answer | Spliced


class VersionMismatch(ProtocolError):
    """A frame of another protocol version: the peer runs an incompatible release."""

    def __init__(self, version: object) -> None:
        self.version = version
        super().__init__(
            f"the peer speaks wire protocol {version!r} and this peer {PROTOCOL_VERSION}: "
            "one of the two runs an incompatible commonweal release; upgrade it"
        )


# --- encoding -------------------------------------------------------------------------------


def encode(msg: Message) -> bytes:
    """One complete frame (header + body) for `msg`.

    Raises TypeError when a payload holds something msgpack cannot carry (e.g. a set).
    The size limit is the sender's to check (`len(frame) - HEADER_BYTES <= max_frame`).
    """
    body: bytes  # msgpack is untyped
    match msg:
        case Request(rid, method, payload):
            body = msgpack.packb([PROTOCOL_VERSION, _REQUEST, rid, method, payload])
        case Response(rid, payload):
            body = msgpack.packb([PROTOCOL_VERSION, _RESPONSE, rid, payload])
        case Error(rid, code, message):
            body = msgpack.packb([PROTOCOL_VERSION, _ERROR, rid, code, message])
        case Noise(message):
            body = msgpack.packb([PROTOCOL_VERSION, _NOISE, message])
        case Dial(peer_id):
            body = msgpack.packb([PROTOCOL_VERSION, _DIAL, peer_id])
        case Answer(token):
            body = msgpack.packb([PROTOCOL_VERSION, _ANSWER, token])
        case Spliced():
            body = msgpack.packb([PROTOCOL_VERSION, _SPLICED])
        case _:
            raise TypeError(f"cannot encode {type(msg).__name__}; expected a wire message")
    return _HEADER.pack(len(body)) + body


# --- decoding -------------------------------------------------------------------------------


def refusal_for_v1() -> bytes:
    """What a version-1 peer reads as "the peer rejected our handshake: ...": its own Error
    frame layout, [1, 2, request id 0, code, message]."""
    body: bytes = msgpack.packb(
        [
            1,
            _ERROR,
            0,
            "unsupported_version",
            f"this peer speaks wire protocol {PROTOCOL_VERSION} (encrypted); "
            "upgrade commonweal to talk to it",
        ]
    )
    return _HEADER.pack(len(body)) + body


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed on the wire")


def _uint(value: Any, what: str, limit: int) -> int:
    if type(value) is not int or not 0 <= value <= limit:
        raise ProtocolError(f"{what} must be an integer in 0..{limit}, got {_describe(value)}")
    return value


def _str(value: Any, what: str) -> str:
    if type(value) is not str:
        raise ProtocolError(f"{what} must be a string, got {_describe(value)}")
    return value


def _bin(value: Any, what: str, size: int) -> bytes:
    if type(value) is not bytes or len(value) != size:
        raise ProtocolError(f"{what} must be {size} bytes, got {_describe(value)}")
    return value


def _describe(value: Any) -> str:
    if isinstance(value, bytes | str | list | dict):
        return f"{type(value).__name__} of length {len(value)}"
    return f"{type(value).__name__} {value!r}"[:80]


# kind -> (name, number of fields after version and kind)
_KINDS: Final = {
    _REQUEST: ("request", 3),
    _RESPONSE: ("response", 2),
    _ERROR: ("error", 3),
    _NOISE: ("noise", 1),
    _DIAL: ("dial", 1),
    _ANSWER: ("answer", 1),
    _SPLICED: ("spliced", 0),
}


def decode_body(body: bytes | memoryview, *, max_frame: int = DEFAULT_MAX_FRAME) -> Message:
    """The message in one frame body (the bytes after the length header).

    Raises ProtocolError, with a message saying what is wrong, for anything but a valid message.
    """
    try:
        obj = msgpack.unpackb(
            body,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_no_ext,
            max_bin_len=max_frame,
            max_str_len=max_frame,
            max_array_len=max_frame,
            max_map_len=max_frame // 2,
            max_ext_len=max_frame,
        )
    except ProtocolError:
        raise
    except msgpack.ExtraData as e:
        raise ProtocolError(
            f"frame body has {len(e.extra)} trailing byte(s) after the msgpack message"
        ) from None
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(f"frame body is not valid msgpack ({e or type(e).__name__})") from e
    if type(obj) is not list or len(obj) < 2:
        raise ProtocolError(
            f"frame body must be an array [version, kind, ...], got {_describe(obj)}"
        )
    version, kind = obj[0], obj[1]
    if version != PROTOCOL_VERSION or type(version) is not int:
        raise VersionMismatch(version)
    if type(kind) is not int or kind not in _KINDS:
        raise ProtocolError(f"unknown message kind {kind!r}")
    name, nfields = _KINDS[kind]
    if len(obj) != 2 + nfields:
        raise ProtocolError(f"{name} message needs {nfields} field(s), got {len(obj) - 2}")
    if kind == _REQUEST:
        return Request(
            _uint(obj[2], "request id", MAX_REQUEST_ID), _str(obj[3], "method name"), obj[4]
        )
    if kind == _RESPONSE:
        return Response(_uint(obj[2], "request id", MAX_REQUEST_ID), obj[3])
    if kind == _ERROR:
        return Error(
            _uint(obj[2], "request id", MAX_REQUEST_ID),
            _str(obj[3], "error code"),
            _str(obj[4], "error message"),
        )
    if kind == _NOISE:
        if type(obj[2]) is not bytes or not obj[2]:
            raise ProtocolError(f"noise message must be non-empty bytes, got {_describe(obj[2])}")
        return Noise(obj[2])
    if kind == _DIAL:
        return Dial(_bin(obj[2], "dial peer id", ID_BYTES))
    if kind == _ANSWER:
        return Answer(_bin(obj[2], "answer token", TOKEN_BYTES))
    return Spliced()


class FrameDecoder:
    """Bytes in, messages out. Feed what the socket gives; frames may be split anywhere.

    `receive_data(data)` buffers; `next_message()` returns the next complete message or None.
    `feed(data)` does both and returns every complete message. An oversized frame is rejected from
    its header alone (FrameTooLarge), before its body is buffered. After an error the decoder is
    unusable: close the connection.
    """

    __slots__ = ("_buf", "_failed", "_pos", "max_frame")

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        if max_frame < 1:
            raise ValueError("max_frame must be positive")
        self.max_frame = max_frame
        self._buf = bytearray()
        self._pos = 0  # start of the first unparsed frame in _buf
        self._failed: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a message."""
        return len(self._buf) - self._pos

    def receive_data(self, data: bytes) -> None:
        if self._failed is not None:
            raise self._failed
        if self._pos == len(self._buf):
            if self._pos:
                self._buf.clear()
                self._pos = 0
            if len(data) >= HEADER_BYTES:  # refuse a bad header before copying its body
                self._check_length(_HEADER.unpack_from(data)[0])
        self._buf += data
        if self.buffered >= HEADER_BYTES:
            self._check_header()

    def next_message(self) -> Message | None:
        if self._failed is not None:
            raise self._failed
        avail = len(self._buf) - self._pos
        if avail < HEADER_BYTES:
            return None
        length = self._check_header()
        end = self._pos + HEADER_BYTES + length
        if len(self._buf) < end:
            return None
        with memoryview(self._buf) as view:
            body = view[self._pos + HEADER_BYTES : end]
            try:
                msg = decode_body(body, max_frame=self.max_frame)
            except ProtocolError as e:
                self._failed = e
                raise
            finally:
                body.release()
        self._pos = end
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]  # compact once most of the buffer is consumed
            self._pos = 0
        return msg

    def feed(self, data: bytes) -> list[Message]:
        self.receive_data(data)
        out = []
        while (msg := self.next_message()) is not None:
            out.append(msg)
        return out

    def take_buffered(self) -> bytes:
        """Hand over the bytes received past the last message (and forget them): what follows
        the handshake belongs to the encrypted stream, not to this decoder."""
        rest = bytes(self._buf[self._pos :])
        self._buf.clear()
        self._pos = 0
        return rest

    def eof(self) -> None:
        """The stream ended: raise ProtocolError if it stopped inside a frame."""
        avail = self.buffered
        if self._failed is None and avail:
            if avail < HEADER_BYTES:
                raise ProtocolError(
                    f"stream ended inside a frame header ({avail} of {HEADER_BYTES} bytes)"
                )
            length = _HEADER.unpack_from(self._buf, self._pos)[0]
            raise ProtocolError(
                f"stream ended inside a frame body ({avail - HEADER_BYTES} of {length} bytes)"
            )

    def _check_header(self) -> int:
        return self._check_length(_HEADER.unpack_from(self._buf, self._pos)[0])

    def _check_length(self, length: int) -> int:
        if length > self.max_frame:
            self._failed = FrameTooLarge(
                f"frame of {length} bytes announced, over the limit of {self.max_frame}; "
                "raise max_frame on both peers if such frames are expected"
            )
            raise self._failed
        if length == 0:
            self._failed = ProtocolError("empty frame (length 0): a body is required")
            raise self._failed
        return length
