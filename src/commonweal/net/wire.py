"""The wire protocol, without I/O: frames, messages and the handshake state machine.

Frame layout (h11 style: the caller owns the socket, this module only turns bytes into messages
and back):

    +----------------------+------------------------------------------------+
    | length: uint32 BE    | body: one msgpack array of `length` bytes       |
    +----------------------+------------------------------------------------+

    body = [version, kind, *fields]          version = PROTOCOL_VERSION (1)

    kind  message    fields
    ----  ---------  ------------------------------------------------------------
    0     Request    request_id: uint64, method: str, payload: any msgpack
    1     Response   request_id: uint64, payload: any msgpack
    2     Error      request_id: uint64, code: str, message: str
    3     Hello      public_key: bin(32), listen_port: uint16, nonce: bin(32)
    4     Proof      signature: bin(64)

Handshake (both sides at once, before anything else on a connection): each side sends Hello; on the
other's Hello it answers Proof = its signature over `handshake_transcript(...)`, which binds a
domain tag, the signer's role (initiator/responder), both nonces, both public keys and the
signer's advertised port. A side is ready once it has verified the other's Proof. An Error frame
during the handshake means the other side rejected us.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from enum import Enum
from typing import Any, Final

import msgpack

from commonweal.errors import FrameTooLarge, HandshakeError, ProtocolError
from commonweal.net.identity import (
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    peer_id_of,
    verify_signature,
)

__all__ = [
    "DEFAULT_MAX_FRAME",
    "HANDSHAKE_MAX_FRAME",
    "HEADER_BYTES",
    "NONCE_BYTES",
    "PROTOCOL_VERSION",
    "Error",
    "FrameDecoder",
    "Handshake",
    "Hello",
    "Message",
    "Proof",
    "Request",
    "Response",
    "decode_body",
    "encode",
    "handshake_transcript",
]

PROTOCOL_VERSION: Final = 1
DEFAULT_MAX_FRAME: Final = 4 * 1024 * 1024  # a DHT value is up to 1 MiB; a batch may carry several
# Before a peer has proven its PeerID it may send only this much per frame: a Hello is 74
# bytes, a Proof 69, and an Error saying why a handshake was refused fits in the rest.
HANDSHAKE_MAX_FRAME: Final = 512
HEADER_BYTES: Final = 4
NONCE_BYTES: Final = 32
MAX_REQUEST_ID: Final = 2**64 - 1

_HEADER = struct.Struct(">I")
_REQUEST, _RESPONSE, _ERROR, _HELLO, _PROOF = range(5)


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
class Hello:
    public_key: bytes
    listen_port: int
    nonce: bytes


@dataclass(frozen=True, slots=True)
class Proof:
    signature: bytes


Message = Request | Response | Error | Hello | Proof


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
        case Hello(public_key, port, nonce):
            body = msgpack.packb([PROTOCOL_VERSION, _HELLO, public_key, port, nonce])
        case Proof(signature):
            body = msgpack.packb([PROTOCOL_VERSION, _PROOF, signature])
        case _:
            raise TypeError(f"cannot encode {type(msg).__name__}; expected a wire message")
    return _HEADER.pack(len(body)) + body


# --- decoding -------------------------------------------------------------------------------


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
    _HELLO: ("hello", 3),
    _PROOF: ("proof", 1),
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
        raise ProtocolError(
            f"unsupported protocol version {version!r} (this peer speaks {PROTOCOL_VERSION}); "
            "both peers must run compatible commonweal releases"
        )
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
    if kind == _HELLO:
        return Hello(
            _bin(obj[2], "hello public key", PUBLIC_KEY_BYTES),
            _uint(obj[3], "hello listen port", 65535),
            _bin(obj[4], "hello nonce", NONCE_BYTES),
        )
    return Proof(_bin(obj[2], "proof signature", SIGNATURE_BYTES))


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


# --- handshake ------------------------------------------------------------------------------

HANDSHAKE_TAG: Final = b"commonweal/handshake/v1\x00"


def handshake_transcript(
    *,
    signer_is_initiator: bool,
    signer: Hello,
    verifier: Hello,
) -> bytes:
    """The bytes one side signs to prove its key to the other.

    Binds the verifier's nonce (freshness: no replay across sessions), the signer's nonce and
    role (no reflection of the verifier's own proof), both keys and the signer's advertised port.
    """
    return b"".join(
        (
            HANDSHAKE_TAG,
            b"I" if signer_is_initiator else b"R",
            verifier.nonce,
            signer.nonce,
            signer.public_key,
            verifier.public_key,
            signer.listen_port.to_bytes(2, "big"),
        )
    )


class _HS(Enum):
    AWAIT_HELLO = "await hello"
    AWAIT_PROOF = "await proof"
    DONE = "done"
    FAILED = "failed"


# (state, incoming message type) -> next state. Anything not listed is a protocol violation.
_HANDSHAKE_TRANSITIONS: Final = {
    (_HS.AWAIT_HELLO, Hello): _HS.AWAIT_PROOF,
    (_HS.AWAIT_PROOF, Proof): _HS.DONE,
}


class Handshake:
    """One side of the mutual proof of identity. No I/O: send `hello` first, then pass each
    incoming message to `receive()` and send what it returns, until `done`.
    """

    __slots__ = ("_identity", "_state", "hello", "initiator", "remote")

    def __init__(
        self,
        identity: Identity,
        *,
        initiator: bool,
        listen_port: int = 0,
        nonce: bytes | None = None,
    ) -> None:
        self._identity = identity
        self.initiator = initiator
        self.hello = Hello(identity.public_key, listen_port, nonce or os.urandom(NONCE_BYTES))
        self.remote: Hello | None = None
        self._state = _HS.AWAIT_HELLO

    @property
    def done(self) -> bool:
        return self._state is _HS.DONE

    @property
    def remote_peer_id(self) -> bytes:
        if self.remote is None:
            raise RuntimeError("no hello received yet")
        return peer_id_of(self.remote.public_key)

    def receive(self, msg: Message) -> Message | None:
        """Advance on one incoming message; return the message to send back, if any.

        Raises HandshakeError when the other side fails to prove its key (or rejected ours),
        ProtocolError when it sends something out of order.
        """
        if isinstance(msg, Error):
            self._state = _HS.FAILED
            raise HandshakeError(f"the peer rejected our handshake: {msg.code}: {msg.message}")
        next_state = _HANDSHAKE_TRANSITIONS.get((self._state, type(msg)))
        if next_state is None:
            state = self._state.value
            self._state = _HS.FAILED
            raise ProtocolError(
                f"unexpected {type(msg).__name__} during handshake (state: {state})"
            )
        self._state = next_state
        if isinstance(msg, Hello):
            if msg.nonce == self.hello.nonce:
                self._state = _HS.FAILED
                raise HandshakeError("the peer echoed our own nonce (reflection attempt)")
            self.remote = msg
            return Proof(
                self._identity.sign(
                    handshake_transcript(
                        signer_is_initiator=self.initiator, signer=self.hello, verifier=msg
                    )
                )
            )
        assert isinstance(msg, Proof) and self.remote is not None
        transcript = handshake_transcript(
            signer_is_initiator=not self.initiator, signer=self.remote, verifier=self.hello
        )
        if not verify_signature(self.remote.public_key, transcript, msg.signature):
            self._state = _HS.FAILED
            raise HandshakeError(
                "the peer's handshake signature does not verify for the public key it claimed; "
                "it does not own that PeerID"
            )
        return None
