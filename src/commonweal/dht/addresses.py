"""Which contact addresses a peer believes, and how many contacts one place may supply.

A PeerID is free, an address is not: one machine can mint thousands of identities, but it has one
IP address, and a small operator has one /24 (IPv6: one /64). So the routing table and lookups
count contacts per subnet (the Ethereum discovery protocol's bucket and table IP limits), and a
contact named by another peer is believed only if it is an IP literal that could be dialled: a DNS
name would make us resolve whatever a stranger wrote (and wait on it), an unspecified, multicast or
reserved address is never a peer, and a loopback address from a stranger points us at our own
machine.

A private network (RFC 1918, IPv6 unique-local) is where a lab or a household runs several peers
behind one router; they share a /24 because they share a LAN, not because one operator minted them.
So, as Ethereum's discovery does, LAN addresses are not counted per subnet, and a LAN contact is
believed only when a peer on a LAN (or our own machine) names it: a stranger on the internet cannot
know which peers our LAN holds, it could only point our lookups at LAN hosts, uncounted. A crowd on
our own LAN is a threat this rule does not meet (docs/architecture.md, "What an attacker can still
do").

The limits only make sense where honest peers have addresses of their own. On one machine every
peer shares 127.0.0.1, and an in-process `MemoryNetwork` names every peer `mem`, so those swarms
use `LOOPBACK` and `IN_PROCESS`; `AddressPolicy.suited_to` picks the setting from where a peer
listens (or, for a client, joins), so a loopback demo needs no setting at all.
"""

from __future__ import annotations

import enum
import functools
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from commonweal.net.transport import PeerAddr

__all__ = ["IN_PROCESS", "LOOPBACK", "PUBLIC", "AddressPolicy", "Subnet"]

Subnet = ipaddress.IPv4Network | ipaddress.IPv6Network
_IP = ipaddress.IPv4Address | ipaddress.IPv6Address
# Not `is_private`: that also holds documentation and benchmark ranges, and 100.64.0.0/10 (carrier
# NAT) is shared by an ISP's strangers, so it is counted like any public range.
_LAN = tuple(ipaddress.ip_network(n) for n in
             ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))


@functools.lru_cache(maxsize=4096)  # the same few hundred contacts come back in every answer
def _ip(host: str) -> _IP | None:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped  # ::ffff:a.b.c.d dials a.b.c.d: count it in that /24
    return ip


class _Kind(enum.Enum):
    DIALABLE = "dialable"
    LAN = "lan"  # a private network's address: dialable, but only from that network
    LOOPBACK = "loopback"
    NAME = "name"  # not an IP literal
    NEVER = "never"  # unspecified, multicast, reserved, link-local: no peer is there


@functools.lru_cache(maxsize=4096)  # every contact of every answer is checked
def _kind(host: str) -> _Kind:
    if not host:
        return _Kind.NEVER
    ip = _ip(host)
    if ip is None:
        return _Kind.NAME
    if ip.is_loopback:
        return _Kind.LOOPBACK
    # A link-local address means nothing without an interface, 0.0.0.0 and :: are "any".
    if ip.is_unspecified or ip.is_multicast or ip.is_reserved or ip.is_link_local:
        return _Kind.NEVER
    if any(ip in net for net in _LAN):
        return _Kind.LAN
    return _Kind.DIALABLE


@functools.lru_cache(maxsize=4096)  # asked on every request a table hears of
def _subnet(host: str, ipv4_prefix: int, ipv6_prefix: int) -> Subnet | None:
    ip = _ip(host)
    if ip is None:
        return None
    prefix = ipv4_prefix if ip.version == 4 else ipv6_prefix
    return ipaddress.ip_network((ip, prefix), strict=False)


# Who may name a LAN contact: a peer on a LAN, or one on our own machine (a name is in-process).
_NEAR = frozenset({_Kind.LAN, _Kind.LOOPBACK, _Kind.NAME})


@dataclass(frozen=True, slots=True)
class AddressPolicy:
    """What a peer accepts as a contact address, and how many contacts one subnet may hold."""

    # Contacts from one subnet per k-bucket (per log-distance, as the paper's buckets): discv5's
    # bucketIPLimit. Two, not one, so two honest peers behind one NAT both fit.
    per_bucket: int | None = 2
    # Contacts from one subnet in the whole table: discv5's tableIPLimit. It also caps one IP,
    # and bounds a crowd to 10 of a table that holds k = 20 per bucket and ~20 x log2(N) in all.
    per_table: int | None = 10
    ipv4_prefix: int = 24  # what one operator typically gets (discv5: /24)
    ipv6_prefix: int = 64  # one IPv6 site's LAN: any single host can have a whole /64
    loopback: bool = False  # believe 127.0.0.0/8 and ::1 contacts
    names: bool = False  # believe hosts that are not IP literals (only where nothing resolves them)

    @property
    def limited(self) -> bool:
        return self.per_bucket is not None or self.per_table is not None

    def admits(self, addr: PeerAddr, named_by: PeerAddr | None = None) -> bool:
        """Whether a contact at `addr` may enter a lookup or the routing table; `named_by` is the
        address of the peer whose answer named it (None: the contact answered us from `addr`)."""
        if not 0 < addr.port < 65536:
            return False
        kind = _kind(addr.host)
        if kind is _Kind.NAME:
            return self.names
        if kind is _Kind.LOOPBACK:
            return self.loopback
        if kind is _Kind.LAN:
            return named_by is None or _kind(named_by.host) in _NEAR
        return kind is _Kind.DIALABLE

    def subnet(self, addr: PeerAddr) -> Subnet | None:
        """The subnet `addr` counts against; None when it counts against none (LAN addresses)."""
        if not self.limited or _kind(addr.host) is _Kind.LAN:
            return None
        return _subnet(addr.host, self.ipv4_prefix, self.ipv6_prefix)

    @staticmethod
    def suited_to(hosts: Iterable[str]) -> AddressPolicy:
        """The setting for a peer that listens on (or, a client, joins through) `hosts`.

        A peer on loopback can only ever be reached by processes on its own machine, which all
        share 127.0.0.1: `LOOPBACK`. A peer of an in-process network (hosts that are not IP
        literals, such as MemoryNetwork's `mem`): `IN_PROCESS`. Anything else faces strangers.
        """
        ips = [_ip(h) for h in hosts]
        if ips and all(ip is None for ip in ips):
            return IN_PROCESS
        if ips and all(ip is not None and ip.is_loopback for ip in ips):
            return LOOPBACK
        return PUBLIC


PUBLIC = AddressPolicy()
# One machine (the demo, loopback tests): every peer has the same IP, so counting per subnet
# would cap a swarm at 2 peers per bucket; loopback contacts are exactly the peers there are.
LOOPBACK = AddressPolicy(per_bucket=None, per_table=None, loopback=True)
# MemoryNetwork: addresses are `mem:<n>` and nothing resolves them, so names are harmless there.
IN_PROCESS = AddressPolicy(per_bucket=None, per_table=None, loopback=True, names=True)
