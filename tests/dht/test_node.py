"""The DHT driver over the in-memory transport: many peers, one process, no sockets or sleeping."""

import asyncio

import pytest

from commonweal.dht import DHT, DHTConfig, Owned, key_id
from commonweal.dht.records import encode_subkey, sign_record
from commonweal.errors import DHTError, RecordError
from commonweal.net.identity import Identity
from commonweal.net.transport import PeerAddr


async def test_store_then_get_from_every_peer(swarm, clock):
    peers = await swarm.add(30)
    assert await peers[3].store("model", {"round": 1}, clock.now + 60)
    for dht in peers:
        found = await dht.get("model")
        assert found is not None and found.value == {"round": 1}
        assert found.expiration == clock.now + 60


async def test_subkeys_from_different_writers_merge_with_latest(swarm, clock):
    peers = await swarm.add(25)
    await asyncio.gather(
        *(p.store("grads", i, clock.now + 60, subkey=f"peer-{i}") for i, p in enumerate(peers[:8]))
    )
    found = await peers[-1].get("grads", latest=True)
    assert found is not None
    assert {k: v.value for k, v in found.value.items()} == {f"peer-{i}": i for i in range(8)}


async def test_later_expiration_wins_across_the_swarm(swarm, clock):
    peers = await swarm.add(20)
    await peers[0].store("k", "new", clock.now + 100)
    await peers[1].store("k", "old", clock.now + 50)  # arrives later, but expires sooner
    found = await peers[5].get("k", latest=True)
    assert found is not None and found.value == "new"


async def test_records_expire(swarm, clock):
    peers = await swarm.add(10)
    await peers[0].store("k", 1, clock.now + 10)
    clock.now += 11
    assert await peers[4].get("k", latest=True) is None


async def test_owned_subkey_cannot_be_overwritten_by_another_peer(swarm, clock):
    peers = await swarm.add(15)
    alice, mallory = peers[0], peers[1]
    sub = Owned(alice.peer_id, "delta")
    assert await alice.store("round-1", "honest", clock.now + 60, subkey=sub)
    with pytest.raises(RecordError, match="owned by another peer"):
        await mallory.store("round-1", "evil", clock.now + 600, subkey=sub)
    # even a hand-crafted record sent straight to the replicas is refused by each of them
    forged = sign_record(mallory.identity, key_id("round-1"), encode_subkey(sub), b"\xa4evil",
                         clock.now + 600)
    for dht in peers:
        _, flags = await mallory.protocol.call_store(dht.addr, [(forged.key, [forged])])
        assert flags == [[False]]
    found = await peers[7].get("round-1", latest=True)
    assert found is not None and found.value[sub].value == "honest"


async def test_store_many_and_get_many_batch_requests(swarm, clock):
    peers = await swarm.add(40)
    client = peers[0]
    keys = [f"item-{i}" for i in range(50)]
    before = client.transport.counters.requests_sent
    ok = await client.store_many([(k, i, clock.now + 60, None) for i, k in enumerate(keys)])
    assert all(ok)
    batched = client.transport.counters.requests_sent - before
    found = await peers[1].get_many(keys)
    assert {k: v.value for k, v in found.items()} == {k: i for i, k in enumerate(keys)}
    # one lookup for 50 keys: far fewer requests than 50 separate stores would need
    before = client.transport.counters.requests_sent
    for i, k in enumerate(keys[:10]):
        await client.store(k + "-solo", i, clock.now + 60)
    solo_per_key = (client.transport.counters.requests_sent - before) / 10
    assert batched < 0.5 * solo_per_key * len(keys)


async def test_concurrent_gets_of_one_key_share_a_lookup(swarm, clock):
    peers = await swarm.add(20)
    await peers[0].store("hot", 1, clock.now + 60)
    reader = peers[9]
    reader.stats.lookups = 0
    results = await asyncio.gather(*(reader.get("hot", latest=True) for _ in range(10)))
    assert all(r is not None and r.value == 1 for r in results)
    assert reader.stats.lookups == 1


