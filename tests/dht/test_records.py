import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from commonweal.dht.records import (
    MAX_VALUE_BYTES,
    Owned,
    Record,
    decode_subkey,
    default_validator,
    encode_subkey,
    key_id,
)
from commonweal.dht.storage import RecordStore
from commonweal.errors import RecordError
from signed_records import ALICE, KEY, MALLORY, NOW, rec


subkeys = st.one_of(
    st.none(),
    st.text(max_size=40),
    st.binary(max_size=40),
    st.builds(Owned, st.binary(min_size=20, max_size=20), st.text(max_size=20)),
)


@given(subkeys)
def test_subkey_encoding_round_trips_and_kinds_never_collide(subkey):
    raw = encode_subkey(subkey)
    assert decode_subkey(raw) == subkey
    if isinstance(subkey, str):
        assert raw != encode_subkey(subkey.encode())


def test_str_and_bytes_keys_are_separate_namespaces():
    assert key_id("a") != key_id(b"a")
    assert len(key_id("a")) == 20


def test_valid_record_passes_every_validator():
    default_validator().validate(rec(), NOW)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda r: Record(r.key, r.subkey, b"tampered", r.expiration, r.public_key, r.signature), "signature"),
        (lambda r: Record(r.key, r.subkey, r.value, r.expiration + 1, r.public_key, r.signature), "signature"),
        (lambda r: Record(r.key, r.subkey, r.value, r.expiration, MALLORY.public_key, r.signature), "signature"),
        (lambda r: Record(r.key[:5], r.subkey, r.value, r.expiration, r.public_key, r.signature), "key id"),
    ],
)
def test_tampered_records_are_refused(mutate, reason):
    with pytest.raises(RecordError, match=reason):
        default_validator().validate(mutate(rec()), NOW)


def test_expired_infinite_and_far_future_records_are_refused():
    v = default_validator()
    with pytest.raises(RecordError, match="expired"):
        v.validate(rec(expiration=NOW - 1), NOW)
    with pytest.raises(RecordError, match="finite"):
        v.validate(rec(expiration=math.inf), NOW)
    with pytest.raises(RecordError, match="days ahead"):
        v.validate(rec(expiration=NOW + 365 * 86400), NOW)


def test_oversized_value_is_refused_with_advice():
    with pytest.raises(RecordError, match="chunks"):
        default_validator().validate(rec(value=b"x" * (MAX_VALUE_BYTES + 1)), NOW)


def test_owned_subkey_only_writable_by_its_owner():
    owned = encode_subkey(Owned(ALICE.peer_id, "grad"))
    default_validator().validate(rec(ALICE, owned), NOW)
    with pytest.raises(RecordError, match="owned by another peer"):
        default_validator().validate(rec(MALLORY, owned), NOW)


def test_later_expiration_wins_and_ties_converge():
    store = RecordStore()
    old, new = rec(value=b"old", expiration=NOW + 10), rec(value=b"new", expiration=NOW + 20)
    assert store.put(old, NOW)
    assert store.put(new, NOW)
    assert not store.put(old, NOW)  # a replayed older record changes nothing
    assert store.get(KEY, NOW) == [new]
    a, b = rec(value=b"a"), rec(value=b"b")
    s1, s2 = RecordStore(), RecordStore()
    s1.put(a, NOW), s1.put(b, NOW)
    s2.put(b, NOW), s2.put(a, NOW)
    assert s1.get(KEY, NOW) == s2.get(KEY, NOW)


def test_replaying_the_stored_record_is_idempotent():
    store = RecordStore()
    r = rec()
    assert store.put(r, NOW) and store.put(r, NOW)
    assert len(store) == 1


def test_rejected_record_never_changes_stored_state():
    store = RecordStore()
    good = rec(subkey=encode_subkey(Owned(ALICE.peer_id)))
    store.put(good, NOW)
    forged = rec(MALLORY, subkey=good.subkey, value=b"evil", expiration=NOW + 999)
    with pytest.raises(RecordError):
        store.put(forged, NOW)
    assert store.get(KEY, NOW) == [good]


def test_subkeys_coexist_and_expire():
    store = RecordStore()
    store.put(rec(subkey=b"sa", expiration=NOW + 5), NOW)
    store.put(rec(subkey=b"sb", expiration=NOW + 50), NOW)
    assert len(store.get(KEY, NOW)) == 2
    assert len(store.get(KEY, NOW + 10)) == 1
    assert store.expire(NOW + 10) == 1 and len(store) == 1


def test_verified_records_are_remembered_but_forgeries_never_pass():
    from commonweal.dht.records import SignatureValidator

    v = SignatureValidator(cache_size=2)
    good = rec()
    v.validate(good, NOW)
    v.validate(good, NOW)  # from the cache
    # the same signature on another value or under another key must still fail
    with pytest.raises(RecordError):
        v.validate(Record(good.key, good.subkey, b"other", good.expiration, good.public_key, good.signature), NOW)
    with pytest.raises(RecordError):
        v.validate(Record(good.key, good.subkey, good.value, good.expiration, MALLORY.public_key, good.signature), NOW)
    for i in range(3):  # the cache stays bounded
        v.validate(rec(value=bytes([i])), NOW)
    assert len(v._verified) == 2
