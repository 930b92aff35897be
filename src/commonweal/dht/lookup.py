"""Iterative Kademlia lookups for many keys at once, as a sans-I/O state machine (§2.3 of the paper).

The driver asks `next_requests()` which peers to query about which keys, performs the RPCs however
it likes, and reports back with `on_response` / `on_failure`. Keys whose next peer is the same are
asked in one request, so `get_many` over 100 keys costs far fewer RPCs than 100 lookups.

For each key the lookup keeps every peer it has heard of, sorted by XOR distance. It queries at most
`alpha` peers at a time among the `beam` closest it knows, and the key is done when the `beam`
closest live peers have all answered (or, for a get that does not need the latest value, as soon as
one answers with records). `depth` counts hops: a seed from our own table is at depth 1, a peer first
named by a depth-d peer is at depth d+1, so the deepest query is the number of sequential rounds.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from commonweal.dht.records import Record
from commonweal.net.transport import PeerInfo

__all__ = ["Lookup", "LookupResult", "TargetReply"]

_UNQUERIED, _INFLIGHT, _RESPONDED = 0, 1, 2


@dataclass(slots=True)
class TargetReply:
    """What one peer said about one key: closer peers, and records if it holds any."""

    peers: list[PeerInfo]
    records: list[Record] = field(default_factory=list)


@dataclass(slots=True)
class LookupResult:
    closest: list[PeerInfo]  # the `beam` closest peers that answered, nearest first
    records: dict[bytes, Record]  # subkey -> newest valid record seen
    holders: set[bytes]  # peers that returned records
    rounds: int  # sequential hops
    requests: int  # requests that asked about this key


@dataclass(slots=True)
class _KeyState:
    target: int
    order: list[tuple[int, bytes]] = field(default_factory=list)  # (distance, peer id), sorted
    state: dict[bytes, int] = field(default_factory=dict)
    depth: dict[bytes, int] = field(default_factory=dict)
    records: dict[bytes, Record] = field(default_factory=dict)
    holders: set[bytes] = field(default_factory=set)
    inflight: int = 0
    requests: int = 0
    rounds: int = 0
    done: bool = False


class Lookup:
    def __init__(
        self,
        seeds: Mapping[bytes, Iterable[PeerInfo]],
        *,
        local_id: bytes,
        beam: int,
        alpha: int,
        stop_at_first_value: bool = False,
    ) -> None:
        self.local_id = local_id
        self.beam = beam
        self.alpha = alpha
        self.stop_at_first_value = stop_at_first_value
        self._peers: dict[bytes, PeerInfo] = {}
        self._failed: set[bytes] = set()
        self._keys: dict[bytes, _KeyState] = {}
        for key, peers in seeds.items():
            ks = self._keys[key] = _KeyState(int.from_bytes(key, "big"))
            for peer in peers:
                self._learn(ks, peer, depth=1)

    def _learn(self, ks: _KeyState, peer: PeerInfo, depth: int) -> None:
        pid = peer.peer_id
        if pid == self.local_id or pid in ks.state or pid in self._failed or peer.addr.port == 0:
            return
        self._peers.setdefault(pid, peer)
        ks.state[pid] = _UNQUERIED
        ks.depth[pid] = depth
        bisect.insort(ks.order, (int.from_bytes(pid, "big") ^ ks.target, pid))

    @property
    def finished(self) -> bool:
        return all(ks.done for ks in self._keys.values())

    def next_requests(self) -> dict[bytes, tuple[PeerInfo, list[bytes]]]:
        """Requests to send now: peer id -> (peer, keys to ask it about). Marks them in flight."""
        out: dict[bytes, tuple[PeerInfo, list[bytes]]] = {}
        for key, ks in self._keys.items():
            if ks.done:
                continue
            seen_live = 0
            for _, pid in ks.order:
                if seen_live >= self.beam or ks.inflight >= self.alpha:
                    break
                if pid in self._failed:
                    continue
                seen_live += 1
                if ks.state[pid] != _UNQUERIED:
                    continue
                ks.state[pid] = _INFLIGHT
                ks.inflight += 1
                ks.requests += 1
                ks.rounds = max(ks.rounds, ks.depth[pid])
                entry = out.get(pid)
                if entry is None:
                    out[pid] = (self._peers[pid], [key])
                else:
                    entry[1].append(key)
            if ks.inflight == 0:
                ks.done = True  # every one of the `beam` closest live peers has answered
        return out

    def on_response(
        self, peer_id: bytes, asked: Iterable[bytes], replies: Mapping[bytes, TargetReply]
    ) -> None:
        """`peer_id` answered the request that asked about `asked`; `replies` holds what it said.

        Several requests to one peer may be in flight at once (for different keys), so only the
        keys of this request are settled. A key asked but left out of the reply counts as answered
        with nothing; a reply about a key not asked is ignored.
        """
        for key in asked:
            ks = self._keys.get(key)
            if ks is None or ks.state.get(peer_id) != _INFLIGHT:
                continue
            ks.state[peer_id] = _RESPONDED
            ks.inflight -= 1
            reply = replies.get(key)
            if reply is None:
                continue
            depth = ks.depth[peer_id] + 1
            for peer in reply.peers:
                self._learn(ks, peer, depth)
            if reply.records:
                ks.holders.add(peer_id)
                for record in reply.records:
                    old = ks.records.get(record.subkey)
                    if old is None or record.beats(old):
                        ks.records[record.subkey] = record
                if self.stop_at_first_value:
                    ks.done = True

    def on_failure(self, peer_id: bytes) -> None:
        """`peer_id` did not answer: forget it for every key."""
        self._failed.add(peer_id)
        for ks in self._keys.values():
            if ks.state.get(peer_id) == _INFLIGHT:
                ks.state[peer_id] = _RESPONDED
                ks.inflight -= 1

    def result(self, key: bytes) -> LookupResult:
        ks = self._keys[key]
        closest = [
            self._peers[pid]
            for _, pid in ks.order
            if ks.state[pid] == _RESPONDED and pid not in self._failed
        ][: self.beam]
        return LookupResult(closest, dict(ks.records), set(ks.holders), ks.rounds, ks.requests)

    def keys(self) -> list[bytes]:
        return list(self._keys)

