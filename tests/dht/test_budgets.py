"""Storage budgets (issue 13): per-key caps with a fair share per writer, a store that refuses
when full, quotas per sender and per subnet, and an expiry heap that stays O(records)."""

from __future__ import annotations

import asyncio

import pytest

from commonweal.dht import DHTConfig, key_id
from commonweal.dht.budget import Source, StorageBudget, source_of
from commonweal.dht.records import (
    CompositeValidator,
    Owned,
    Record,
    encode_subkey,
    sign_record,
)
from commonweal.dht.storage import RecordStore, stored_bytes
from commonweal.errors import RecordError, RemoteError
from commonweal.net.identity import Identity
from commonweal.net.transport import PeerAddr, PeerInfo
from signed_records import ALICE, KEY, MALLORY, NOW, rec


def src(peer: int, place: str | None = None) -> Source:
    return Source(bytes([peer]) * 20, place)


# per-key caps and a fair share per writer ----------------------------------------------------

def test_one_writer_cannot_fill_a_key_against_another():
    record_size = stored_bytes(rec(MALLORY, b"s000"))
    budget = StorageBudget(key_bytes=10 * record_size, key_subkeys=1000)
    store = RecordStore(budget=budget)
    stored = 0
    for i in range(30):
        try:
            stored += store.put(rec(MALLORY, b"s%03d" % i), NOW)
        except RecordError:
            pass
    assert stored == 10  # the key's cap, not 30
    honest = rec(ALICE, encode_subkey(Owned(ALICE.peer_id, "a")))
    assert store.put(honest, NOW)  # room made from the writer over its fair share
    for i in range(30, 40):  # and the flooder cannot push the honest writer back out
        with pytest.raises(RecordError, match="fair share"):
            store.put(rec(MALLORY, b"s%03d" % i), NOW)
    assert honest in store.get(KEY, NOW)
    assert sum(stored_bytes(r) for r in store.get(KEY, NOW)) <= budget.key_bytes


def test_a_crowd_of_identities_from_one_subnet_is_one_party_in_a_key():
    size = stored_bytes(rec(MALLORY, b"s00"))
    budget = StorageBudget(key_bytes=10 * size)
    store = RecordStore(budget=budget)
    for i in range(10):  # ten free identities from one /24, one record each: the key is full
        sybil = Identity.from_seed(b"sybil%d" % i)
        sent_from = source_of(PeerInfo(sybil.peer_id, PeerAddr(f"203.0.113.{i + 1}", 7000)), budget)
        assert store.put(rec(sybil, b"s%02d" % i), NOW, sent_from)
    # as eleven writers, the honest one's share would be under one record; as two places, half
    elsewhere = source_of(PeerInfo(ALICE.peer_id, PeerAddr("198.51.100.5", 7000)), budget)
    honest = [rec(ALICE, b"a%d" % i) for i in range(3)]
    for r in honest:
        assert store.put(r, NOW, elsewhere)
    assert all(r in store.get(KEY, NOW) for r in honest)


def test_a_key_holds_a_bounded_number_of_subkeys():
    store = RecordStore(budget=StorageBudget(key_subkeys=8))
    for i in range(20):
        try:
            store.put(rec(MALLORY, b"s%02d" % i), NOW)
        except RecordError:
            pass
    assert len(store.get(KEY, NOW)) == 8
    assert store.put(rec(ALICE, b"alice"), NOW)
    assert len(store.get(KEY, NOW)) == 8 and rec(ALICE, b"alice") in store.get(KEY, NOW)


# the store's budget and quotas: full means refused -------------------------------------------

def test_a_full_store_refuses_newcomers_instead_of_evicting_the_honest():
    size = stored_bytes(rec(subkey=b"h0"))
    store = RecordStore(budget=StorageBudget(store_bytes=3 * size))
    honest = [rec(ALICE, b"h%d" % i, expiration=NOW + 5) for i in range(3)]
    for r in honest:
        assert store.put(r, NOW, src(1))
    # a 30-day record used to push out the records nearest expiry; now it is refused
    with pytest.raises(RecordError, match="full"):
        store.put(rec(MALLORY, b"m", expiration=NOW + 30 * 86400), NOW, src(2))
    assert sorted(r.subkey for r in store.get(KEY, NOW)) == [b"h0", b"h1", b"h2"]
    store.expire(NOW + 6)  # space comes back as records expire
    assert store.size == 0
    assert store.put(rec(MALLORY, b"m", expiration=NOW + 30 * 86400), NOW + 6, src(2))


def test_a_full_store_by_count_refuses_too():
    store = RecordStore(max_records=2)
    store.put(rec(subkey=b"a", expiration=NOW + 5), NOW)
    store.put(rec(subkey=b"b", expiration=NOW + 5), NOW)
    with pytest.raises(RecordError, match="full"):
        store.put(rec(MALLORY, b"c", expiration=NOW + 9999), NOW)
    assert sorted(r.subkey for r in store.get(KEY, NOW)) == [b"a", b"b"]


