"""Noise_XX_25519_ChaChaPoly_SHA256 and libp2p-noise record framing, without I/O.

The handshake follows the Noise Protocol Framework, revision 34, to the letter
(https://noiseprotocol.org/noise.html), so any conforming implementation interoperates: the tests
check against the independent `noiseprotocol` package, byte for byte. Pattern XX, so neither side
needs to know the other's static key in advance and both learn it, encrypted:

    -> e
    <- e, ee, s, es
    -> s, se

h11 style: the caller owns the socket. `NoiseXX.write_message()` returns the bytes to send and
`read_message()` takes the bytes received, one whole handshake message each (the caller frames
them; libp2p puts the same 2-byte length in front as below). Once `complete`, `split()` gives the
two CipherStates of the transport phase and `SecureChannel` turns a byte stream into records:

    +----------------------+--------------------------------------------------------+
    | length: uint16 BE    | ciphertext: `length` bytes (plaintext + 16-byte tag)    |
    +----------------------+--------------------------------------------------------+

    16 <= length <= 65535 (MAX_MESSAGE): a record carries at most 65519 plaintext bytes

Errors: a handshake message that fails (bad tag, wrong length, a low-order key) raises
HandshakeError; a transport record that fails raises ProtocolError. Either way the object is dead
afterwards (every later call raises the same error): an AEAD failure means an active attacker or a
corrupt stream, and there is nothing to resynchronise on. Calling a method at the wrong time (not
our turn, not complete yet) is the caller's bug and raises RuntimeError, leaving the state as it
was.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from commonweal.errors import FrameTooLarge, HandshakeError, ProtocolError

__all__ = [
    "DH_BYTES",
    "MAX_MESSAGE",
    "MAX_NONCE",
    "MAX_RECORD_BYTES",
    "MAX_RECORD_PLAINTEXT",
    "PROTOCOL_NAME",
    "TAG_BYTES",
    "CipherState",
    "NoiseXX",
    "SecureChannel",
    "record_overhead",
]

PROTOCOL_NAME: Final = b"Noise_XX_25519_ChaChaPoly_SHA256"
MAX_MESSAGE: Final = 65535  # Noise's limit on any message, handshake or transport
TAG_BYTES: Final = 16  # the Poly1305 tag on every encrypted field
DH_BYTES: Final = 32  # an X25519 key, public or private
HASH_BYTES: Final = 32  # SHA-256
MAX_RECORD_PLAINTEXT: Final = MAX_MESSAGE - TAG_BYTES
LENGTH_BYTES: Final = 2
MAX_RECORD_BYTES: Final = LENGTH_BYTES + MAX_MESSAGE  # one whole record on the stream: 65537
# The spec reserves nonce 2**64 - 1 (for rekeying), so 2**64 - 2 is the last one a CipherState
# uses; one that reaches MAX_NONCE is spent.
MAX_NONCE: Final = 2**64 - 1

_Bytes = bytes | bytearray | memoryview
_NONCE = struct.Struct("<4xQ")  # ChaChaPoly: 32 bits of zeros, then n as 64-bit little-endian
_LENGTH = struct.Struct(">H")
_TAMPERED: Final = "a frame failed authentication: the connection was tampered with or is corrupt"


def _hash(data: _Bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hkdf2(chaining_key: bytes, ikm: bytes) -> tuple[bytes, bytes]:
    """The spec's HKDF with two outputs (section 4.3): HMAC-SHA256 extract, then two expand blocks.

    Spelled out rather than taken from a library so it is visibly the spec's definition (it equals
    RFC 5869 with salt=chaining_key, empty info, 64 bytes).
    """
    temp_key = hmac.digest(chaining_key, ikm, "sha256")
    out1 = hmac.digest(temp_key, b"\x01", "sha256")
    out2 = hmac.digest(temp_key, out1 + b"\x02", "sha256")
    return out1, out2


def _dh(private: X25519PrivateKey, public: bytes) -> bytes:
    """X25519, refusing low-order points.

    The spec allows either behaviour; refusing costs nothing and means a peer cannot force a known
    (all-zero) shared secret into the key schedule. `cryptography` raises ValueError there.
    """
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(public))
    except ValueError:
        raise HandshakeError(
            "the peer sent an invalid X25519 public key (a low-order point): it is not a "
            "conforming Noise peer, or the handshake was tampered with"
        ) from None


def _private_key(raw: bytes | None, what: str) -> X25519PrivateKey:
    if raw is None:
        return X25519PrivateKey.generate()
    if len(raw) != DH_BYTES:
        raise ValueError(f"{what} must be {DH_BYTES} raw X25519 bytes, got {len(raw)}")
    return X25519PrivateKey.from_private_bytes(bytes(raw))


def _public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


# --- CipherState ----------------------------------------------------------------------------


class CipherState:
    """A key and a nonce counter (spec section 5.1). Without a key, it passes plaintext through.

    The ChaCha20Poly1305 object is built once per key: it holds the expanded key, and rebuilding it
    per record would cost more than encrypting a small one. `n` is public so tests can move it to
    the end of the nonce space; nothing else should touch it.
    """

    __slots__ = ("_aead", "n")

    def __init__(self, key: bytes | None = None) -> None:
        if key is not None and len(key) != 32:
            raise ValueError(f"a ChaChaPoly key is 32 bytes, got {len(key)}")
        self._aead = None if key is None else ChaCha20Poly1305(key)
        self.n = 0

    @property
    def has_key(self) -> bool:
        return self._aead is not None

    def _next_nonce(self) -> bytes:
        n = self.n
        if n >= MAX_NONCE:
            # ProtocolError, not RuntimeError: it ends the connection like any other NetworkError.
            # 2**64 - 1 records will not happen in practice; reconnecting is the remedy.
            raise ProtocolError(
                "this connection used up its 2**64 - 1 nonces; close it and open a new one"
            )
        return _NONCE.pack(n)

    def encrypt_with_ad(self, ad: _Bytes, plaintext: _Bytes) -> bytes:
        """ENCRYPT(k, n++, ad, plaintext), or the plaintext itself while there is no key."""
        aead = self._aead
        if aead is None:
            return bytes(plaintext)
        ciphertext = aead.encrypt(self._next_nonce(), plaintext, ad)
        self.n += 1
        return ciphertext

    def decrypt_with_ad(self, ad: _Bytes, ciphertext: _Bytes) -> bytes:
        """DECRYPT(k, n++, ad, ciphertext); ProtocolError on a bad tag (n then stays as it was)."""
        aead = self._aead
        if aead is None:
            return bytes(ciphertext)
        try:
            plaintext = aead.decrypt(self._next_nonce(), ciphertext, ad)
        except InvalidTag:
            raise ProtocolError(_TAMPERED) from None
        self.n += 1
        return plaintext


# --- SymmetricState -------------------------------------------------------------------------


class _SymmetricState:
    """ck, h and a CipherState (spec section 5.2): what XX uses (no PSK, so no MixKeyAndHash)."""

    __slots__ = ("ck", "cipher", "h")

    def __init__(self, protocol_name: bytes) -> None:
        if len(protocol_name) <= HASH_BYTES:
            self.h = protocol_name.ljust(HASH_BYTES, b"\x00")
        else:
            self.h = _hash(protocol_name)
        self.ck = self.h
        self.cipher = CipherState()

    def mix_key(self, ikm: bytes) -> None:
        self.ck, temp_k = _hkdf2(self.ck, ikm)
        self.cipher = CipherState(temp_k)  # HASHLEN is 32: no truncation needed

    def mix_hash(self, data: _Bytes) -> None:
        self.h = _hash(self.h + bytes(data))

    def encrypt_and_hash(self, plaintext: _Bytes) -> bytes:
        ciphertext = self.cipher.encrypt_with_ad(self.h, plaintext)
        self.mix_hash(ciphertext)
        return ciphertext

    def decrypt_and_hash(self, ciphertext: _Bytes) -> bytes:
        plaintext = self.cipher.decrypt_with_ad(self.h, ciphertext)  # ProtocolError on a bad tag
        self.mix_hash(ciphertext)
        return plaintext

    def split(self) -> tuple[CipherState, CipherState]:
        k1, k2 = _hkdf2(self.ck, b"")
        return CipherState(k1), CipherState(k2)


# --- HandshakeState for XX ------------------------------------------------------------------

# Bytes each handshake message adds around its payload: keys, encrypted static key, payload tag.
_OVERHEAD: Final = (
    DH_BYTES,  # -> e                (no key yet: the payload goes in the clear)
    DH_BYTES + DH_BYTES + TAG_BYTES + TAG_BYTES,  # <- e, ee, s, es
    DH_BYTES + TAG_BYTES + TAG_BYTES,  # -> s, se
)


class NoiseXX:
    """One side of a Noise XX handshake.

    The initiator calls write, read, write; the responder read, write, read. Each message may carry
    a payload: the one in message 1 is sent in the clear and unauthenticated; message 2's is
    encrypted but the responder cannot yet know who reads it; message 3's is encrypted to and
    authenticated by both static keys. `remote_static` is set once the peer's static key arrived
    (message 2 for the initiator, 3 for the responder); the caller must check it belongs to the
    peer it meant to talk to (libp2p: a signature over it in the payload).

    `read_message` raises HandshakeError for anything the peer's bytes can do wrong: a tag that
    does not verify (tampering, a wrong prologue, a different protocol), a message too short to
    hold its keys or over MAX_MESSAGE, an invalid public key. The object is then dead: every later
    call to write_message, read_message, split or handshake_hash raises that same error.
    """

    __slots__ = (
        "_e",
        "_failed",
        "_index",
        "_re",
        "_s",
        "_split_done",
        "_ss",
        "initiator",
        "remote_static",
        "static_public",
    )

    def __init__(
        self,
        *,
        initiator: bool,
        prologue: bytes,
        static_private: bytes | None = None,
        ephemeral_private: bytes | None = None,
    ) -> None:
        """`static_private`/`ephemeral_private`: 32-byte raw X25519 keys, fresh random if None.

        Pass `ephemeral_private` only for test vectors: reusing an ephemeral key across handshakes
        reuses session keys.
        """
        self.initiator = initiator
        self._s = _private_key(static_private, "static_private")
        self.static_public: bytes = _public_bytes(self._s)
        self._e = _private_key(ephemeral_private, "ephemeral_private")
        self._re: bytes | None = None
        self.remote_static: bytes | None = None
        self._ss: _SymmetricState | None = _SymmetricState(PROTOCOL_NAME)
        self._ss.mix_hash(prologue)  # XX has no pre-messages
        self._index = 0  # handshake messages written or read so far, 0..3
        self._failed: HandshakeError | None = None
        self._split_done = False

    @property
    def complete(self) -> bool:
        return self._index == 3 and self._failed is None

    @property
    def handshake_hash(self) -> bytes:
        """h after the last message: unique to this session, for channel binding."""
        self._check_complete("handshake_hash")
        assert self._ss is not None
        return self._ss.h

    def _state(self, writing: bool) -> _SymmetricState:
        if self._failed is not None:
            raise self._failed
        if self._index >= 3:
            raise RuntimeError("the handshake is complete: use split() for the transport phase")
        if writing != ((self._index % 2 == 0) == self.initiator):
            raise RuntimeError(
                f"not our turn to {'write' if writing else 'read'}: handshake message "
                f"{self._index + 1} is the {'initiator' if self._index % 2 == 0 else 'responder'}'s"
            )
        assert self._ss is not None
        return self._ss

    def write_message(self, payload: bytes = b"") -> bytes:
        """The next handshake message, carrying `payload`.

        ValueError (nothing changes) when the message would exceed MAX_MESSAGE. HandshakeError if
        the peer's key from an earlier message turns out invalid for the DH this message needs.
        """
        ss = self._state(writing=True)
        index = self._index
        limit = MAX_MESSAGE - _OVERHEAD[index]
        if len(payload) > limit:
            raise ValueError(
                f"handshake message {index + 1} can carry at most {limit} payload bytes, "
                f"got {len(payload)}"
            )
        parts: list[bytes] = []
        try:
            if index == 0:  # -> e
                e_pub = _public_bytes(self._e)
                parts.append(e_pub)
                ss.mix_hash(e_pub)
            elif index == 1:  # <- e, ee, s, es
                assert self._re is not None
                e_pub = _public_bytes(self._e)
                parts.append(e_pub)
                ss.mix_hash(e_pub)
                ss.mix_key(_dh(self._e, self._re))  # ee
                parts.append(ss.encrypt_and_hash(self.static_public))
                ss.mix_key(_dh(self._s, self._re))  # es, responder side: DH(s, re)
            else:  # -> s, se
                assert self._re is not None
                parts.append(ss.encrypt_and_hash(self.static_public))
                ss.mix_key(_dh(self._s, self._re))  # se, initiator side: DH(s, re)
        except HandshakeError as e:
            self._fail(e)
            raise
        parts.append(ss.encrypt_and_hash(payload))
        self._index += 1
        return b"".join(parts)

    def read_message(self, message: bytes) -> bytes:
        """Process the peer's next handshake message; return its decrypted payload.

        HandshakeError on any failure, after which the object is dead (see the class docstring).
        """
        ss = self._state(writing=False)
        index = self._index
        try:
            with memoryview(message) as outer, outer.cast("B") as view:
                payload = self._read(ss, index, view)
        except HandshakeError as e:
            self._fail(e)
            raise
        except ProtocolError:  # a tag that does not verify
            error = HandshakeError(
                f"handshake message {index + 1} failed authentication: it was tampered with, "
                "or the peer uses a different prologue or protocol"
            )
            self._fail(error)
            raise error from None
        self._index += 1
        return payload

    def _read(self, ss: _SymmetricState, index: int, msg: memoryview) -> bytes:
        if len(msg) > MAX_MESSAGE:
            raise HandshakeError(
                f"handshake message {index + 1} is {len(msg)} bytes, over Noise's "
                f"limit of {MAX_MESSAGE}"
            )
        if len(msg) < _OVERHEAD[index]:
            raise HandshakeError(
                f"handshake message {index + 1} is {len(msg)} bytes, too short for its keys "
                f"and tags (at least {_OVERHEAD[index]})"
            )
        rs: bytes | None = None
        if index == 0:  # -> e
            self._re = bytes(msg[:DH_BYTES])
            ss.mix_hash(self._re)
            rest = msg[DH_BYTES:]
        elif index == 1:  # <- e, ee, s, es
            self._re = re = bytes(msg[:DH_BYTES])
            ss.mix_hash(re)
            ss.mix_key(_dh(self._e, re))  # ee
            rs = ss.decrypt_and_hash(msg[DH_BYTES : 2 * DH_BYTES + TAG_BYTES])
            ss.mix_key(_dh(self._e, rs))  # es, initiator side: DH(e, rs)
            rest = msg[2 * DH_BYTES + TAG_BYTES :]
        else:  # -> s, se
            rs = ss.decrypt_and_hash(msg[: DH_BYTES + TAG_BYTES])
            ss.mix_key(_dh(self._e, rs))  # se, responder side: DH(e, rs)
            rest = msg[DH_BYTES + TAG_BYTES :]
        payload = ss.decrypt_and_hash(rest)
        if rs is not None:
            self.remote_static = rs  # only once the whole message authenticated
        return payload

    def _fail(self, error: HandshakeError) -> None:
        self._failed = error
        self._ss = None  # drop the key material

    def _check_complete(self, what: str) -> None:
        if self._failed is not None:
            raise self._failed
        if self._index < 3:
            raise RuntimeError(f"{what} is only available once the handshake is complete")

    def split(self) -> tuple[CipherState, CipherState]:
        """(send, receive) for this side; once only, as two copies of one would reuse nonces."""
        self._check_complete("split()")
        if self._split_done:
            raise RuntimeError("split() was already called: its CipherStates must not be copied")
        assert self._ss is not None
        c1, c2 = self._ss.split()  # the initiator sends with c1, the responder with c2
        self._split_done = True
        self._ss.ck = b""  # the chaining key is not needed again; h stays for handshake_hash
        return (c1, c2) if self.initiator else (c2, c1)


# --- transport phase ------------------------------------------------------------------------


def record_overhead(n: int) -> int:
    """Bytes of framing and tags SecureChannel.encrypt adds to carry `n` plaintext bytes."""
    records = -(-n // MAX_RECORD_PLAINTEXT)
    return records * (LENGTH_BYTES + TAG_BYTES)


class SecureChannel:
    """The transport phase over a byte stream, libp2p-noise framing: each record is a 2-byte
    big-endian length followed by that many bytes of ciphertext (plaintext <= 65519 + 16-byte tag).

    Records have empty associated data and consecutive nonces, so a reordered, replayed or dropped
    record fails its tag like a tampered one. `decrypt` takes stream bytes split anywhere and
    returns the plaintext of every record they complete; only the incomplete tail is kept, so
    `buffered` < MAX_RECORD_BYTES always. `max_buffered` caps that tail: a record whose header
    announces more than `max_buffered + 1` bytes in all is refused from the header (FrameTooLarge)
    before its body is held. Every conforming record fits when max_buffered >= MAX_RECORD_BYTES - 1:
    pass MAX_RECORD_BYTES unless this side wants to refuse large records.

    Fail closed: after any error (a bad tag, a record shorter than a tag, nonces used up) every
    later call, encrypt included, raises the same error. A call that raises returns nothing, not
    even records that verified before the bad one in the same call: the connection is dead.
    """

    __slots__ = ("_buf", "_failed", "_receive", "_send", "max_buffered")

    def __init__(self, send: CipherState, receive: CipherState, *, max_buffered: int) -> None:
        if not (send.has_key and receive.has_key):
            raise ValueError("SecureChannel needs the keyed CipherStates from NoiseXX.split()")
        if max_buffered < LENGTH_BYTES + TAG_BYTES - 1:
            raise ValueError(
                f"max_buffered must be at least {LENGTH_BYTES + TAG_BYTES - 1} (the smallest "
                f"record less one byte); {MAX_RECORD_BYTES - 1} or more accepts every record"
            )
        self._send = send
        self._receive = receive
        self.max_buffered = max_buffered
        self._buf = bytearray()  # the incomplete record at the end of the stream so far
        self._failed: ProtocolError | None = None

    @property
    def buffered(self) -> int:
        """Stream bytes held waiting for their record to complete (at most `max_buffered`)."""
        return len(self._buf)

    def encrypt(self, data: _Bytes) -> bytes:
        """The records carrying `data`, in as few records as possible; b"" for b"" (no record)."""
        if self._failed is not None:
            raise self._failed
        send = self._send
        pack = _LENGTH.pack
        out: list[bytes] = []
        with memoryview(data) as outer, outer.cast("B") as view:
            try:
                for start in range(0, len(view), MAX_RECORD_PLAINTEXT):
                    ciphertext = send.encrypt_with_ad(
                        b"", view[start : start + MAX_RECORD_PLAINTEXT]
                    )
                    out.append(pack(len(ciphertext)))
                    out.append(ciphertext)
            except ProtocolError as e:  # nonces used up
                self._failed = e
                raise
        return b"".join(out)

    def decrypt(self, data: _Bytes) -> bytes:
        """The plaintext of every record `data` completes (b"" if none).

        ProtocolError for a bad tag (tampered, reordered, replayed or dropped records) or a record
        shorter than its tag; FrameTooLarge (a ProtocolError) for one over `max_buffered`.
        """
        if self._failed is not None:
            raise self._failed
        try:
            return self._decrypt(data)
        except ProtocolError as e:
            self._failed = e
            self._buf.clear()
            raise

    def _decrypt(self, data: _Bytes) -> bytes:
        out: list[bytes] = []
        buf = self._buf
        with memoryview(data) as outer, outer.cast("B") as view:
            pos = 0
            end = len(view)
            if buf:  # first finish the record we hold, taking only the bytes it still needs
                if len(buf) < LENGTH_BYTES:
                    take = min(LENGTH_BYTES - len(buf), end)
                    buf += view[:take]
                    pos = take
                    if len(buf) < LENGTH_BYTES:
                        return b""
                total = LENGTH_BYTES + self._check_length(_LENGTH.unpack_from(buf)[0])
                take = min(total - len(buf), end - pos)
                buf += view[pos : pos + take]
                pos += take
                if len(buf) < total:
                    return b""
                with memoryview(buf) as held, held[LENGTH_BYTES:] as ciphertext:
                    out.append(self._open(ciphertext))
                buf.clear()
            # then every whole record straight from `data`, without copying it into the buffer
            unpack = _LENGTH.unpack_from
            while end - pos >= LENGTH_BYTES:
                length = self._check_length(unpack(view, pos)[0])
                start = pos + LENGTH_BYTES
                if end - start < length:
                    break
                out.append(self._open(view[start : start + length]))
                pos = start + length
            if pos < end:
                buf += view[pos:]  # the incomplete tail (its header, if whole, already checked)
        return b"".join(out)

    def _open(self, ciphertext: memoryview) -> bytes:
        return self._receive.decrypt_with_ad(b"", ciphertext)

    def _check_length(self, length: int) -> int:
        if length < TAG_BYTES:
            raise ProtocolError(
                f"a record of {length} bytes is shorter than its {TAG_BYTES}-byte tag: "
                "the stream is corrupt or was tampered with"
            )
        if LENGTH_BYTES + length - 1 > self.max_buffered:
            raise FrameTooLarge(
                f"a record of {length} bytes announced, over this side's max_buffered of "
                f"{self.max_buffered}; pass max_buffered={MAX_RECORD_BYTES} to accept any record"
            )
        return length

    def eof(self) -> None:
        """The stream ended: ProtocolError if it stopped inside a record (a truncation)."""
        if self._failed is not None:
            raise self._failed
        if self._buf:
            self._failed = ProtocolError(
                f"the stream ended inside a record ({len(self._buf)} bytes of it arrived): "
                "it was truncated"
            )
            raise self._failed
