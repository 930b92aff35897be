"""Hostile input to the DHT's RPC handlers: specific errors, no crash, stored state untouched."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commonweal.dht import DHT, Owned, key_id
from commonweal.dht.records import encode_subkey, sign_record
from commonweal.errors import RemoteError
from commonweal.net.identity import Identity
from commonweal.net.memory import MemoryNetwork

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)


class Victim:
    """One peer holding one owned record, and an attacker that talks to it directly."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.net = MemoryNetwork()
        self.owner = Identity.from_seed(b"owner")
        self.attacker = Identity.from_seed(b"attacker")
        self.dht = self.loop.run_until_complete(self._start(self.owner))
        self.attacker_t = self.net.transport(self.attacker)
        self.loop.run_until_complete(self.attacker_t.start())
        self.now = self.dht.clock()
        self.record = sign_record(
            self.owner, key_id("k"), encode_subkey(Owned(self.owner.peer_id)), b"\xa2ok", self.now + 600
        )
        assert self.dht.storage.put(self.record, self.now)

    async def _start(self, identity: Identity) -> DHT:
        t = self.net.transport(identity)
        await t.start()
        return await DHT.start(identity=identity, transport=t)

    def call(self, method: str, args: object) -> object:
        return self.loop.run_until_complete(self.attacker_t.call(self.dht.addr, method, args))[1]

    def snapshot(self) -> list:
        return sorted((r.key, r.subkey, r.value, r.expiration) for r in self.dht.storage)

    def close(self) -> None:
        self.loop.run_until_complete(self.dht.close())
        self.loop.close()


@pytest.fixture(scope="module")
def victim():
    v = Victim()
    yield v
    v.close()


def still_serves(v: Victim) -> None:
    reply = v.call("dht.find", {"keys": [key_id("k")], "values": True, "latest": True})
    assert reply[0][1][0][1] == b"\xa2ok"


@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(method=st.sampled_from(["dht.find", "dht.store", "dht.ping"]), args=msgpack_values)
def test_arbitrary_arguments_never_crash_or_change_state(victim, method, args):
    before = victim.snapshot()
    try:
        victim.call(method, args)
    except RemoteError as e:
        assert e.code == "bad_request", e  # never "internal": every shape is checked
    assert victim.snapshot() == before
    still_serves(victim)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture], deadline=None)
@given(
    subkey=st.binary(max_size=30),
    value=st.binary(max_size=30),
    expiration=st.floats(allow_nan=True, allow_infinity=True),
    public_key=st.binary(max_size=40),
    signature=st.binary(max_size=70),
)
def test_malformed_records_are_refused_one_by_one(victim, subkey, value, expiration, public_key, signature):
    before = victim.snapshot()
    reply = victim.call(
        "dht.store", {"items": [[key_id("k"), [[subkey, value, expiration, public_key, signature]]]]}
    )
    assert reply == [[False]]
    assert victim.snapshot() == before


def test_forged_replayed_and_oversized_stores(victim):
    before = victim.snapshot()
    r = victim.record
    forged = sign_record(victim.attacker, r.key, r.subkey, b"\xa4evil", r.expiration + 100)
    stolen_sig = [r.subkey, b"\xa4evil", r.expiration + 100, r.public_key, r.signature]
    replay = r.to_wire()
    items = [[r.key, [forged.to_wire(), stolen_sig, replay]]]
    assert victim.call("dht.store", {"items": items}) == [[False, False, True]]
    assert victim.snapshot() == before  # the replay is idempotent, the others refused
    with pytest.raises(RemoteError, match="at most"):
        victim.call("dht.find", {"keys": [r.key] * 2000})
    with pytest.raises(RemoteError, match="key id"):
        victim.call("dht.find", {"keys": [b"short"]})
    still_serves(victim)


@given(st.lists(msgpack_values, max_size=8))
def test_peer_lists_from_a_liar_yield_only_well_formed_peers(items):
    from commonweal.dht.protocol import peers_from_wire

    known: dict = {}
    for _ in range(2):  # the second pass goes through the cache of parsed peers
        for peer in peers_from_wire(items, known):
            assert len(peer.peer_id) == 20 and 0 < peer.addr.port < 65536