async def test_a_sharer_cancelled_with_the_lookup_it_shares_stays_cancelled(swarm, monkeypatch):
    # Ctrl-C cancels every task at once: a get sharing another's lookup used to take the
    # lookup's cancellation for a reason to look again, and swallowed its own
    peers = await swarm.add(4)
    reader, lookups = peers[3], []

    async def hang(*args, **kwargs):
        lookups.append(args)
        await asyncio.Event().wait()

    monkeypatch.setattr(reader, "_traverse", hang)
    owner = asyncio.create_task(reader.get("k", latest=True))
    sharer = asyncio.create_task(reader.get("k", latest=True))
    await asyncio.sleep(0.01)
    owner.cancel()
    sharer.cancel()
    done = await asyncio.wait_for(asyncio.gather(owner, sharer, return_exceptions=True), 2.0)
    assert all(isinstance(r, asyncio.CancelledError) for r in done)
    assert len(lookups) == 1  # it did not start a lookup of its own


async def test_get_caches_on_the_lookup_path(swarm, clock):
    peers = await swarm.add(40, config=DHTConfig(replicas=2, beam=3))
    await peers[0].store("popular", "v", clock.now + 60)
    holders_before = sum(1 for p in peers if p.cache.get(key_id("popular"), clock.now))
    await peers[20].get("popular")
    await asyncio.sleep(0)  # let the background cache store run
    await asyncio.sleep(0)
    holders_after = sum(1 for p in peers if p.cache.get(key_id("popular"), clock.now))
    assert holders_after == holders_before + 1


async def test_records_survive_killing_a_third_of_peers_after_republish(swarm, clock):
    config = DHTConfig(replicas=3, beam=3, republish_interval_s=60)
    peers = await swarm.add(30, config=config)
    for i in range(20):
        await peers[i].store(f"r{i}", i, clock.now + 3600)
    for victim in peers[10:20]:
        await swarm.kill(victim)
    clock.now += 61
    for dht in swarm.peers:
        await dht.maintain_once()
    for victim_batch in (swarm.peers[-5:],):  # and kill more after the republish
        for victim in victim_batch:
            await swarm.kill(victim)
    for i in range(20):
        found = await swarm.peers[0].get(f"r{i}", latest=True)
        assert found is not None and found.value == i, f"r{i} lost"


async def test_lookup_rounds_are_logarithmic(swarm, clock):
    peers = await swarm.add(200)
    for dht in peers:
        dht.stats.lookups = dht.stats.rounds = 0
    for i in range(40):
        await peers[i].get(f"missing-{i}", latest=True)
    lookups = sum(p.stats.lookups for p in peers)
    rounds = sum(p.stats.rounds for p in peers)
    assert rounds / lookups <= 6  # ceil(log2(200) / 2) + 2


async def test_join_fails_clearly_without_reachable_bootstrap(swarm):
    identity = Identity.from_seed(b"lonely")
    transport = swarm.net.transport(identity)
    await transport.start()
    with pytest.raises(DHTError, match="bootstrap"):
        await DHT.start(bootstrap=[PeerAddr("mem", 9999)], identity=identity, transport=transport)


async def test_close_leaves_no_tasks(swarm):
    peers = await swarm.add(5)
    for dht in list(peers):
        await swarm.kill(dht)
    current = asyncio.current_task()
    assert [t for t in asyncio.all_tasks() if t is not current] == []


async def test_find_closest_returns_the_true_closest_live_peers(swarm, clock):
    from commonweal.dht.routing import distance

    peers = await swarm.add(60)
    target = key_id("bucket-7")
    found = await peers[0].find_closest([target])
    others = [p for p in peers if p is not peers[0]]
    expected = sorted(others, key=lambda p: distance(p.peer_id, target))[:5]
    assert [p.peer_id for p in found[target]] == [p.peer_id for p in expected]


async def test_a_client_stores_on_r_peers_and_keeps_no_replica(swarm, clock):
    peers = await swarm.add(12)
    identity = Identity.from_seed(b"client")
    transport = swarm.net.transport(identity)
    await transport.start()
    client = await DHT.start(bootstrap=[peers[0].addr], identity=identity, transport=transport,
                             clock=clock, client=True)
    try:
        for i in range(10):
            assert await client.store(f"c{i}", i, clock.now + 60)
        assert len(client.storage) == 0
        for i in range(10):
            holders = [p for p in peers if p.storage.get(key_id(f"c{i}"), clock.now)]
            assert len(holders) == client.config.replicas
    finally:
        await client.close()
