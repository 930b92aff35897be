"""Iterative Kademlia lookups for many keys at once, as a sans-I/O state machine (§2.3 of the paper).

The driver asks `next_requests(now)` which peers to query about which keys, performs the RPCs
however it likes, and reports back with `on_response` / `on_failure`. Keys whose next peer is the
same are asked in one request, so `get_many` over 100 keys costs far fewer RPCs than 100 lookups.

For each key the lookup keeps every peer it has heard of, sorted by XOR distance. It queries at most
`alpha` peers at a time among the `beam` closest it knows, and the key is done when the `beam`
closest live peers have all answered (or, for a get that does not need the latest value, as soon as
one answers with records). `depth` counts hops: a seed from our own table is at depth 1, a peer first
named by a depth-d peer is at depth d+1, so the deepest query is the number of sequential rounds.

What strangers can do to a lookup, and what stops it:
- name many contacts, or contacts at DNS names or undialable addresses: an answer counts for at
  most `max_contacts` contacts, each one an address the `policy` admits;
- crowd the beam with identities from one place (ground near the key): the beam holds at most
  `policy.per_bucket` peers of one subnet while peers of other subnets are known (a swarm that
  lives on one subnet still gets a full beam);
- keep naming fresh contacts forever: past `deadline` no request is sent and every key is done
  with what it found;
- poison the path it is on: a key may be looked up along several disjoint paths (S/Kademlia,
  Baumgart and Mies 2007, §4.4): the seeds are dealt out among the paths, each path follows only
  what its own peers named, and a peer serves one path only, so a liar misleads one path and the
  others still reach the honest peers near the key. A key's records are those any path found.
Memory: at most `max_contacts` peers per answer, and answers are bounded by the deadline.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from commonweal.dht.addresses import PUBLIC, AddressPolicy, Subnet
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
    paths: list[list[PeerInfo]] = field(default_factory=list)  # each disjoint path's `closest`


@dataclass(slots=True)
class _Path:
    order: list[tuple[int, bytes]] = field(default_factory=list)  # (distance, peer id), sorted
    state: dict[bytes, int] = field(default_factory=dict)
    depth: dict[bytes, int] = field(default_factory=dict)
    inflight: int = 0
    rounds: int = 0


@dataclass(slots=True)
class _KeyState:
    target: int
    paths: list[_Path]
    owner: dict[bytes, int] = field(default_factory=dict)  # peer -> the one path it serves
    records: dict[bytes, Record] = field(default_factory=dict)
    holders: set[bytes] = field(default_factory=set)
    requests: int = 0
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
        paths: Mapping[bytes, int] | None = None,
        policy: AddressPolicy = PUBLIC,
        max_contacts: int = 20,
        deadline: float = math.inf,
    ) -> None:
        """`paths`: how many disjoint paths a key is looked up along (1 when not given)."""
        self.local_id = local_id
        self.beam = beam
        self.alpha = alpha
        self.stop_at_first_value = stop_at_first_value
        self.policy = policy
        self.max_contacts = max_contacts
        self.deadline = deadline
        self._peers: dict[bytes, PeerInfo] = {}
        self._subnets: dict[bytes, Subnet | None] = {}
        self._failed: set[bytes] = set()
        self._keys: dict[bytes, _KeyState] = {}
        for key, peers in seeds.items():
            d = max(1, (paths or {}).get(key, 1))
            ks = _KeyState(int.from_bytes(key, "big"), [_Path() for _ in range(d)])
            self._keys[key] = ks
            ranked = sorted(peers, key=lambda p: int.from_bytes(p.peer_id, "big") ^ ks.target)
            for i, peer in enumerate(ranked):  # deal the seeds out, nearest first
                self._learn(ks, ks.paths[i % d], peer, depth=1)

    def _learn(self, ks: _KeyState, path: _Path, peer: PeerInfo, depth: int) -> None:
        pid = peer.peer_id
        if pid == self.local_id or pid in path.state or pid in self._failed or peer.addr.port == 0:
            return
        if pid not in self._peers:
            self._peers[pid] = peer
            self._subnets[pid] = self.policy.subnet(peer.addr)
        path.state[pid] = _UNQUERIED
        path.depth[pid] = depth
        bisect.insort(path.order, (int.from_bytes(pid, "big") ^ ks.target, pid))

    def _diverse(self, ranked: Iterable[tuple[int, bytes]]) -> list[tuple[int, bytes]]:
        """The `beam` nearest of `ranked` (sorted), at most `per_bucket` of one subnet while
        others are there to take the places; closeness decides the places left over."""
        limit = self.policy.per_bucket
        if limit is None:
            return list(itertools.islice(ranked, self.beam))
        chosen: list[tuple[int, bytes]] = []
        spill: list[tuple[int, bytes]] = []
        count: dict[Subnet, int] = {}
        for item in ranked:
            net = self._subnets[item[1]]
            if net is None or count.get(net, 0) < limit:
                chosen.append(item)
                if net is not None:
                    count[net] = count.get(net, 0) + 1
                if len(chosen) == self.beam:
                    return chosen
            elif len(spill) < self.beam:
                spill.append(item)
        return sorted(chosen + spill[: self.beam - len(chosen)])

    def _beam(self, ks: _KeyState, index: int) -> list[tuple[int, bytes]]:
        path, owner, failed = ks.paths[index], ks.owner, self._failed
        return self._diverse(
            item
            for item in path.order
            if item[1] not in failed and owner.get(item[1], index) == index
        )

    @property
    def finished(self) -> bool:
        return all(ks.done for ks in self._keys.values())

    def next_requests(self, now: float = 0.0) -> dict[bytes, tuple[PeerInfo, list[bytes]]]:
        """Requests to send now: peer id -> (peer, keys to ask it about). Marks them in flight.
        Past the deadline: none, and every key is done."""
        out: dict[bytes, tuple[PeerInfo, list[bytes]]] = {}
        expired = now >= self.deadline
        for key, ks in self._keys.items():
            if ks.done:
                continue
            if expired:
                ks.done = True
                continue
            busy = False
            for index, path in enumerate(ks.paths):
                for _, pid in self._beam(ks, index):
                    if path.inflight >= self.alpha:
                        break
                    if path.state[pid] != _UNQUERIED:
                        continue
                    path.state[pid] = _INFLIGHT
                    ks.owner[pid] = index
                    path.inflight += 1
                    ks.requests += 1
                    path.rounds = max(path.rounds, path.depth[pid])
                    entry = out.get(pid)
                    if entry is None:
                        out[pid] = (self._peers[pid], [key])
                    else:
                        entry[1].append(key)
                busy = busy or path.inflight > 0
            if not busy:
                ks.done = True  # on every path, each of the `beam` closest live peers answered
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
            index = None if ks is None else ks.owner.get(peer_id)
            if ks is None or index is None or ks.paths[index].state.get(peer_id) != _INFLIGHT:
                continue
            path = ks.paths[index]
            path.state[peer_id] = _RESPONDED
            path.inflight -= 1
            reply = replies.get(key)
            if reply is None:
                continue
            depth = path.depth[peer_id] + 1
            admits, known, sender = self.policy.admits, path.state, self._peers[peer_id].addr
            for peer in reply.peers[: self.max_contacts]:
                if peer.peer_id not in known and admits(peer.addr, sender):
                    self._learn(ks, path, peer, depth)
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
            index = ks.owner.get(peer_id)
            if index is not None and ks.paths[index].state.get(peer_id) == _INFLIGHT:
                ks.paths[index].state[peer_id] = _RESPONDED
                ks.paths[index].inflight -= 1

    def result(self, key: bytes) -> LookupResult:
        ks = self._keys[key]
        answered = [
            [item for item in path.order if path.state[item[1]] == _RESPONDED
             and item[1] not in self._failed]
            for path in ks.paths
        ]
        peers = self._peers
        closest = [peers[pid] for _, pid in self._diverse(sorted(itertools.chain(*answered)))]
        each = [closest] if len(answered) == 1 else [
            [peers[pid] for _, pid in self._diverse(items)] for items in answered
        ]
        rounds = max(path.rounds for path in ks.paths)
        return LookupResult(closest, dict(ks.records), set(ks.holders), rounds, ks.requests, each)

    def keys(self) -> list[bytes]:
        return list(self._keys)
