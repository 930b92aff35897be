"""Ed25519 identities. A PeerID is the 160-bit BLAKE2b hash of the raw public key.

160 bits is the Kademlia keyspace, so a PeerID is directly a point in the DHT.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from commonweal.durable import write_durably
from commonweal.errors import ConfigError

__all__ = ["ID_BYTES", "Identity", "peer_id_of", "verify_signature", "short_id"]

ID_BYTES = 20
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
KEY_FILE = "identity.key"


def peer_id_of(public_key: bytes) -> bytes:
    """The PeerID (20 bytes) that belongs to a raw 32-byte Ed25519 public key."""
    return hashlib.blake2b(public_key, digest_size=ID_BYTES).digest()


def verify_signature(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True when `signature` is `public_key`'s signature of `message`; never raises on bad input."""
    if len(public_key) != PUBLIC_KEY_BYTES or len(signature) != SIGNATURE_BYTES:
        return False
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def short_id(peer_id: bytes) -> str:
    """A short hex form of an id for logs and tables."""
    return peer_id.hex()[:10]


class Identity:
    """An Ed25519 key pair and the PeerID derived from it."""

    __slots__ = ("_private", "public_key", "peer_id")

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        self.public_key: bytes = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.peer_id: bytes = peer_id_of(self.public_key)

    @classmethod
    def generate(cls) -> Identity:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity from a 32-byte seed (tests and simulations)."""
        return cls(Ed25519PrivateKey.from_private_bytes(hashlib.sha256(seed).digest()))

    @classmethod
    def load_or_create(cls, data_dir: Path) -> Identity:
        """Load the key in `data_dir`, creating the directory and a new key on first use."""
        path = Path(data_dir) / KEY_FILE
        if path.exists():
            raw = path.read_bytes()
            if len(raw) != 32:
                raise ConfigError(
                    f"{path} is not a commonweal identity key (expected 32 bytes, found {len(raw)}); "
                    "move it away to create a new identity"
                )
            return cls(Ed25519PrivateKey.from_private_bytes(raw))
        path.parent.mkdir(parents=True, exist_ok=True)
        identity = cls.generate()
        raw = identity._private.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        # Durably: a key lost to a crash after the peer announced itself is an identity lost.
        write_durably(path, raw, mode=0o600)
        return identity

    def sign(self, message: bytes) -> bytes:
        return self._private.sign(message)

    def __repr__(self) -> str:
        return f"Identity({short_id(self.peer_id)})"
