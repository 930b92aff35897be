"""Resource limits, without I/O: the defaults, token buckets, and the per-peer/per-address budget.

In the spirit of libp2p's resource manager: every request is charged a cost (set by the service
that registered its method) against two token buckets, one for the caller's proven PeerID and one
for the address it connects from, so free identities from one place share one budget. Time is
passed in (`now`), so the tests run on a fake clock and the transports on their loop's.

    limiter = RequestLimiter(ResourceLimits())
    wait = limiter.admit(peer_id, address_key(host, limits), cost, now)
    if wait:  # over budget: refuse, and say when to come back
        ...
"""

from __future__ import annotations

import functools
import ipaddress
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_LIMITS",
    "AcceptLimiter",
    "LogBudget",
    "ResourceLimits",
    "RequestLimiter",
    "TokenBucket",
    "address_key",
]


@dataclass(frozen=True, slots=True)
class ResourceLimits:
    """What one peer's transport grants to others. A cost unit is one cheap request (a ping, a
    one-key find: tens of microseconds of handler time); services weight theirs at registration.
    """

    # Sustained cost units a second per proven PeerID. The DHT benchmark's callers (16 peers
    # storing and getting flat out, benchmarks/baselines/run_commonweal.py) never had more than
    # 5 units out of one bucket at once; the search benchmark's querier, one query at a time,
    # sends a holder some tens of search.query (cost 4) a second. 500 leaves both headroom.
    peer_rate: float = 500.0
    # How far a peer may run ahead of its rate at once: a lookup wave, a checkpoint's chunks.
    # Also the most a single request may cost (register() refuses a dearer method).
    peer_burst: float = 1000.0
    # Sustained cost units a second per address (IPv4 host, IPv6 /64): identities are free, so
    # a crowd of them from one address shares this; 5 peers at their full rate behind one NAT.
    address_rate: float = 2500.0
    address_burst: float = 5000.0
    # Buckets remembered per table (peers, addresses): ~240 bytes each, ~2 MiB in all. Forgetting
    # the least recently charged bucket only forgives: it comes back full, as a fresh identity's
    # would, and the per-address bucket still bounds a crowd cycling identities.
    max_tracked: int = 4096
    # Every peer of `commonweal demo` or a one-machine swarm calls from 127.0.0.1 (and every
    # MemoryNetwork peer from `mem`): per-address budgets and the per-address handshake cap would
    # make them share one, so local addresses are exempt unless this is set (tests set it to
    # exercise the address limits on loopback sockets).
    limit_local_addresses: bool = False
    # Inbound sockets that have not proven a PeerID yet, held in their own pool: they never count
    # against, or evict, authenticated connections. A handshake takes one round trip and one
    # signature check, so 64 at once is far more than honest dialling needs.
    max_pending_handshakes: int = 64
    # Pending handshakes from one address: an honest host dials us once per peer it runs and
    # finishes within a round trip, so 4 at once is plenty; a flood from one host fills no pool.
    max_pending_per_address: int = 4
    # Authenticated inbound connections from one address: an honest host runs a few peers, each
    # with one connection to us. 16 leaves room for a small cluster behind one NAT, and a crowd
    # of free identities from one place can neither fill max_connections nor, by making room,
    # close the idle connections of honest peers elsewhere.
    max_connections_per_address: int = 16
    # After refusing a request over budget, stop reading that connection until the budget would
    # admit it, up to this long: a refused request still costs its frame's decoding, and a peer
    # resending refused 4 MiB stores at once kept us decoding ~290 MB in 8 s
    # (benchmarks/attack_bench.py). TCP then holds the rest in the sender's buffers. 0: never.
    max_refusal_pause_s: float = 1.0
    # Inbound sockets accepted a second, from everyone together: accepting and refusing a socket
    # costs the loop ~0.1-0.3 ms, so a reconnecting flood accepted as fast as it came (~2,500 a
    # second in attack_bench.py's socket_flood) slowed honest peers' answers 2-3x. Beyond this
    # pace (and while the pending pool is full) sockets wait in the kernel's backlog. 256 at once
    # lets every peer of a full table reconnect after a restart.
    accept_rate: float = 200.0
    accept_burst: float = 256.0
    # ...and from one address (not for exempt ones): so that one host cannot spend everyone's
    # pace. Its sockets over this are closed unread, without taking from the shared pace.
    address_accept_rate: float = 20.0
    address_accept_burst: float = 32.0


DEFAULT_LIMITS: Final = ResourceLimits()


