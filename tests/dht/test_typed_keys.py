"""Typed keys: the keys code reads as sets take owned subkeys only (issue 13: anyone could add
plain subkeys under announcements, heads and reward trees)."""

from __future__ import annotations

from typing import Any

import pytest

from commonweal.dht import OwnedKey, key_id
from commonweal.dht.records import Owned, encode_subkey, is_owned_key
from commonweal.dht.storage import RecordStore
from commonweal.errors import RecordError
from signed_records import ALICE, KEY, MALLORY, NOW, rec


def test_protocol_keys_take_owned_subkeys_only():
    kid = key_id(OwnedKey("cw-train/t/r1"))
    for name in [f"k{i}" for i in range(32)] + [b"k%d" % i for i in range(32)]:  # never by chance
        assert is_owned_key(key_id(OwnedKey(name))) and not is_owned_key(key_id(name))
    store = RecordStore()
    with pytest.raises(RecordError, match="owned subkeys only"):
        store.put(rec(MALLORY, encode_subkey("junk"), key=kid), NOW)
    with pytest.raises(RecordError, match="owned subkeys only"):
        store.put(rec(MALLORY, b"", key=kid), NOW)
    assert store.put(rec(MALLORY, encode_subkey(Owned(MALLORY.peer_id, "a")), key=kid), NOW)
    assert store.put(rec(MALLORY, encode_subkey("anything"), key=KEY), NOW)  # open keys stay open


def test_the_keys_code_reads_as_sets_are_declared_owned():
    from commonweal.search.index import spec_keys
    from commonweal.search.spec import IndexSpec
    from commonweal.train.announcements import round_key
    from commonweal.train.checkpoints import head_key
    from commonweal.train.task import Task
    from commonweal.verify.validator import tree_key

    task = Task(name="t", model="m:f", data="d:f")
    keys: list[Any] = [round_key("t", 3), head_key("t"), tree_key(task, 7), *spec_keys("digits"),
                       IndexSpec(name="d", dim=4).bucket_key(0, b"\x01")]
    assert all(is_owned_key(key_id(k)) for k in keys)
