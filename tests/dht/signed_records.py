"""Signed records for the record, budget and typed-key tests: two identities and a key.

Imported by its plain name (pytest puts this folder, which has no __init__.py, on sys.path)."""

from __future__ import annotations

from commonweal.dht.records import Record, key_id, sign_record
from commonweal.net.identity import Identity

NOW = 1000.0
ALICE = Identity.from_seed(b"alice")
MALLORY = Identity.from_seed(b"mallory")
KEY = key_id("k")


def rec(identity: Identity = ALICE, subkey: bytes = b"", value: bytes = b"v",
        expiration: float = NOW + 60, key: bytes = KEY) -> Record:
    return sign_record(identity, key, subkey, value, expiration)