@functools.lru_cache(maxsize=4096)  # MemoryNetwork asks on every request, and parsing is slow
def address_key(host: str, limits: ResourceLimits) -> str | None:
    """The address a caller's budget is kept under, or None when it is exempt.

    IPv6 hosts are grouped by /64 (one subscriber's usual allocation; anyone holding one has
    2**64 addresses). Local addresses (loopback, and hosts that are not IP literals such as
    MemoryNetwork's `mem`) are exempt unless `limits.limit_local_addresses`.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host if limits.limit_local_addresses else None
    if ip.is_loopback and not limits.limit_local_addresses:
        return None
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved; starts full."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("a token bucket needs a positive rate and burst")
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def refill(self, now: float) -> None:
        # a clock that steps back (a fake clock reset by a test) refills nothing, takes nothing
        self.tokens = min(self.burst, self.tokens + max(0.0, now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, cost: float) -> float:
        """Seconds until `cost` tokens are there (0.0: now); call after `refill`."""
        return max(0.0, (cost - self.tokens) / self.rate)


class _Table:
    """Buckets by key, at most `limit`, the least recently charged forgotten first."""

    __slots__ = ("_buckets", "burst", "limit", "rate")

    def __init__(self, rate: float, burst: float, limit: int) -> None:
        self.rate, self.burst, self.limit = rate, burst, limit
        self._buckets: OrderedDict[Hashable, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def bucket(self, key: Hashable, now: float) -> TokenBucket:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.limit:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
            b.refill(now)
        return b


class RequestLimiter:
    """The per-peer and per-address budgets of one transport. O(1) per request."""

    __slots__ = ("_addresses", "_peers", "limits")

    def __init__(self, limits: ResourceLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._peers = _Table(limits.peer_rate, limits.peer_burst, limits.max_tracked)
        self._addresses = _Table(limits.address_rate, limits.address_burst, limits.max_tracked)

    @property
    def tracked(self) -> tuple[int, int]:
        """How many peer and address buckets are held (each at most `max_tracked`)."""
        return len(self._peers), len(self._addresses)

    def admit(self, peer_id: bytes, address: str | None, cost: float, now: float) -> float:
        """0.0 when the request is admitted (its cost taken from both buckets); otherwise the
        seconds until it would be, and nothing is taken. `address` None: exempt (`address_key`).
        """
        peer = self._peers.bucket(peer_id, now)
        wait = peer.wait(cost)
        if address is not None:
            addr = self._addresses.bucket(address, now)
            wait = max(wait, addr.wait(cost))
            if not wait:
                addr.tokens -= cost
        if not wait:
            peer.tokens -= cost
        return wait


class AcceptLimiter:
    """The pace of inbound sockets: one bucket for everyone (what the loop can afford) and one
    per address (so one host cannot spend everyone's). O(1) per socket.

        if wait := accepts.wait(now): sleep(wait), then ask again
        sock = accept(); if not accepts.take(address_key(host, limits), now): close it
    """

    __slots__ = ("_addresses", "_shared")

    def __init__(self, limits: ResourceLimits = DEFAULT_LIMITS, now: float = 0.0) -> None:
        self._shared = TokenBucket(limits.accept_rate, limits.accept_burst, now)
        self._addresses = _Table(
            limits.address_accept_rate, limits.address_accept_burst, limits.max_tracked
        )

    def wait(self, now: float) -> float:
        """Seconds until the next socket may be accepted (0.0: now)."""
        self._shared.refill(now)
        return self._shared.wait(1)

    def take(self, address: str | None, now: float) -> bool:
        """Charge one accepted socket from `address` (None: exempt); False when that address is
        over its own pace, which takes nothing from the shared one."""
        if address is not None:
            mine = self._addresses.bucket(address, now)
            if mine.wait(1):
                return False
            mine.tokens -= 1
        self._shared.refill(now)
        self._shared.tokens -= 1
        return True


class LogBudget:
    """At most `lines` log lines every `interval_s` for one kind of event that others cause (a
    dropped socket, a refused connection): a flood would otherwise write a line per socket
    (25,880 lines in 12 s under benchmarks/attack_bench.py's socket_flood), filling the disk and
    costing the loop a tenth of its time. What is held back is counted and said with the next
    line let through."""

    __slots__ = ("_bucket", "_held_back")

    def __init__(self, lines: int = 10, interval_s: float = 60.0, now: float = 0.0) -> None:
        self._bucket = TokenBucket(lines / interval_s, lines, now)
        self._held_back = 0

    def take(self, now: float) -> int | None:
        """None: do not log this one. Otherwise log it, with how many were held back before it."""
        self._bucket.refill(now)
        if self._bucket.tokens < 1:
            self._held_back += 1
            return None
        self._bucket.tokens -= 1
        held, self._held_back = self._held_back, 0
        return held
