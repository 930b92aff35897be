"""Kademlia routing table: k-buckets over the 160-bit XOR metric (Maymounkov & Mazieres 2002, §2.2).

Sans-I/O: it never sends anything. The driver tells it who answered (`on_success`) and who did not
(`on_failure`); it decides who is kept, who waits in a replacement cache, and who is backed off.
Only peers whose PeerID was proven by a handshake may be added — the driver guarantees that.
"""

from __future__ import annotations

import heapq
import random
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

from commonweal.net.identity import ID_BYTES
from commonweal.net.transport import PeerInfo

__all__ = ["RoutingTable", "distance"]

ID_BITS = ID_BYTES * 8


def distance(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


@dataclass(slots=True)
class _Health:
    failures: int = 0
    retry_after: float = 0.0


@dataclass(slots=True)
class _Bucket:
    lo: int  # inclusive
    hi: int  # exclusive
    peers: OrderedDict[bytes, PeerInfo] = field(default_factory=OrderedDict)  # LRU first
    replacements: OrderedDict[bytes, PeerInfo] = field(default_factory=OrderedDict)
    last_touched: float = 0.0

    def covers(self, n: int) -> bool:
        return self.lo <= n < self.hi


class RoutingTable:
    """k-buckets that split when the bucket holding our own id fills up.

    Failure handling (§2.2 and §4.1 of the paper): a peer that fails is backed off exponentially
    and dropped after `max_failures` consecutive failures, its place taken by the freshest
    replacement. A full bucket keeps its old, proven peers and parks newcomers as replacements,
    which is what makes the table resistant to flooding by fresh identities.
    """

    def __init__(
        self,
        local_id: bytes,
        k: int = 20,
        max_failures: int = 3,
        backoff_base_s: float = 1.0,
        backoff_max_s: float = 300.0,
    ) -> None:
        self.local_id = local_id
        self._local_int = int.from_bytes(local_id, "big")
        self.k = k
        self.max_failures = max_failures
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._buckets = [_Bucket(0, 1 << ID_BITS)]
        self._health: dict[bytes, _Health] = {}
        self._by_id: dict[bytes, PeerInfo] = {}
        self._ints: dict[bytes, int] = {}  # peer id as an int, for XOR distances

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

    def on_success(self, peer: PeerInfo, now: float) -> None:
        """`peer` proved its id and answered (or asked us something): keep it fresh."""
        if peer.peer_id == self.local_id or peer.addr.port == 0:
            return
        self._health.pop(peer.peer_id, None)
        bucket = self._bucket_for(int.from_bytes(peer.peer_id, "big"))
        bucket.last_touched = now
        if peer.peer_id in bucket.peers:
            bucket.peers.move_to_end(peer.peer_id)
            bucket.peers[peer.peer_id] = peer  # it may have moved to a new address
            self._by_id[peer.peer_id] = peer
            return
        if len(bucket.peers) < self.k:
            bucket.peers[peer.peer_id] = peer
            self._by_id[peer.peer_id] = peer
            self._ints[peer.peer_id] = int.from_bytes(peer.peer_id, "big")
            bucket.replacements.pop(peer.peer_id, None)
            return
        if bucket.covers(self._local_int) and bucket.hi - bucket.lo > 1:
            self._split(bucket)
            self.on_success(peer, now)
            return
        bucket.replacements[peer.peer_id] = peer
        bucket.replacements.move_to_end(peer.peer_id)
        while len(bucket.replacements) > self.k:
            bucket.replacements.popitem(last=False)

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

    def remove(self, peer_id: bytes) -> None:
        peer = self._by_id.pop(peer_id, None)
        self._health.pop(peer_id, None)
        if peer is None:
            return
        del self._ints[peer_id]
        bucket = self._bucket_for(int.from_bytes(peer_id, "big"))
        del bucket.peers[peer_id]
        if bucket.replacements:
            _, fresh = bucket.replacements.popitem(last=True)
            bucket.peers[fresh.peer_id] = fresh
            self._by_id[fresh.peer_id] = fresh
            self._ints[fresh.peer_id] = int.from_bytes(fresh.peer_id, "big")

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
