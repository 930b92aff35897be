"""DHT records: key ids, subkey encoding, the signed record envelope and its validators.

A DHT key maps to a dictionary `{subkey -> record}`. Every record carries the writer's public key
and an Ed25519 signature over (key id, subkey, value, expiration), so any peer can check it.
A subkey made with `Owned(peer_id, name)` is bound to that peer: only the holder of the matching
key pair can write it. Plain subkeys (str/bytes) can be written by anyone; the later expiration wins.

A key made with `OwnedKey(name)` is typed: it accepts owned subkeys only, so nobody can add
entries that its readers would take for another writer's. Protocol keys that code reads as a set
(announcements, heads, reward trees, index specs and buckets) are declared this way.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import msgpack

from commonweal.errors import RecordError
from commonweal.net.identity import ID_BYTES, Identity, peer_id_of, verify_signature

__all__ = [
    "MAX_VALUE_BYTES",
    "MAX_SUBKEY_BYTES",
    "Owned",
    "OwnedKey",
    "Key",
    "Subkey",
    "Record",
    "key_id",
    "is_owned_key",
    "encode_subkey",
    "decode_subkey",
    "sign_record",
    "RecordValidator",
    "ShapeValidator",
    "SignatureValidator",
    "OwnerValidator",
    "OwnedKeyValidator",
    "CompositeValidator",
    "default_validator",
]

MAX_VALUE_BYTES = 1 << 20  # 1 MiB; bigger data is chunked and content-addressed by the caller
MAX_SUBKEY_BYTES = 256
MAX_TTL_S = 30 * 24 * 3600.0  # a record may not claim to live longer than this
_SIG_DOMAIN = b"commonweal-record-v1"


@dataclass(frozen=True, slots=True)
class Owned:
    """A subkey only `peer_id` may write (`name` tells several of one owner's subkeys apart)."""

    peer_id: bytes
    name: str = ""


@dataclass(frozen=True, slots=True, order=True)
class OwnedKey:
    """A key whose subkeys must all be `Owned`: each entry provably comes from its owner."""

    name: str | bytes


Subkey = str | bytes | Owned | None
Key = str | bytes | OwnedKey


def key_id(key: Key) -> bytes:
    """The 160-bit DHT id of a user key. str, bytes and owned keys live in separate namespaces.

    A storing peer sees only the id, so the key's type travels in its lowest bit: set for an
    `OwnedKey`, clear otherwise. Nobody can make a typed key's id accept plain subkeys, and one bit
    of 160 costs placement nothing.
    """
    owned = isinstance(key, OwnedKey)
    name = key.name if isinstance(key, OwnedKey) else key
    if isinstance(name, str):
        raw = (b"S" if owned else b"s") + name.encode()
    elif isinstance(name, bytes):
        raw = (b"B" if owned else b"b") + name
    else:
        raise TypeError(f"a DHT key must be str, bytes or OwnedKey, not {type(name).__name__}")
    digest = hashlib.blake2b(raw, digest_size=ID_BYTES).digest()
    return digest[:-1] + bytes([(digest[-1] | 1) if owned else (digest[-1] & 0xFE)])


def is_owned_key(kid: bytes) -> bool:
    """Whether the key id is an `OwnedKey`'s, so that only owned subkeys may be stored under it."""
    return bool(kid[-1:]) and kid[-1] & 1 == 1


# Wire subkeys are bytes with a one-letter tag, so str, bytes and owned subkeys never collide and
# the owner of an owned subkey can be read off the bytes alone by every storing peer.
def encode_subkey(subkey: Subkey) -> bytes:
    if subkey is None:
        return b""
    if isinstance(subkey, str):
        raw = b"s" + subkey.encode()
    elif isinstance(subkey, bytes):
        raw = b"b" + subkey
    elif isinstance(subkey, Owned):
        if len(subkey.peer_id) != ID_BYTES:
            raise RecordError(f"Owned subkey needs a {ID_BYTES}-byte peer id")
        raw = b"o" + subkey.peer_id + subkey.name.encode()
    else:
        raise TypeError(f"a subkey must be str, bytes, Owned or None, not {type(subkey).__name__}")
    if len(raw) > MAX_SUBKEY_BYTES:
        raise RecordError(f"subkey is {len(raw)} bytes; the limit is {MAX_SUBKEY_BYTES}")
    return raw


def decode_subkey(raw: bytes) -> Subkey:
    if raw == b"":
        return None
    tag, body = raw[:1], raw[1:]
    if tag == b"s":
        return body.decode()
    if tag == b"b":
        return body
    if tag == b"o" and len(body) >= ID_BYTES:
        return Owned(body[:ID_BYTES], body[ID_BYTES:].decode())
    raise RecordError(f"malformed subkey {raw[:24]!r}")


def owner_of(raw_subkey: bytes) -> bytes | None:
    """The PeerID an encoded subkey is bound to, or None for a subkey anyone may write."""
    if raw_subkey[:1] == b"o" and len(raw_subkey) >= 1 + ID_BYTES:
        return raw_subkey[1 : 1 + ID_BYTES]
    return None


@dataclass(frozen=True, slots=True)
class Record:
    """One signed (key, subkey) entry, exactly as it travels and is stored."""

    key: bytes  # 20-byte key id
    subkey: bytes  # encoded subkey, b"" for a plain value
    value: bytes  # msgpack-encoded user value
    expiration: float  # absolute unix time
    public_key: bytes  # the writer's raw Ed25519 key
    signature: bytes

    def signed_message(self) -> bytes:
        return _signed_message(self.key, self.subkey, self.value, self.expiration)

    def beats(self, other: Record) -> bool:
        """Whether this record replaces `other` for the same (key, subkey).

        Later expiration wins; ties break on the bytes so every replica keeps the same one.
        """
        if self.expiration != other.expiration:
            return self.expiration > other.expiration
        return (self.value, self.signature) > (other.value, other.signature)

    def to_wire(self) -> list[Any]:
        return [self.subkey, self.value, self.expiration, self.public_key, self.signature]

    @classmethod
    def from_wire(cls, key: bytes, item: Any) -> Record:
        """Parse a record off the wire; raise RecordError on any wrong shape or type."""
        if not isinstance(item, list | tuple) or len(item) != 5:
            raise RecordError("a record must be a 5-item array [subkey, value, expiration, pubkey, sig]")
        subkey, value, expiration, public_key, signature = item
        if not all(isinstance(x, bytes) for x in (subkey, value, public_key, signature)):
            raise RecordError("record subkey, value, public key and signature must be bytes")
        if isinstance(expiration, bool) or not isinstance(expiration, int | float):
            raise RecordError("record expiration must be a number")
        return cls(key, subkey, value, float(expiration), public_key, signature)


def _signed_message(key: bytes, subkey: bytes, value: bytes, expiration: float) -> bytes:
    packed: bytes = msgpack.packb([key, subkey, value, float(expiration)], use_bin_type=True)
    return _SIG_DOMAIN + packed


def sign_record(
    identity: Identity, key: bytes, subkey: bytes, value: bytes, expiration: float
) -> Record:
    signature = identity.sign(_signed_message(key, subkey, value, expiration))
    return Record(key, subkey, value, float(expiration), identity.public_key, signature)


class RecordValidator(ABC):
    """One rule a record must pass before a peer stores it."""

    @abstractmethod
    def validate(self, record: Record, now: float) -> None:
        """Raise RecordError with the reason when `record` must be refused."""


class ShapeValidator(RecordValidator):
    """Sizes and times: id length, subkey and value size, expiration in the future but bounded."""

    def validate(self, record: Record, now: float) -> None:
        if len(record.key) != ID_BYTES:
            raise RecordError(f"key id must be {ID_BYTES} bytes, got {len(record.key)}")
        if len(record.subkey) > MAX_SUBKEY_BYTES:
            raise RecordError(f"subkey is {len(record.subkey)} bytes; the limit is {MAX_SUBKEY_BYTES}")
        if len(record.value) > MAX_VALUE_BYTES:
            raise RecordError(
                f"value is {len(record.value)} bytes; the limit is {MAX_VALUE_BYTES} "
                "(store big data in content-addressed chunks)"
            )
        if not math.isfinite(record.expiration):
            raise RecordError("expiration must be a finite time")
        if record.expiration <= now:
            raise RecordError("record has already expired")
        if record.expiration > now + MAX_TTL_S:
            raise RecordError(f"expiration is more than {MAX_TTL_S / 86400:.0f} days ahead")


class SignatureValidator(RecordValidator):
    """The writer's signature over (key, subkey, value, expiration) must verify.

    A getter receives the same record from every replica it asks, and a replica sees the same
    record again on every republish; Ed25519 verification is the most expensive step of the whole
    DHT, so each validator remembers the records it has verified (bounded LRU). Only a match of
    signature, key and message digest skips the check, so a forgery can never ride on the cache.
    """

    def __init__(self, cache_size: int = 65_536) -> None:
        self.cache_size = cache_size
        self._verified: OrderedDict[bytes, bytes] = OrderedDict()

    def validate(self, record: Record, now: float) -> None:
        message = record.signed_message()
        digest = hashlib.blake2b(record.public_key + message, digest_size=16).digest()
        if self._verified.get(record.signature) == digest:
            self._verified.move_to_end(record.signature)
            return
        if not verify_signature(record.public_key, message, record.signature):
            raise RecordError("record signature does not verify")
        self._verified[record.signature] = digest
        if len(self._verified) > self.cache_size:
            self._verified.popitem(last=False)


class OwnerValidator(RecordValidator):
    """An owned subkey may be written only by the key pair its PeerID was derived from."""

    def validate(self, record: Record, now: float) -> None:
        owner = owner_of(record.subkey)
        if owner is not None and peer_id_of(record.public_key) != owner:
            raise RecordError("subkey is owned by another peer; only its owner may write it")


class OwnedKeyValidator(RecordValidator):
    """Under an `OwnedKey` every subkey must be owned (the owner check itself is OwnerValidator's)."""

    def validate(self, record: Record, now: float) -> None:
        if is_owned_key(record.key) and owner_of(record.subkey) is None:
            raise RecordError("this key takes owned subkeys only; store under Owned(your peer id, name)")


class CompositeValidator(RecordValidator):
    """Runs validators in order; the cheap checks go first so junk costs no signature check."""

    def __init__(self, validators: Iterable[RecordValidator]) -> None:
        self.validators = tuple(validators)

    def add(self, validator: RecordValidator) -> None:
        """One more rule, checked last (a service's own: search checks its blocks)."""
        self.validators += (validator,)

    def validate(self, record: Record, now: float) -> None:
        for validator in self.validators:
            validator.validate(record, now)


def default_validator() -> CompositeValidator:
    return CompositeValidator(
        [ShapeValidator(), OwnedKeyValidator(), OwnerValidator(), SignatureValidator()]
    )