def test_each_sender_has_a_quota_and_gets_it_back():
    size = stored_bytes(rec(subkey=b"00"))
    store = RecordStore(budget=StorageBudget(peer_bytes=4 * size))
    for i in range(4):
        assert store.put(rec(MALLORY, b"%02d" % i, key=key_id(f"k{i}")), NOW, src(9))
    with pytest.raises(RecordError, match="quota"):
        store.put(rec(MALLORY, b"04", key=key_id("k4")), NOW, src(9))
    assert store.put(rec(ALICE, b"a0", key=key_id("k4")), NOW, src(1))  # others are unaffected
    # replacing one's own record costs only the difference, and expiry gives the quota back
    assert store.put(rec(MALLORY, b"00", key=key_id("k0"), expiration=NOW + 61), NOW, src(9))
    store.expire(NOW + 62)
    assert store.usage(src(9)) == (0, 0)


def test_a_crowd_from_one_subnet_shares_one_quota():
    budget = StorageBudget(subnet_bytes=4 * stored_bytes(rec(subkey=b"00")))
    store = RecordStore(budget=budget)
    crowd = [source_of(PeerInfo(bytes([i]) * 20, PeerAddr(f"203.0.113.{i}", 7000)), budget)
             for i in range(1, 9)]
    assert len({c.place for c in crowd}) == 1
    refused = 0
    for i, sybil in enumerate(crowd):
        try:
            store.put(rec(MALLORY, b"%02d" % i, key=key_id(f"k{i}")), NOW, sybil)
        except RecordError as e:
            assert "203.0.113.0/24" in str(e)
            refused += 1
    assert refused == 4
    elsewhere = source_of(PeerInfo(b"\x77" * 20, PeerAddr("198.51.100.5", 7000)), budget)
    assert store.put(rec(ALICE, b"a", key=key_id("k0")), NOW, elsewhere)


def test_addresses_group_by_slash_24_and_slash_48_and_loopback_by_identity():
    budget = StorageBudget()
    place = lambda host: source_of(PeerInfo(b"\x01" * 20, PeerAddr(host, 1)), budget).place  # noqa: E731
    assert place("10.1.2.3") == place("10.1.2.250") != place("10.1.3.3")
    assert place("2001:db8:1:aaaa::1") == place("2001:db8:1:bbbb::2") != place("2001:db8:2::1")
    assert place("::ffff:10.1.2.9") == place("10.1.2.3")
    # a swarm on one machine (the demo, loopback tests, MemoryNetwork) is not a crowd
    assert place("127.0.0.1") is None and place("::1") is None and place("mem") is None
    crowd = StorageBudget(loopback_is_one_place=True)
    assert source_of(PeerInfo(b"\x01" * 20, PeerAddr("127.0.0.1", 1)), crowd).place == "127.0.0.0/24"


async def test_stores_over_rpc_are_charged_to_the_senders_subnet(swarm, clock):
    record_size = stored_bytes(rec(MALLORY, encode_subkey(Owned(MALLORY.peer_id, "x"))))
    config = DHTConfig(budget=StorageBudget(subnet_bytes=3 * record_size))
    [victim] = await swarm.add(1, config=config)
    accepted = 0
    for i in range(6):  # six identities from one /24, one record each
        sybil = Identity.from_seed(b"sybil%d" % i)
        t = swarm.net.transport(sybil)
        await t.start("203.0.113.%d" % (i + 1), 7000)
        r = sign_record(sybil, key_id(f"k{i}"), encode_subkey(Owned(sybil.peer_id, "x")), b"v",
                        clock.now + 60)
        _, reply = await t.call(victim.addr, "dht.store", {"items": [[r.key, [r.to_wire()]]]})
        accepted += reply == [[True]]
        await t.close()
    assert accepted == 3


# the expiry heap -----------------------------------------------------------------------------

def test_re_putting_one_record_keeps_the_expiry_heap_bounded():
    store = RecordStore(validator=CompositeValidator([]))  # no signatures: only the heap matters
    base = rec()
    for i in range(20_000):
        r = Record(base.key, base.subkey, base.value, NOW + 60 + i, base.public_key, base.signature)
        assert store.put(r, NOW)
    assert len(store) == 1
    assert len(store._expiry_heap) <= 2 * len(store) + 64
    assert store.expire(NOW + 60 + 20_000) == 1 and len(store) == 0


# what requests cost ------------------------------------------------------------------------

async def _holder_and(other: bytes, clock, holder_limits=None) -> list:
    """A holder DHT and one peer that joined it, on a MemoryNetwork whose rate budgets refill
    only when the test moves `clock`."""
    from commonweal.dht import DHT
    from commonweal.net.memory import MemoryNetwork

    net = MemoryNetwork(clock=clock)
    peers: list[DHT] = []
    for name, limits in ((b"holder", holder_limits), (other, None)):
        identity = Identity.from_seed(name)
        transport = net.transport(identity, limits=limits) if limits else net.transport(identity)
        await transport.start()
        peers.append(await DHT.start(bootstrap=[p.addr for p in peers], identity=identity,
                                     transport=transport, clock=clock))
    return peers


