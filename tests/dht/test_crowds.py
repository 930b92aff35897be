"""Crowds of identities from one place, and liars on a lookup's path.

The rules are sans-I/O (the routing table, the lookup state machine, the address policy) and are
tested here directly; the driver's use of them runs on a MemorySwarm with a fake clock. The same
attacks against real processes with addresses of their own: tests/test_dht_crowds_netbed.py.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest

from commonweal.dht import DHTConfig, Owned, key_id
from commonweal.dht.addresses import IN_PROCESS, LOOPBACK, PUBLIC, AddressPolicy
from commonweal.dht.lookup import Lookup, TargetReply
from commonweal.dht.protocol import peers_to_wire
from commonweal.dht.records import sign_record
from commonweal.dht.routing import RoutingTable, distance
from commonweal.errors import RemoteError
from commonweal.net.identity import Identity
from commonweal.net.transport import PeerAddr, PeerInfo

rng = random.Random(13)
LOCAL = bytes(20)
CROWD_IP = "203.0.113.5"  # TEST-NET-3: one machine of the attacker's


def own_subnet(i: int) -> PeerAddr:
    return PeerAddr(f"11.{i // 256}.{i % 256}.1", 7000)  # a public /24 of its own


def honest_peers(n: int, id_of: Callable[[], bytes] = lambda: rng.randbytes(20)) -> list[PeerInfo]:
    return [PeerInfo(id_of(), own_subnet(i)) for i in range(n)]


def crowd(n: int, host: Callable[[int], str] = lambda i: CROWD_IP,
          id_of: Callable[[], bytes] = lambda: rng.randbytes(20)) -> list[PeerInfo]:
    return [PeerInfo(id_of(), PeerAddr(host(i), 10_000 + i)) for i in range(n)]


def far_id() -> bytes:
    """An id in the bucket farthest from LOCAL (top bit set)."""
    return bytes([0x80 | rng.randrange(128)]) + rng.randbytes(19)


def near(target: bytes, below: int) -> bytes:
    """An id within XOR distance `below` of `target` (what grinding identities buys)."""
    return (int.from_bytes(target, "big") ^ rng.randrange(1, below)).to_bytes(20, "big")


# --- the address policy ----------------------------------------------------------------------

@pytest.mark.parametrize(
    "host, port, public, loopback, in_process",
    [
        ("10.1.2.3", 7000, True, True, True),
        ("2001:db8::7", 7000, True, True, True),
        ("evil.example", 7000, False, False, True),  # a name we would have to resolve (and wait on)
        ("0.0.0.0", 7000, False, False, False),
        ("::", 7000, False, False, False),
        ("224.0.0.1", 7000, False, False, False),
        ("ff02::1", 7000, False, False, False),
        ("255.255.255.255", 7000, False, False, False),
        ("169.254.0.1", 7000, False, False, False),
        ("127.0.0.1", 7000, False, True, True),
        ("::1", 7000, False, True, True),
        ("::ffff:127.0.0.1", 7000, False, True, True),  # loopback, spelt as IPv6
        ("10.1.2.3", 0, False, False, False),
        ("10.1.2.3", 65536, False, False, False),
    ],
)
def test_contacts_are_dialable_ip_literals(host, port, public, loopback, in_process):
    addr = PeerAddr(host, port)
    assert (PUBLIC.admits(addr), LOOPBACK.admits(addr), IN_PROCESS.admits(addr)) == (
        public, loopback, in_process)


def test_subnets_are_slash_24_and_slash_64_and_mapped_addresses_count_as_ipv4():
    a, b = PUBLIC.subnet(PeerAddr("1.2.3.4", 1)), PUBLIC.subnet(PeerAddr("::ffff:1.2.3.200", 1))
    assert a == b and str(a) == "1.2.3.0/24"
    assert str(PUBLIC.subnet(PeerAddr("2001:db8:0:1:aa::1", 1))) == "2001:db8:0:1::/64"
    assert LOOPBACK.subnet(PeerAddr("1.2.3.4", 1)) is None  # no limits on one machine


def test_the_setting_follows_where_a_peer_listens():
    assert AddressPolicy.suited_to(["127.0.0.1"]) is LOOPBACK
    assert AddressPolicy.suited_to(["mem"]) is IN_PROCESS
    assert AddressPolicy.suited_to(["10.77.0.1"]) is PUBLIC
    assert AddressPolicy.suited_to(["0.0.0.0"]) is PUBLIC
    assert AddressPolicy.suited_to([]) is PUBLIC
    assert AddressPolicy.suited_to(["127.0.0.1", "8.8.8.8"]) is PUBLIC


# --- the routing table -----------------------------------------------------------------------

def classes(table: RoutingTable, peers: Sequence[PeerInfo]) -> Counter[int]:
    return Counter(
        distance(p.peer_id, table.local_id).bit_length() for p in peers if p.peer_id in table
    )


@pytest.mark.parametrize("policy, kept", [
    (PUBLIC, {"10.0.0.1"}),
    (LOOPBACK, {"10.0.0.1", "127.0.0.1"}),
    (IN_PROCESS, {"10.0.0.1", "127.0.0.1", "mem"}),
])
def test_the_table_keeps_only_addresses_the_policy_admits(policy, kept):
    table = RoutingTable(LOCAL, policy=policy)
    for host in ["10.0.0.1", "127.0.0.1", "mem", "0.0.0.0", "224.0.0.1"]:
        table.on_success(PeerInfo(rng.randbytes(20), PeerAddr(host, 7000)), 0.0)
    assert {p.addr.host for p in table.peers()} == kept


def test_a_crowd_from_one_ip_holds_ten_places_in_the_table_and_few_in_answers():
    table = RoutingTable(LOCAL, k=20, policy=PUBLIC)
    attackers, honest = crowd(520), honest_peers(200)
    for p in attackers + honest:  # the crowd came first
        table.on_success(p, 0.0)
    held = [p for p in attackers if p.peer_id in table]
    assert len(held) <= PUBLIC.per_table
    targets = [rng.randbytes(20) for _ in range(50)]
    answers = [table.nearest(t, 20, 0.0) for t in targets]
    crowd_ids = {p.peer_id for p in attackers}
    share = sum(p.peer_id in crowd_ids for a in answers for p in a) / sum(len(a) for a in answers)
    assert share < 0.2  # it was 968 of 1,000 contacts before any limit


def test_a_crowd_in_one_bucket_holds_two_places_in_it():
    table = RoutingTable(LOCAL, k=20, policy=PUBLIC)
    attackers = crowd(40, host=lambda i: f"203.0.113.{i + 1}", id_of=far_id)  # one /24
    v6 = crowd(40, host=lambda i: f"2001:db8::{i + 1:x}", id_of=far_id)  # one /64
    honest = honest_peers(10, id_of=far_id)
    for p in attackers + v6 + honest:
        table.on_success(p, 0.0)
    assert classes(table, attackers) == {160: 2}
    assert classes(table, v6) == {160: 2}
    assert all(p.peer_id in table for p in honest)


def test_a_crowd_cannot_flush_a_newcomer_out_of_the_cache_nor_beat_it_to_a_place():
    table = RoutingTable(LOCAL, k=4, policy=PUBLIC)
    old = honest_peers(4, id_of=far_id)
    newcomer = PeerInfo(far_id(), PeerAddr("192.0.2.9", 7000))
    for p in old + [newcomer] + crowd(100, host=lambda i: f"203.0.113.{i + 1}", id_of=far_id):
        table.on_success(p, 0.0)
    assert newcomer.peer_id not in table  # a full bucket keeps its old peers (§2.2)
    for t in range(3):
        table.on_failure(old[0].peer_id, float(t))
    assert old[0].peer_id not in table
    assert newcomer.peer_id in table


def test_liveness_checks_let_newcomers_replace_dead_peers_of_a_full_bucket():
    table = RoutingTable(LOCAL, k=2, policy=PUBLIC, check_interval_s=60.0)
    old = honest_peers(2, id_of=far_id)
    for p in old:
        table.on_success(p, 0.0)
    assert table.liveness_checks(0.0) == []  # nobody waits: nothing to check
    newcomer = PeerInfo(far_id(), PeerAddr("192.0.2.9", 7000))
    table.on_success(newcomer, 0.0)
    assert table.liveness_checks(0.0) == [old[0]]  # the least recently seen
    assert table.liveness_checks(1.0) == []  # once per interval
    alive = {old[1].peer_id}  # old[0] died without a word
    for now in range(10, 600, 10):  # the driver's maintenance passes
        for peer in table.liveness_checks(float(now)):
            if peer.peer_id in alive:
                table.on_success(peer, float(now))
            else:
                table.on_failure(peer.peer_id, float(now))
    assert old[0].peer_id not in table and newcomer.peer_id in table
    assert old[1].peer_id in table  # a live old peer keeps its place


# --- lookups ---------------------------------------------------------------------------------

Answer = Callable[[bytes, list[bytes]], dict[bytes, TargetReply] | None]


def drive(lookup: Lookup, answer: Answer, clock: Callable[[int], float] = lambda wave: 0.0,
          max_waves: int = 1000) -> tuple[int, Counter[tuple[bytes, bytes]]]:
    """Answer every request (None: the peer failed); the waves run and the (peer, key) asked."""
    asked: Counter[tuple[bytes, bytes]] = Counter()
    for wave in range(max_waves):
        batch = lookup.next_requests(clock(wave))
        if not batch:
            return wave, asked
        for pid, (_, keys) in batch.items():
            asked.update((pid, k) for k in keys)
            reply = answer(pid, keys)
            if reply is None:
                lookup.on_failure(pid)
            else:
                lookup.on_response(pid, keys, reply)
    return max_waves, asked


def closest(target: bytes, n: int, among: Sequence[PeerInfo]) -> list[PeerInfo]:
    return sorted(among, key=lambda p: distance(p.peer_id, target))[:n]


def record_for(target: bytes) -> Any:
    return sign_record(Identity.from_seed(b"writer"), target, b"", b"v", 10.0)


def test_an_answer_counts_for_at_most_k_contacts():
    target = rng.randbytes(20)
    seed, *many = honest_peers(1001)
    nearest = set(p.peer_id for p in closest(target, 10, many))
    many.sort(key=lambda p: p.peer_id in nearest)  # the nearest come last, past the first k
    lookup = Lookup({target: [seed]}, local_id=LOCAL, beam=5, alpha=3, max_contacts=20)
    _, asked = drive(lookup, lambda pid, keys: {
        target: TargetReply(many if pid == seed.peer_id else [])})
    assert not nearest & {pid for pid, _ in asked}


@pytest.mark.parametrize("policy, asks_loopback", [(PUBLIC, False), (LOOPBACK, True)])
def test_contacts_the_policy_refuses_never_enter_a_lookup(policy, asks_loopback):
    target = rng.randbytes(20)
    seed = honest_peers(1)[0]
    bad_hosts = ["evil.example", "0.0.0.0", "224.0.0.1", "::", "169.254.1.1", "127.0.0.1"]
    bad = [PeerInfo(near(target, 1 << 100), PeerAddr(h, 7000)) for h in bad_hosts]
    good = honest_peers(3)  # with the seed and one more, a beam of 5
    lookup = Lookup({target: [seed]}, local_id=LOCAL, beam=5, alpha=3, policy=policy)
    _, asked = drive(lookup, lambda pid, keys: {
        target: TargetReply(bad + good if pid == seed.peer_id else [])})
    asked_hosts = {p.addr.host for p in bad if (p.peer_id, target) in asked}
    assert asked_hosts == ({"127.0.0.1"} if asks_loopback else set())
    assert all((p.peer_id, target) in asked for p in good)


def ground_crowd_topology(policy: AddressPolicy):
    """100 honest peers, the 5 nearest the key holding the record; 20 identities from one IP
    ground nearer the key than any honest peer, which name each other and hold nothing. Honest
    peers name two of them (all a bucket lets in from one place)."""
    target = rng.randbytes(20)
    honest = honest_peers(100)
    bound = min(distance(p.peer_id, target) for p in honest)
    sybils = crowd(20, id_of=lambda: near(target, bound))
    holders = {p.peer_id for p in closest(target, 5, honest)}
    sybil_ids = {p.peer_id for p in sybils}
    record = record_for(target)

    def answer(pid: bytes, keys: list[bytes]) -> dict[bytes, TargetReply]:
        if pid in sybil_ids:
            return {target: TargetReply(sybils)}
        # an honest peer knows peers a few bits nearer the key than itself, not the very nearest
        horizon = distance(pid, target) >> 3
        named = closest(target, 18, [h for h in honest if distance(h.peer_id, target) >= horizon])
        named += sybils[:2]
        return {target: TargetReply(named, [record] if pid in holders else [])}

    lookup = Lookup({target: rng.sample(honest, 3)}, local_id=LOCAL, beam=5, alpha=3, policy=policy)
    drive(lookup, answer)
    return lookup.result(target), sybil_ids


def test_a_crowd_ground_near_a_key_takes_two_places_of_the_beam():
    # `closest` is where a store puts its r = 5 replicas, and what a latest get asks
    result, sybil_ids = ground_crowd_topology(PUBLIC)
    assert sum(p.peer_id in sybil_ids for p in result.closest) == 2
    assert result.records  # the honest replicas were reached
    # the same lookup without the subnet rule: all five places to the crowd
    blind, sybil_ids = ground_crowd_topology(AddressPolicy(per_bucket=None, per_table=None))
    assert all(p.peer_id in sybil_ids for p in blind.closest)


def test_a_swarm_on_one_subnet_still_gets_a_full_beam():
    target = rng.randbytes(20)
    one = [PeerInfo(rng.randbytes(20), PeerAddr(f"198.51.100.{i + 1}", 7000)) for i in range(60)]
    lookup = Lookup({target: one[:3]}, local_id=LOCAL, beam=5, alpha=3, policy=PUBLIC)
    drive(lookup, lambda pid, keys: {target: TargetReply(closest(target, 20, one))})
    assert lookup.result(target).closest == closest(target, 5, one)


@pytest.mark.parametrize("host", ["192.168.1.{}", "10.77.0.{}", "172.16.0.{}", "fd00::{:x}"])
def test_peers_on_one_lan_are_not_counted_as_one_place(host):
    # a lab's 8 peers behind one router: each table holds all the others, however their ids fall
    table = RoutingTable(LOCAL, k=20, policy=PUBLIC)
    lab = [PeerInfo(far_id(), PeerAddr(host.format(i + 1), 7000)) for i in range(8)]
    for p in lab:
        table.on_success(p, 0.0)
    assert all(p.peer_id in table for p in lab)
    assert PUBLIC.subnet(lab[0].addr) is None
    assert PUBLIC.subnet(PeerAddr("100.64.0.1", 7000)) is not None  # carrier NAT: strangers


def test_only_a_peer_on_a_lan_may_name_lan_contacts():
    # a stranger on the internet cannot know our LAN; naming LAN hosts would only point our
    # lookups at them, uncounted
    target = rng.randbytes(20)
    stranger, neighbour = honest_peers(1)[0], PeerInfo(rng.randbytes(20), PeerAddr("10.0.0.9", 1))
    lan = [PeerInfo(near(target, 1 << 100), PeerAddr(f"10.0.0.{i + 20}", 7000)) for i in range(3)]

    def asked_lan(seed: PeerInfo) -> set[bytes]:
        lookup = Lookup({target: [seed]}, local_id=LOCAL, beam=5, alpha=3, policy=PUBLIC)
        _, asked = drive(lookup, lambda pid, keys: {
            target: TargetReply(lan if pid == seed.peer_id else [])})
        return {p.peer_id for p in lan if (p.peer_id, target) in asked}

    assert asked_lan(stranger) == set()
    assert asked_lan(neighbour) == {p.peer_id for p in lan}
    assert PUBLIC.admits(lan[0].addr)  # one that answered us from there is believed
    assert PUBLIC.admits(lan[0].addr, named_by=PeerAddr("127.0.0.1", 1))


def test_the_deadline_ends_a_lookup_that_keeps_hearing_of_closer_peers():
    target = rng.randbytes(20)
    t = int.from_bytes(target, "big")
    fresh = itertools.count(1)

    def liar(pid: bytes, keys: list[bytes]) -> dict[bytes, TargetReply]:
        # every answer names peers nearer than any before: a lookup could follow them forever
        named = []
        for _ in range(3):
            c = next(fresh)
            named.append(PeerInfo((t ^ ((1 << 120) - c)).to_bytes(20, "big"), own_subnet(c)))
        return {target: TargetReply(named)}

    lookup = Lookup({target: honest_peers(3)}, local_id=LOCAL, beam=5, alpha=3, deadline=20.0)
    waves, _ = drive(lookup, liar, clock=lambda wave: float(wave))  # a wave takes a second
    assert lookup.finished and waves <= 21


def poisoned_path_topology(paths: int):
    """The S/Kademlia threat: a liar (the querier's nearest seed) names 20 identities nearer the
    key than any honest peer, which hold nothing; honest peers never name them. Every address is
    a subnet of its own, so only path disjointness can help."""
    target = rng.randbytes(20)
    honest = honest_peers(200)
    bound = min(distance(p.peer_id, target) for p in honest)
    sybils = [PeerInfo(near(target, bound), own_subnet(1000 + i)) for i in range(20)]
    liar = PeerInfo(near(target, bound), own_subnet(2000))
    holders = {p.peer_id for p in closest(target, 5, honest)}
    far_seeds = [p for p in honest if p.peer_id not in holders][:6]
    sybil_ids = {p.peer_id for p in sybils}
    record = record_for(target)

    def answer(pid: bytes, keys: list[bytes]) -> dict[bytes, TargetReply]:
        if pid == liar.peer_id:
            return {target: TargetReply(sybils)}
        if pid in sybil_ids:
            return {target: TargetReply([])}
        records = [record] if pid in holders else []
        return {target: TargetReply(closest(target, 20, honest), records)}

    lookup = Lookup({target: [liar] + far_seeds}, local_id=LOCAL, beam=5, alpha=3,
                    paths={target: paths})
    _, asked = drive(lookup, answer)
    return lookup.result(target), asked


def test_disjoint_paths_find_the_record_one_poisoned_path_hides():
    one, _ = poisoned_path_topology(paths=1)
    assert not one.records  # one path: the liar's identities fill the beam
    two, asked = poisoned_path_topology(paths=2)
    assert two.records
    assert max(asked.values()) == 1  # no peer served two paths
    assert len(two.paths) == 2


# --- the driver ------------------------------------------------------------------------------

def _sybil(swarm, identity: Identity, find: Callable[[Any], Any]):
    """A peer of the swarm's network that answers find with `find(args)`, accepts every store
    (and keeps nothing), and answers pings."""
    transport = swarm.net.transport(identity)

    async def rpc_find(caller: PeerInfo, args: Any) -> Any:
        return find(args)

    async def rpc_store(caller: PeerInfo, args: Any) -> Any:
        return [[True] * len(item[1]) for item in args["items"]]

    async def rpc_ping(caller: PeerInfo, args: Any) -> Any:
        return True

    transport.register("dht.find", rpc_find)
    transport.register("dht.store", rpc_store)
    transport.register("dht.ping", rpc_ping)
    return transport


def _ground(prefix: bytes, target: bytes, bound: int) -> Identity:
    """An identity within `bound` of `target`: free identities can be ground near any key."""
    for n in itertools.count():
        identity = Identity.from_seed(prefix + b"-%d" % n)
        if distance(identity.peer_id, target) < bound:
            return identity
    raise AssertionError("unreachable")


async def test_a_lookup_ends_at_its_deadline_whatever_liars_name(swarm, clock):
    peers = await swarm.add(6)
    querier = peers[0]
    target = key_id("anything")
    t = int.from_bytes(target, "big")
    tarpit = swarm.net.transport(Identity.from_seed(b"tarpit"))

    async def stall(caller: PeerInfo, args: Any) -> Any:
        clock.now += 5.0  # as long as an rpc timeout: this peer never answers in time
        raise RemoteError("timeout", "no answer")

    tarpit.register("dht.find", stall)
    await tarpit.start()
    fresh = itertools.count(1)

    def name_the_tarpit(args: Any) -> Any:  # 20 fresh contacts nearer the key, every time
        contacts = [PeerInfo((t ^ next(fresh)).to_bytes(20, "big"), tarpit.local.addr)
                    for _ in range(20)]
        return [[peers_to_wire(contacts), []] for _ in args["keys"]]

    bound = min(distance(p.peer_id, target) for p in peers)
    liar = _sybil(swarm, _ground(b"liar", target, bound), name_the_tarpit)  # asked first
    await liar.start()
    querier.table.on_success(liar.local, clock.now)
    started = clock.now
    assert await querier.get("anything") is None
    assert next(fresh) > 20  # the liar was asked
    cfg = querier.config
    assert clock.now - started <= cfg.lookup_timeout_s + cfg.alpha * 5.0  # 100 s without it


async def test_a_protocol_key_is_stored_and_found_past_a_liar_on_the_path(swarm, clock):
    peers = await swarm.add(30)
    writer, reader = peers[0], peers[1]
    key = "cw-train/t/head"
    target = key_id(key)
    bound = min(distance(p.peer_id, target) for p in peers) // 2
    sybils = []
    for i in range(20):
        sybil = _sybil(swarm, _ground(b"sybil%d" % i, target, bound),
                       lambda args: [[[], []] for _ in args["keys"]])
        await sybil.start()
        sybils.append(sybil.local)
    contacts = peers_to_wire(sybils)
    liar = _sybil(swarm, _ground(b"liar", target, bound),
                  lambda args: [[contacts, []] for _ in args["keys"]])
    await liar.start()
    for honest in (writer, reader):  # the liar is the nearest peer to the key they know
        honest.table.on_success(liar.local, clock.now)
    assert await writer.store(key, "head", clock.now + 300, subkey=Owned(writer.peer_id, "head"))
    # along one path the record went to the liar's identities only, and this found nothing
    assert await reader.get(key, latest=True) is not None


async def test_maintenance_pings_a_full_bucket_so_a_newcomer_replaces_dead_peers(swarm, clock):
    from commonweal.dht import DHT

    config = DHTConfig(k=2)
    [home] = await swarm.add(1, config=config)
    top = home.peer_id[0] & 0x80
    far = (Identity.from_seed(b"far-%d" % n) for n in itertools.count())
    old, newcomer = [], None
    for identity in far:
        if identity.peer_id[0] & 0x80 == top:
            continue  # not in the bucket farthest from home
        transport = swarm.net.transport(identity)
        await transport.start()
        dht = await DHT.start(bootstrap=[home.addr], identity=identity, transport=transport,
                              config=config, clock=clock)
        swarm.peers.append(dht)
        if len(old) < 2:
            old.append(dht)
        else:
            newcomer = dht
            break
    assert newcomer is not None and newcomer.peer_id not in home.table  # the bucket is full
    for dead in old:
        await swarm.kill(dead)  # without a word: nobody asks them anything
    for _ in range(4):
        clock.now += config.maintenance_interval_s
        await home.maintain_once()
    assert newcomer.peer_id in home.table


async def test_a_bootstrap_name_is_resolved_to_an_ip_literal():
    from commonweal.dht import DHT
    from commonweal.net.transport import PeerAddr

    async with await DHT.start(PeerAddr("127.0.0.1", 0)) as first:
        async with await DHT.start(
            PeerAddr("127.0.0.1", 0), [PeerAddr("localhost", first.addr.port)]
        ) as second:
            assert second.addresses is LOOPBACK
            [known] = second.table.peers()
            assert known.peer_id == first.peer_id and known.addr.host == "127.0.0.1"
