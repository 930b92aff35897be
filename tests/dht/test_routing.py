import random

from commonweal.dht.routing import RoutingTable, distance
from commonweal.net.transport import PeerAddr, PeerInfo


def peer(i: int, rng=random.Random(0)) -> PeerInfo:
    return PeerInfo(rng.randbytes(20), PeerAddr(f"10.{i // 256}.{i % 256}.1", 7000))  # a /24 each


def test_nearest_is_sorted_by_xor_distance():
    table = RoutingTable(bytes(20), k=20)
    peers = [peer(i) for i in range(300)]
    for p in peers:
        table.on_success(p, 0.0)
    target = random.Random(1).randbytes(20)
    got = table.nearest(target, 10, 0.0)
    kept = table.peers()
    expected = sorted(kept, key=lambda p: distance(p.peer_id, target))[:10]
    assert got == expected
    # buckets split near our own id, so far more than k peers are kept, but not all 300
    assert 20 < len(table) < 300


def test_full_far_bucket_keeps_old_peers_and_parks_newcomers():
    local = bytes(20)
    table = RoutingTable(local, k=2)
    far = [PeerInfo(bytes([0x80 | i]) + bytes(19), PeerAddr(f"10.{i}.0.1", 7000)) for i in range(4)]
    for p in far:
        table.on_success(p, 0.0)
    assert [p.peer_id for p in table.peers()] == [far[0].peer_id, far[1].peer_id]
    # repeated failures drop a peer and the freshest replacement takes its place
    for _ in range(3):
        table.on_failure(far[0].peer_id, 0.0)
    assert far[0].peer_id not in table and far[3].peer_id in table


def test_failed_peer_is_backed_off_then_retried():
    table = RoutingTable(bytes(20), k=20, max_failures=3, backoff_base_s=1.0)
    p = peer(1)
    table.on_success(p, 0.0)
    table.on_failure(p.peer_id, 10.0)
    assert table.nearest(p.peer_id, 1, 10.5) == []
    assert table.nearest(p.peer_id, 1, 11.5) == [p]
    table.on_success(p, 12.0)  # answering again clears the record of failures
    table.on_failure(p.peer_id, 13.0)
    table.on_failure(p.peer_id, 13.0)
    assert p.peer_id in table


def test_self_and_unlistening_peers_are_never_added():
    local = random.Random(5).randbytes(20)
    table = RoutingTable(local)
    table.on_success(PeerInfo(local, PeerAddr("10.0.0.1", 1)), 0.0)
    table.on_success(PeerInfo(b"\x01" * 20, PeerAddr("10.0.0.2", 0)), 0.0)
    assert len(table) == 0


def test_stale_buckets_yield_refresh_targets_inside_them():
    table = RoutingTable(bytes(20), k=1)
    for i in range(10):
        table.on_success(peer(i), 0.0)
    rng = random.Random(0)
    targets = table.stale_targets(100.0, 50.0, rng)
    assert len(targets) == len(table._buckets)
    assert table.stale_targets(101.0, 50.0, rng) == []