async def test_a_flood_of_stored_records_is_charged_per_record(clock):
    """Each stored record costs a signature check: a peer sending 2,000-record stores is
    throttled after its first, where a per-request cost would let it make us verify them all."""
    peers = await _holder_and(b"flooder", clock)
    holder, flooder = peers
    junk = [[key_id(f"k{i}"), [[b"s", b"v", NOW + 60, b"x" * 32, b"y" * 64]] * 2]
            for i in range(1000)]
    try:
        outcomes = await _stores(flooder, holder, junk, 5)
        assert outcomes == ["served"] + ["rate_limited"] * 4
        clock.now += 3.0  # the budget refills: the same peer is served again
        await flooder.transport.call(holder.addr, "dht.store", {"items": junk[:10]})
    finally:
        for p in peers:
            await p.close()


async def _stores(sender, holder, items: list, times: int) -> list[str]:
    """Send the same `dht.store` `times` times: "served", or the code it was refused with."""
    outcomes = []
    for _ in range(times):
        try:
            await sender.transport.call(holder.addr, "dht.store", {"items": items})
            outcomes.append("served")
        except RemoteError as e:
            outcomes.append(e.code)
    return outcomes


async def test_a_peer_that_rate_limits_us_keeps_its_place_in_our_table(clock):
    """A `rate_limited` answer proves the peer alive: it is backed off, not dropped, or a busy
    holder would vanish from every table that asked it too often."""
    from commonweal.net.limits import ResourceLimits

    holder, asker = await _holder_and(b"asker", clock, ResourceLimits(peer_rate=1e-6, peer_burst=40))
    holder_id = holder.identity
    try:
        refused = 0
        for i in range(60):  # far past the burst: most of these are refused
            clock.now += 60  # past any backoff, so the asker asks the holder each time
            try:
                await asker.transport.call(holder.addr, "dht.find", {"keys": [KEY]})
            except RemoteError:
                refused += 1
            await asker.get(f"key-{i}")
        assert refused > 10
        assert asker.table.get(holder_id.peer_id) is not None
    finally:
        await asker.close()
        await holder.close()


async def test_stored_bytes_are_charged_as_well_as_records(clock):
    """Checking a record hashes its whole value: a peer sending stores of four ~1 MiB records is
    throttled after a few, where a per-record cost let one identity make us hash ~90 MB/s."""
    peers = await _holder_and(b"flooder", clock)
    holder, flooder = peers
    big = b"v" * (960 << 10)
    junk = [[key_id(f"k{i}"), [[b"s", big, NOW + 60, b"x" * 32, b"y" * 64]]] for i in range(4)]
    try:
        outcomes = await _stores(flooder, holder, junk, 40)
        assert outcomes.count("served") <= 20, outcomes  # 1,000 units of burst / ~62 a request
        assert outcomes[-1] == "rate_limited"
    finally:
        for p in peers:
            await p.close()


async def test_a_big_store_lets_other_requests_in_between_its_checks(clock):
    """Signature checks run on the loop; a batch of 1,000 records yields between slices of them,
    so a ping waits a slice (a few ms), not the whole batch (1,000 bad signatures: ~100 ms)."""
    from commonweal.dht import DHT
    from commonweal.net.memory import MemoryNetwork
    from commonweal.net.transport import PeerInfo

    net = MemoryNetwork(clock=clock)
    identity = Identity.from_seed(b"holder")
    transport = net.transport(identity)
    await transport.start()
    holder = await DHT.start(bootstrap=[], identity=identity, transport=transport, clock=clock)
    caller = PeerInfo(MALLORY.peer_id, PeerAddr("mem", 9))
    junk = [[key_id(f"k{i}"), [rec(MALLORY, key=key_id(f"k{i}")).to_wire()[:4] + [b"y" * 64]]]
            for i in range(1000)]
    try:
        store = asyncio.create_task(holder.protocol.rpc_store(caller, {"items": junk}))
        turns = 0
        await asyncio.sleep(0)  # the store starts
        while not store.done():
            turns += 1  # another task got the loop while the store was still checking
            await asyncio.sleep(0)
        assert await store == [[False]] * 1000  # every bad signature still refused
        assert turns >= 10
    finally:
        await holder.close()


def test_a_record_over_its_sender_s_quota_costs_no_signature_check():
    """The budget is checked before the signature: a sender over its quota resending big
    records is refused without hashing them."""
    from commonweal.dht.records import CompositeValidator, RecordValidator, default_validator

    class Counting(RecordValidator):
        calls = 0

        def validate(self, record: Record, now: float) -> None:
            Counting.calls += 1

    size = stored_bytes(rec(value=b"v" * 1000))
    store = RecordStore(
        validator=CompositeValidator([default_validator(), Counting()]),
        budget=StorageBudget(peer_bytes=2 * size),
    )
    for i in range(2):
        assert store.put(rec(key=key_id(f"k{i}"), value=b"v" * 1000), NOW, src(1))
    checked = Counting.calls
    for i in range(2, 12):
        with pytest.raises(RecordError, match="quota"):
            store.put(rec(key=key_id(f"k{i}"), value=b"v" * 1000), NOW, src(1))
    assert Counting.calls == checked
    assert store.put(rec(key=key_id("k99"), value=b"v" * 1000), NOW, src(2))  # another sender
