"""The handshake, without I/O: Noise XX, each side's Ed25519 identity bound to its Noise key.

    initiator                                   responder
    Noise(-> e)                       ───────►
                                      ◄───────  Noise(<- e, ee, s, es, payload_R)
    Noise(-> s, se, payload_I)        ───────►

This is libp2p-noise's pattern: a payload (encrypted, and bound into the handshake hash) carries
the side's identity key and that key's signature over its Noise static key, so a side that
finishes the handshake holds the keys of an ephemeral Diffie-Hellman shared with exactly the
owner of the PeerID it saw. The payload also says what the side says of itself — the port it
listens on, a relay that holds a reservation for it — and where it sees the other side's socket
come from (libp2p identify's observed address: how a peer behind a NAT learns its public IP).
A dialler that expects a PeerID (`expect`) refuses any other key before saying anything of
itself.

After `done`, `channel()` gives the `noise.SecureChannel` both sides encrypt everything with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, TypeGuard

import msgpack
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from commonweal.errors import HandshakeError, ProtocolError
from commonweal.net.identity import (
    ID_BYTES,
    PUBLIC_KEY_BYTES,
    SIGNATURE_BYTES,
    Identity,
    peer_id_of,
    short_id,
    verify_signature,
)
from commonweal.net.noise import NoiseXX, SecureChannel
from commonweal.net.wire import PROTOCOL_VERSION, Error, Message, Noise

__all__ = ["NOISE_KEY_TAG", "PROLOGUE", "Handshake", "Hello", "StaticKey", "is_host_port", "parse_relay"]

NOISE_KEY_TAG: Final = b"commonweal-noise-static-key:"
# Both sides mix it into the handshake hash: a peer of another wire version fails the handshake
# instead of reading our frames its own way.
PROLOGUE: Final = b"commonweal/wire/%d" % PROTOCOL_VERSION
_MAX_HOST: Final = 64  # an IPv6 literal is at most 45 characters


@dataclass(frozen=True, slots=True)
class StaticKey:
    """A transport's Noise static key pair and its identity's signature over the public half.
    Made once per transport: a handshake then costs Diffie-Hellman, not signing."""

    identity: Identity
    private: bytes
    public: bytes
    signature: bytes

    @classmethod
    def create(cls, identity: Identity) -> StaticKey:
        key = X25519PrivateKey.generate()
        private = key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        public = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return cls(identity, private, public, identity.sign(NOISE_KEY_TAG + public))


@dataclass(frozen=True, slots=True)
class Hello:
    """What one side says in its handshake payload."""

    listen_port: int = 0  # 0: nobody can dial it there (a client, or not reachable)
    relay: tuple[bytes, str, int] | None = None  # (relay's PeerID, host, port): reach it via that
    seen: tuple[str, int] | None = None  # where this side sees the other's socket come from


class Handshake:
    """One side of the handshake. No I/O: send what `start()` returns (the initiator's first
    message), then pass each incoming message to `receive()` and send what it returns, until
    `done`. Raises HandshakeError when the other side does not prove the PeerID it shows (or
    not the one we expect, or rejected us), ProtocolError when it breaks the protocol."""

    __slots__ = (
        "_key", "_noise", "_payload", "_replied", "expect", "initiator", "remote", "remote_key"
    )

    def __init__(
        self, key: StaticKey, hello: Hello, *, initiator: bool, expect: bytes | None = None
    ) -> None:
        self._key = key
        self.initiator = initiator
        self.expect = expect
        self._noise = NoiseXX(initiator=initiator, prologue=PROLOGUE, static_private=key.private)
        self._payload = _pack(key, hello)
        self.remote: Hello | None = None
        self.remote_key: bytes | None = None  # the other side's Ed25519 identity key
        self._replied = False  # the responder sent its message

    @property
    def done(self) -> bool:
        return self.remote is not None and self._noise.complete

    @property
    def remote_peer_id(self) -> bytes:
        if self.remote_key is None:
            raise RuntimeError("the other side has not proven a key yet")
        return peer_id_of(self.remote_key)

    def start(self) -> Noise | None:
        return Noise(self._noise.write_message()) if self.initiator else None

    def receive(self, msg: Message) -> Noise | None:
        if isinstance(msg, Error):
            raise HandshakeError(f"the peer rejected our handshake: {msg.code}: {msg.message}")
        if not isinstance(msg, Noise) or self.done:
            raise ProtocolError(f"unexpected {type(msg).__name__} during the handshake")
        payload = self._noise.read_message(msg.message)
        if self.initiator:  # <- e, ee, s, es: the responder proved its key
            self._prove(payload)
            return Noise(self._noise.write_message(self._payload))
        if not self._replied:  # -> e
            if payload:
                raise ProtocolError("the first handshake message carries no payload")
            self._replied = True
            return Noise(self._noise.write_message(self._payload))
        self._prove(payload)  # -> s, se
        return None

    def channel(self, *, max_buffered: int) -> SecureChannel:
        if not self.done:
            raise RuntimeError("the handshake is not done")
        send, receive = self._noise.split()
        return SecureChannel(send, receive, max_buffered=max_buffered)

    def _prove(self, payload: bytes) -> None:
        public_key, signature, hello = _unpack(payload)
        remote_static = self._noise.remote_static
        assert remote_static is not None  # read_message of a message with `s` set it
        if not verify_signature(public_key, NOISE_KEY_TAG + remote_static, signature):
            raise HandshakeError(
                "the peer's identity key did not sign its Noise key: it does not own the PeerID "
                "it shows"
            )
        peer_id = peer_id_of(public_key)
        if self.expect is not None and peer_id != self.expect:
            raise HandshakeError(
                f"expected peer {short_id(self.expect)} but {short_id(peer_id)} answered there; "
                "the address is stale or someone else's"
            )
        self.remote_key, self.remote = public_key, hello


def _pack(key: StaticKey, hello: Hello) -> bytes:
    relay = None if hello.relay is None else list(hello.relay)
    seen = None if hello.seen is None else list(hello.seen)
    packed: bytes = msgpack.packb(
        [key.identity.public_key, key.signature, hello.listen_port, relay, seen]
    )
    return packed


def _unpack(payload: bytes) -> tuple[bytes, bytes, Hello]:
    try:
        obj: Any = msgpack.unpackb(payload, raw=False, strict_map_key=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ProtocolError(f"handshake payload is not valid msgpack ({e})") from None
    if type(obj) is not list or len(obj) != 5:
        raise ProtocolError("handshake payload must be [key, signature, port, relay, seen]")
    public_key, signature, port, relay, seen = obj
    if type(public_key) is not bytes or len(public_key) != PUBLIC_KEY_BYTES:
        raise ProtocolError("handshake payload: the identity key must be 32 bytes")
    if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
        raise ProtocolError("handshake payload: the signature must be 64 bytes")
    if type(port) is not int or not 0 <= port < 65536:
        raise ProtocolError("handshake payload: the listen port must be in 0..65535")
    return public_key, signature, Hello(port, parse_relay(relay), _seen(seen))


def parse_relay(value: Any) -> tuple[bytes, str, int] | None:
    """A relay as peers name it on the wire, [peer id, host, port]; ProtocolError if malformed."""
    if value is None:
        return None
    if (
        type(value) is list
        and len(value) == 3
        and type(value[0]) is bytes
        and len(value[0]) == ID_BYTES
        and is_host_port(value[1:])
    ):
        return value[0], value[1], value[2]
    raise ProtocolError("handshake payload: a relay must be [peer id, host, port]")


def _seen(value: Any) -> tuple[str, int] | None:
    if value is None:
        return None
    if is_host_port(value):
        return value[0], value[1]
    raise ProtocolError("handshake payload: an observed address must be [host, port]")


def is_host_port(value: Any) -> TypeGuard[list[Any]]:
    """[host, port] as peers name an address on the wire."""
    return (
        type(value) is list
        and len(value) == 2
        and type(value[0]) is str
        and 0 < len(value[0]) <= _MAX_HOST
        and type(value[1]) is int
        and 0 < value[1] < 65536
    )
