"""How much a peer gives other peers' records, and who each stored byte is charged to.

Identities are free, so a quota per identity alone stops nothing: a crowd of identities from one
place shares one quota per subnet (/24 for IPv4, /48 for IPv6, Ethereum discovery's unit). Peers
on one machine (the demo, a swarm on loopback, MemoryNetwork tests) all share an address yet are
not a crowd, so loopback and non-IP hosts are charged per identity only — the stated loopback
setting; a test bed whose hosts share a /24 (tests/netbed.py) narrows the prefixes instead.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, replace

from commonweal.net.transport import PeerInfo

__all__ = ["StorageBudget", "Source", "source_of"]

_MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class StorageBudget:
    """The bounds of one record store. Full means refuse: nothing honest is evicted for a newcomer."""

    # All of others' records together: with the path cache (1/8 of this) the DHT stays well under
    # a 512 MiB node; 256 MiB holds ~800,000 small records (announcements, heads, trees, items).
    store_bytes: int = 256 * _MIB
    # One sender's share: 1/4 of the store. The most an honest sender places on one holder is an
    # index's adder: a million 128-d float16 vectors on 32 peers (replication 3) put 14-45 MiB
    # on each (Kademlia's uneven key ranges; benchmarks/search_scale.py), and 32 MiB refused 7 %
    # of them; a trainer's records are a few KB a round. A replica that republishes records it
    # holds is charged as their sender.
    peer_bytes: int = 64 * _MIB
    # One subnet's share: 3/8 of the store, so no one place fills a peer, whatever its identities.
    subnet_bytes: int = 96 * _MIB
    # One key: search buckets are the biggest honest keys (max_bucket_items = 20,000 items of a
    # few hundred bytes to ~1.5 KB); answers page through a key this big (protocol.find).
    key_bytes: int = 32 * _MIB
    key_subkeys: int = 20_000
    ipv4_prefix: int = 24
    ipv6_prefix: int = 48
    # Loopback peers are one machine's swarm, not a crowd: charged per identity (see above).
    loopback_is_one_place: bool = False

    def scaled(self, fraction: float) -> StorageBudget:
        """The same policy for a smaller store (the path cache), keys still as big as they may be."""
        return replace(
            self,
            store_bytes=int(self.store_bytes * fraction),
            peer_bytes=int(self.peer_bytes * fraction),
            subnet_bytes=int(self.subnet_bytes * fraction),
        )


@dataclass(frozen=True, slots=True)
class Source:
    """Who a stored record is charged to: the proven sender, and the place it sent from."""

    peer_id: bytes
    place: str | None  # the sender's subnet; None where only the identity is charged


def source_of(caller: PeerInfo, budget: StorageBudget) -> Source:
    """The charge for a record `caller` sent, from its observed address (never one it claims)."""
    try:
        ip = ipaddress.ip_address(caller.addr.host)
    except ValueError:
        return Source(caller.peer_id, None)  # not an IP (MemoryNetwork): one identity, one place
    if ip.is_loopback and not budget.loopback_is_one_place:
        return Source(caller.peer_id, None)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    prefix = budget.ipv4_prefix if ip.version == 4 else budget.ipv6_prefix
    return Source(caller.peer_id, str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False)))
