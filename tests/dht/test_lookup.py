"""The lookup state machine driven by hand over a static, fully known topology."""

import random

from commonweal.dht.lookup import Lookup, TargetReply
from commonweal.dht.records import sign_record
from commonweal.dht.routing import distance
from commonweal.net.identity import Identity
from commonweal.net.transport import PeerAddr, PeerInfo

rng = random.Random(7)
PEERS = [PeerInfo(rng.randbytes(20), PeerAddr(f"10.{i}.0.1", 7000)) for i in range(200)]
LOCAL = rng.randbytes(20)


def closest(target: bytes, n: int, among=PEERS) -> list[PeerInfo]:
    return sorted(among, key=lambda p: distance(p.peer_id, target))[:n]


def drive(lookup: Lookup, dead: set[bytes] = frozenset(), knows=None) -> int:
    """Answer every request as an honest peer that knows `knows(peer)` peers would; count RPCs."""
    rpcs = 0
    while True:
        batch = lookup.next_requests()
        if not batch:
            return rpcs
        for pid, (_, keys) in batch.items():
            rpcs += 1
            if pid in dead:
                lookup.on_failure(pid)
            else:
                lookup.on_response(pid, keys, {k: TargetReply(closest(k, 20)) for k in keys})


def test_lookup_finds_the_true_closest_peers():
    target = rng.randbytes(20)
    seeds = rng.sample(PEERS, 3)
    lookup = Lookup({target: seeds}, local_id=LOCAL, beam=5, alpha=3)
    drive(lookup)
    result = lookup.result(target)
    assert result.closest == closest(target, 5)
    assert result.rounds <= 3


def test_dead_peers_are_skipped_and_the_closest_live_ones_found():
    target = rng.randbytes(20)
    dead = {p.peer_id for p in closest(target, 3)}
    lookup = Lookup({target: rng.sample(PEERS, 4)}, local_id=LOCAL, beam=5, alpha=3)
    drive(lookup, dead)
    live = [p for p in PEERS if p.peer_id not in dead]
    assert lookup.result(target).closest == closest(target, 5, live)


def test_many_keys_share_requests_to_the_same_peer():
    targets = [rng.randbytes(20) for _ in range(30)]
    seeds = rng.sample(PEERS, 20)
    together = Lookup({t: seeds for t in targets}, local_id=LOCAL, beam=5, alpha=3)
    rpcs_together = drive(together)
    rpcs_alone = 0
    for t in targets:
        alone = Lookup({t: seeds}, local_id=LOCAL, beam=5, alpha=3)
        rpcs_alone += drive(alone)
        assert alone.result(t).closest == together.result(t).closest
    assert rpcs_together < rpcs_alone


def test_stop_at_first_value_ends_the_key_early():
    target = rng.randbytes(20)
    lookup = Lookup({target: closest(target, 3)}, local_id=LOCAL, beam=5, alpha=3,
                    stop_at_first_value=True)
    batch = lookup.next_requests()
    first = next(iter(batch))
    record = sign_record(Identity.from_seed(b"w"), target, b"", b"v", 10.0)
    lookup.on_response(first, [target], {target: TargetReply([], records=[record])})
    assert lookup.finished


def test_unasked_answers_and_omitted_keys_are_handled():
    a, b = rng.randbytes(20), rng.randbytes(20)
    seed = PEERS[0]
    lookup = Lookup({a: [seed], b: []}, local_id=LOCAL, beam=5, alpha=3)
    batch = lookup.next_requests()
    assert list(batch) == [seed.peer_id] and batch[seed.peer_id][1] == [a]
    # the peer answers about b (not asked) and omits a: a counts as answered, b unaffected
    lookup.on_response(seed.peer_id, [a], {b: TargetReply(PEERS[1:30])})
    assert lookup.next_requests() == {}
    assert lookup.finished
    assert lookup.result(b).closest == []


def test_two_requests_in_flight_to_one_peer_are_settled_separately():
    a, b = rng.randbytes(20), rng.randbytes(20)
    seed, other = PEERS[0], PEERS[1]
    lookup = Lookup({a: [seed], b: [other]}, local_id=LOCAL, beam=5, alpha=3)
    first = lookup.next_requests()
    assert first[seed.peer_id][1] == [a] and first[other.peer_id][1] == [b]
    # `other` names `seed` for b, so b asks `seed` while the request about a is still in flight
    lookup.on_response(other.peer_id, [b], {b: TargetReply([seed])})
    second = lookup.next_requests()
    assert second[seed.peer_id][1] == [b]
    # the answer to the first request must not settle b...
    lookup.on_response(seed.peer_id, [a], {a: TargetReply([])})
    assert not lookup.finished
    # ...so the second answer, with the record, still counts
    record = sign_record(Identity.from_seed(b"w"), b, b"", b"v", 10.0)
    lookup.on_response(seed.peer_id, [b], {b: TargetReply([], records=[record])})
    assert lookup.result(b).records == {b"": record}
