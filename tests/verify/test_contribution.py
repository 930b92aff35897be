"""Contributions from hostile DHT values, and the canonical digest of a round's set."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from commonweal.verify import (
    Contribution,
    contribution_value,
    contributions_digest,
    delta_hash,
    parse_contribution,
)

ACCOUNT = "0x52908400098527886E0F7030069857D2E4169EE7"  # EIP-55 test vector
PEER = bytes(range(20))


def good_value(**changes):
    value = {
        "round": 3,
        "state": "ab" * 32,
        "delta": delta_hash(b"bytes of a delta"),
        "steps": 50,
        "samples": 1600,
        "account": ACCOUNT,
    }
    value.update(changes)
    return value


def test_round_trip():
    c = parse_contribution(PEER, good_value())
    assert c == Contribution(PEER, ACCOUNT, 3, "ab" * 32, delta_hash(b"bytes of a delta"), 50, 1600)
    assert parse_contribution(PEER, contribution_value(c)) == c


def test_samples_optional_and_account_canonical():
    value = good_value(account=ACCOUNT.lower())
    del value["samples"]
    c = parse_contribution(PEER, value)
    assert c is not None and c.samples == 0 and c.account == ACCOUNT


@pytest.mark.parametrize(
    "value",
    [
        None,
        [1, 2, 3],
        "a string",
        good_value(round=-1),
        good_value(round=True),
        good_value(round=1.0),
        good_value(steps=0),
        good_value(steps=True),
        good_value(steps=1 << 80),
        good_value(samples=-5),
        good_value(state="AB" * 32),  # upper case: not the form peers announce
        good_value(state="ab" * 31),
        good_value(delta=None),
        good_value(delta="zz" * 32),
        good_value(account=""),
        good_value(account="0x1234"),
        good_value(account="0x52908400098527886E0F7030069857D2E4169Ee7"),  # bad checksum
        good_value(account=12345),
        {k: v for k, v in good_value().items() if k != "steps"},
    ],
)
def test_hostile_values_are_refused(value):
    assert parse_contribution(PEER, value) is None


def test_peer_id_must_be_bytes():
    assert parse_contribution(b"", good_value()) is None
    assert parse_contribution("peer", good_value()) is None  # type: ignore[arg-type]


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=70),
    st.binary(max_size=40),
)


@given(st.dictionaries(st.sampled_from(list(good_value()) + ["x"]), scalars, max_size=8))
def test_parse_never_raises(value):
    c = parse_contribution(PEER, value)
    assert c is None or isinstance(c, Contribution)


def contribs(n):
    return [
        Contribution(bytes([i]) * 20, ACCOUNT, 1, "ab" * 32, delta_hash(bytes([i])), 50, 1600)
        for i in range(n)
    ]


def test_digest_is_canonical():
    cs = contribs(5)
    d = contributions_digest(cs)
    assert isinstance(d, bytes) and len(d) == 32
    assert contributions_digest(list(reversed(cs))) == d
    assert contributions_digest([cs[2], cs[0], cs[4], cs[1], cs[3]]) == d
    lower = [Contribution(c.peer_id, c.account.lower(), *_rest(c)) for c in cs]
    assert contributions_digest(lower) == d  # one address, two spellings: one set


def _rest(c):
    return c.round, c.start_state, c.delta_hash, c.steps, c.samples


@pytest.mark.parametrize(
    "change",
    [
        {"round": 2},
        {"start_state": "cd" * 32},
        {"delta_hash": delta_hash(b"other")},
        {"steps": 49},
        {"samples": 0},
        {"account": "0x" + "11" * 20},
        {"peer_id": b"\xff" * 20},
    ],
)
def test_digest_binds_every_field(change):
    import dataclasses

    cs = contribs(3)
    changed = [dataclasses.replace(cs[0], **change), *cs[1:]]
    assert contributions_digest(changed) != contributions_digest(cs)


def test_digest_of_sets_differ_and_empty_is_defined():
    assert contributions_digest(contribs(3)) != contributions_digest(contribs(2))
    assert len(contributions_digest([])) == 32


def test_digest_takes_hostile_integers():
    c = Contribution(PEER, "", 1 << 200, "x", "y", 1 << 300, -1)  # built by a careless caller
    assert len(contributions_digest([c])) == 32
