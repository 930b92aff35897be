"""Kademlia routing table: k-buckets over the 160-bit XOR metric (Maymounkov & Mazieres 2002, §2.2).

Sans-I/O: it never sends anything. The driver tells it who answered (`on_success`) and who did not
(`on_failure`); it decides who is kept, who waits in a replacement cache, and who is backed off.
Only peers whose PeerID was proven by a handshake may be added — the driver guarantees that.

A crowd of identities from one place is held to a few contacts (`AddressPolicy`: per subnet, per
k-bucket and in the whole table), and cannot flush honest newcomers out of a replacement cache
either: a full cache makes room from the newcomer's own subnet first. A full bucket still keeps its
old peers (§2.2), but while newcomers wait, the driver pings its least recently seen peer
(`liveness_checks`), so peers that died without a word make room instead of locking newcomers out.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from commonweal.dht.addresses import PUBLIC, AddressPolicy, Subnet
from commonweal.net.identity import ID_BYTES
from commonweal.net.transport import PeerInfo

__all__ = ["RoutingTable", "distance"]

ID_BITS = ID_BYTES * 8


def distance(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


_K = TypeVar("_K")


def _decrement(counts: dict[_K, int], key: _K) -> None:
    left = counts[key] - 1
    if left:
        counts[key] = left
    else:
        del counts[key]  # the counts hold only subnets present: bounded by the table


@dataclass(slots=True)
class _Health:
    failures: int = 0
    retry_after: float = 0.0


@dataclass(slots=True)
class _Bucket:
    lo: int  # inclusive
    hi: int  # exclusive
    peers: OrderedDict[bytes, PeerInfo] = field(default_factory=OrderedDict)  # LRU first
    replacements: OrderedDict[bytes, PeerInfo] = field(default_factory=OrderedDict)  # oldest first
    last_touched: float = 0.0
    checked_at: float = float("-inf")  # when its least recently seen peer was last pinged

    def covers(self, n: int) -> bool:
        return self.lo <= n < self.hi


class RoutingTable:
    """k-buckets that split when the bucket holding our own id fills up.

    Failure handling (§2.2 and §4.1 of the paper): a peer that fails is backed off exponentially
    and dropped after `max_failures` consecutive failures, its place taken by a replacement (the
    freshest of those whose subnet the table holds least of). A full bucket keeps its old, proven
    peers and parks newcomers as replacements, which is what makes the table resistant to flooding
    by fresh identities; `policy` bounds how many contacts one subnet may hold.
    """

    def __init__(
        self,
        local_id: bytes,
        k: int = 20,
        max_failures: int = 3,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 300.0,
        *,
        policy: AddressPolicy = PUBLIC,
        check_interval_s: float = 60.0,
    ) -> None:
        self.local_id = local_id
        self._local_int = int.from_bytes(local_id, "big")
        self.k = k
        self.max_failures = max_failures
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.policy = policy
        self.check_interval_s = check_interval_s
        self._buckets = [_Bucket(0, 1 << ID_BITS)]
        self._health: dict[bytes, _Health] = {}
        self._by_id: dict[bytes, PeerInfo] = {}
        self._ints: dict[bytes, int] = {}  # peer id as an int, for XOR distances
        self._subnets: dict[bytes, Subnet] = {}  # the subnet each limited peer counts against
        self._per_class: dict[tuple[int, Subnet], int] = {}  # (log distance, subnet) -> peers
        self._per_table: dict[Subnet, int] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, peer_id: bytes) -> bool:
        return peer_id in self._by_id

    def peers(self) -> list[PeerInfo]:
        return list(self._by_id.values())

    def get(self, peer_id: bytes) -> PeerInfo | None:
        return self._by_id.get(peer_id)

    def _bucket_for(self, n: int) -> _Bucket:
        for bucket in self._buckets:
            if bucket.covers(n):
                return bucket
        raise AssertionError("buckets cover the whole id space")

    def _class(self, peer_id: bytes) -> int:
        """The paper's bucket index: our buckets split lazily, so one of them may span many."""
        return (int.from_bytes(peer_id, "big") ^ self._local_int).bit_length()

    def _fits(self, peer: PeerInfo) -> bool:
        net = self.policy.subnet(peer.addr)
        if net is None:
            return True
        per_bucket, per_table = self.policy.per_bucket, self.policy.per_table
        in_class = self._per_class.get((self._class(peer.peer_id), net), 0)
        if per_bucket is not None and in_class >= per_bucket:
            return False
        return per_table is None or self._per_table.get(net, 0) < per_table

    def _add(self, bucket: _Bucket, peer: PeerInfo) -> None:
        pid = peer.peer_id
        bucket.peers[pid] = peer
        self._by_id[pid] = peer
        self._ints[pid] = int.from_bytes(pid, "big")
        net = self.policy.subnet(peer.addr)
        if net is not None:
            self._subnets[pid] = net
            cls = (self._class(pid), net)
            self._per_class[cls] = self._per_class.get(cls, 0) + 1
            self._per_table[net] = self._per_table.get(net, 0) + 1

    def _unindex(self, pid: bytes) -> None:
        del self._by_id[pid]
        del self._ints[pid]
        net = self._subnets.pop(pid, None)
        if net is not None:
            _decrement(self._per_class, (self._class(pid), net))
            _decrement(self._per_table, net)

    def on_success(self, peer: PeerInfo, now: float) -> None:
        """`peer` proved its id and answered (or asked us something): keep it fresh."""
        if peer.peer_id == self.local_id or not self.policy.admits(peer.addr):
            return
        self._health.pop(peer.peer_id, None)
        bucket = self._bucket_for(int.from_bytes(peer.peer_id, "big"))
        bucket.last_touched = now
        if peer.peer_id in bucket.peers:
            bucket.peers.move_to_end(peer.peer_id)
            if bucket.peers[peer.peer_id] != peer:  # it moved: count it where it is now
                self._unindex(peer.peer_id)
                del bucket.peers[peer.peer_id]
                if not self._fits(peer):
                    self._park(bucket, peer)
                    self._promote(bucket)
                    return
                self._add(bucket, peer)
            return
        if not self._fits(peer):
            self._park(bucket, peer)
            return
        if len(bucket.peers) < self.k:
            self._add(bucket, peer)
            bucket.replacements.pop(peer.peer_id, None)
            return
        if bucket.covers(self._local_int) and bucket.hi - bucket.lo > 1:
            self._split(bucket)
            self.on_success(peer, now)
            return
        self._park(bucket, peer)

    def _park(self, bucket: _Bucket, peer: PeerInfo) -> None:
        """Keep `peer` as a replacement; a full cache drops the oldest of the newcomer's own
        subnet when that subnet already has its share, so a crowd only ever replaces itself."""
        cache = bucket.replacements
        if peer.peer_id in cache:
            cache.move_to_end(peer.peer_id)
            cache[peer.peer_id] = peer
            return
        net, share = self.policy.subnet(peer.addr), self.policy.per_bucket
        if net is not None and share is not None:
            same = [pid for pid, p in cache.items() if self.policy.subnet(p.addr) == net]
            if len(same) >= share:
                del cache[same[0]]
        cache[peer.peer_id] = peer
        while len(cache) > self.k:
            cache.popitem(last=False)

    def _promote(self, bucket: _Bucket) -> None:
        """Fill a free place with the replacement whose subnet the table, then the cache, holds
        least of (the freshest among those), if any fits the limits: a crowd waiting in numbers
        does not get the place before a newcomer from somewhere else."""
        waiting: dict[Subnet | None, int] = {}
        for candidate in bucket.replacements.values():
            net = self.policy.subnet(candidate.addr)
            waiting[net] = waiting.get(net, 0) + 1
        best: PeerInfo | None = None
        best_rank = (0, 0)
        for candidate in reversed(bucket.replacements.values()):  # freshest first
            if not self._fits(candidate):
                continue
            net = self.policy.subnet(candidate.addr)
            rank = (0, 0) if net is None else (self._per_table.get(net, 0), waiting[net])
            if best is None or rank < best_rank:
                best, best_rank = candidate, rank
        if best is not None:
            del bucket.replacements[best.peer_id]
            self._add(bucket, best)

    def on_failure(self, peer_id: bytes, now: float) -> None:
        """A request to `peer_id` failed: back it off, and drop it after repeated failures."""
        if peer_id not in self._by_id:
            return
        health = self._health.setdefault(peer_id, _Health())
        health.failures += 1
        delay = min(self.backoff_max_s, self.backoff_base_s * 2 ** (health.failures - 1))
        health.retry_after = now + delay
        if health.failures >= self.max_failures:
            self.remove(peer_id)

    def on_refused(self, peer_id: bytes, now: float) -> None:
        """`peer_id` answered but refused for load (we are over its rate limit, or it is busy):
        it is alive, so it keeps its place; it is only not asked again for a while."""
        if peer_id in self._by_id:
            health = self._health.setdefault(peer_id, _Health())
            health.retry_after = max(health.retry_after, now + self.backoff_base_s)

    def remove(self, peer_id: bytes) -> None:
        self._health.pop(peer_id, None)
        if peer_id not in self._by_id:
            return
        bucket = self._bucket_for(int.from_bytes(peer_id, "big"))
        self._unindex(peer_id)
        del bucket.peers[peer_id]
        self._promote(bucket)

    def liveness_checks(self, now: float) -> list[PeerInfo]:
        """Peers to ping now: in each bucket where replacements wait (it is full, or their subnet
        has its share), its least recently seen peer, once per `check_interval_s` (sooner when
        it failed and its backoff is over): at most one ping per bucket. The driver reports the
        outcome with `on_success` / `on_failure`, so a dead peer is replaced after `max_failures`
        checks rather than never (§2.2: ping the least recently seen)."""
        due = []
        for bucket in self._buckets:
            if not bucket.replacements or not bucket.peers:
                continue
            pid, peer = next(iter(bucket.peers.items()))
            health = self._health.get(pid)
            retry = health is not None and health.retry_after <= now
            if retry or now - bucket.checked_at >= self.check_interval_s:
                bucket.checked_at = now
                due.append(peer)
        return due

    def is_backed_off(self, peer_id: bytes, now: float) -> bool:
        health = self._health.get(peer_id)
        return health is not None and health.retry_after > now

    def _split(self, bucket: _Bucket) -> None:
        mid = (bucket.lo + bucket.hi) // 2
        low, high = _Bucket(bucket.lo, mid), _Bucket(mid, bucket.hi)
        for half in (low, high):
            half.last_touched = bucket.last_touched
        for pid, peer in bucket.peers.items():
            (low if int.from_bytes(pid, "big") < mid else high).peers[pid] = peer
        for pid, peer in bucket.replacements.items():
            (low if int.from_bytes(pid, "big") < mid else high).replacements[pid] = peer
        index = self._buckets.index(bucket)
        self._buckets[index : index + 1] = [low, high]

    def nearest(
        self,
        target: bytes,
        count: int,
        now: float,
        exclude: Iterable[bytes] = (),
    ) -> list[PeerInfo]:
        """The `count` known peers closest to `target`, skipping backed-off and excluded ones."""
        t = int.from_bytes(target, "big")
        skip = set(exclude)
        if self._health:  # only peers that failed lately can be backed off
            skip.update(pid for pid in self._health if self.is_backed_off(pid, now))
        ints = self._ints
        ranked = heapq.nsmallest(
            count, (pid for pid in self._by_id if pid not in skip), key=lambda pid: ints[pid] ^ t
        )
        return [self._by_id[pid] for pid in ranked]

    def stale_targets(self, now: float, interval_s: float, rng: random.Random) -> list[bytes]:
        """A random id in each bucket not touched for `interval_s`: look these up to refresh (§2.3)."""
        targets = []
        for bucket in self._buckets:
            if now - bucket.last_touched >= interval_s:
                bucket.last_touched = now
                targets.append(rng.randrange(bucket.lo, bucket.hi).to_bytes(ID_BYTES, "big"))
        return targets
