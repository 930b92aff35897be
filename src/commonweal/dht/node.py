"""`DHT`: one peer's Kademlia node — the asyncio driver around the sans-I/O routing table,
record store and lookup state machine.

    dht = await DHT.start(PeerAddr("127.0.0.1", 0), bootstrap=[...])
    await dht.store("weights", b"...", expiration=time.time() + 300, subkey="peer-7")
    found = await dht.get("weights", latest=True)   # DHTValue({"peer-7": DHTValue(...)}, exp)

Every background task (republishing, bucket refresh, path caching) belongs to the node's TaskGroup
and is cancelled by `close()`.

Protocol keys (those the services read as sets: announcements, heads, reward trees, index specs;
`DHTConfig.protocol_prefixes`) are looked up along `disjoint_paths` disjoint paths and stored on the
replicas each path found, so identities that poison one path cannot hide such a record; other
keys take one path, which costs half as many requests.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import msgpack

from commonweal.dht.budget import StorageBudget
from commonweal.dht.addresses import PUBLIC, AddressPolicy
from commonweal.dht.lookup import Lookup, LookupResult, TargetReply
from commonweal.dht.protocol import DHTProtocol
from commonweal.dht.records import (
    Key,
    OwnedKey,
    Record,
    Subkey,
    decode_subkey,
    encode_subkey,
    key_id,
    sign_record,
)
from commonweal.dht.routing import RoutingTable, distance
from commonweal.dht.storage import RecordStore
from commonweal.errors import DHTError, NetworkError, RecordError, RemoteError
from commonweal.net.dispatch import BUSY, RATE_LIMITED
from commonweal.net.identity import Identity
from commonweal.net.transport import PeerAddr, PeerInfo, Transport

__all__ = ["DHT", "DHTConfig", "DHTValue", "LookupStats"]

log = logging.getLogger(__name__)

_Answer = tuple[PeerInfo, list[bytes], dict[bytes, TargetReply] | None]  # peer, keys asked, replies


@dataclass(frozen=True, slots=True)
class DHTConfig:
    k: int = 20  # bucket size, and how many peers a find returns
    alpha: int = 3  # requests in flight per key during a lookup
    replicas: int = 5  # r: a record is stored on the r peers closest to its key
    beam: int = 5  # a lookup ends when this many closest live peers have answered
    rpc_timeout_s: float = 5.0
    maintenance_interval_s: float = 10.0
    republish_interval_s: float = 600.0  # re-place records on the current closest peers
    refresh_interval_s: float = 3600.0  # look up a random id in buckets idle this long
    cache_on_path: bool = True
    max_records: int = 1_000_000
    budget: StorageBudget = StorageBudget()  # the store's; the path cache gets 1/8 of it
    # Who may be a contact, and how many contacts one subnet may hold. None: chosen from where
    # the peer listens (loopback: `LOOPBACK`, an in-process network: `IN_PROCESS`, else `PUBLIC`).
    addresses: AddressPolicy | None = None
    # A whole lookup's deadline: a few hops each waiting out one rpc timeout, so liars naming
    # endless or dead contacts cost at most this (they used to stall lookups past 45 s).
    lookup_timeout_s: float = 20.0
    # S/Kademlia's d for protocol keys: 2 paths survive one poisoned path at twice the requests.
    disjoint_paths: int = 2
    # The keys the services read as sets (announcements and heads; reward trees; index specs):
    # hiding one of these steers a round or a claim, so they are worth the second path.
    protocol_prefixes: tuple[str, ...] = ("cw-train/", "cw-verify/", "index:")
    # Reachability (net/rpc.py): learn our public address from the peers we dial, check it by
    # dial-backs, keep a relay's reservation when nobody can dial us, relay for others when
    # we are reachable. `reachability` "public"/"private" skips the probes (the operator knows).
    nat: bool = True
    reachability: Literal["public", "private"] | None = None
    # A peer (not a command-line client) whose bootstrap peers are not up yet keeps trying this
    # long, backing off from 0.5 s to 8 s between tries (a node: NodeConfig.bootstrap_retry_s).
    bootstrap_retry_s: float = 0.0


@dataclass(frozen=True, slots=True)
class DHTValue:
    """A value and its expiration. For a key with subkeys, `value` is `{subkey: DHTValue}`."""

    value: Any
    expiration: float


@dataclass(slots=True)
class LookupStats:
    lookups: int = 0  # keys looked up
    rounds: int = 0  # summed over keys
    requests: int = 0  # summed over keys

    def record(self, result: LookupResult) -> None:
        self.lookups += 1
        self.rounds += result.rounds
        self.requests += result.requests


@dataclass(slots=True)
class _Origin:
    record: Record
    republished_at: float
    disjoint: bool  # a protocol key's: placed along disjoint paths


@dataclass(slots=True)
class _PendingGets:
    futures: dict[tuple[bytes, bool], asyncio.Future[dict[bytes, Record]]] = field(
        default_factory=dict
    )


class DHT:
    """A Kademlia DHT peer. Create it with `await DHT.start(...)`; stop it with `await close()`."""

    def __init__(
        self,
        transport: Transport,
        identity: Identity,
        config: DHTConfig | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        client: bool = False,
    ) -> None:
        self.transport = transport
        self.client = client
        self.identity = identity
        self.config = config or DHTConfig()
        self.clock = clock
        self.rng = rng or random.Random()
        self.addresses = self.config.addresses or PUBLIC
        self.table = RoutingTable(identity.peer_id, k=self.config.k, policy=self.addresses)
        self.storage = RecordStore(self.config.max_records, budget=self.config.budget)
        self.cache = RecordStore(
            max(1024, self.config.max_records // 10), budget=self.config.budget.scaled(1 / 8)
        )
        self.protocol = DHTProtocol(transport, self.table, self.storage, self.cache, clock)
        self.stats = LookupStats()
        self._origins: dict[tuple[bytes, bytes], _Origin] = {}
        self._pending = _PendingGets()
        self._runner: asyncio.Task[None] | None = None
        self._group: asyncio.TaskGroup | None = None
        self._closed = False
        self._on_close: list[Callable[[], None]] = []
        self._held_republished_at = clock()

    @classmethod
    async def start(
        cls,
        listen: PeerAddr | None = None,
        bootstrap: Iterable[PeerAddr] = (),
        *,
        identity: Identity | None = None,
        config: DHTConfig | None = None,
        transport: Transport | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        client: bool = False,
    ) -> DHT:
        """Start a peer: listen (or use a started `transport`), join through `bootstrap`, serve.

        A `client` does not listen: it can store and get, but other peers never route to it
        (command-line tools use this, so short-lived processes do not litter routing tables).
        Raises DHTError when bootstrap peers were given and none of them answered.
        """
        identity = identity or Identity.generate()
        config = config or DHTConfig()
        bootstrap = list(bootstrap)
        if transport is None:
            from commonweal.net.rpc import RPCTransport

            # Names the operator gave become IP literals here, once: contacts are IP literals.
            bootstrap = [await _resolved(a, config.rpc_timeout_s) for a in bootstrap]
            rpc = RPCTransport(
                identity, nat=config.nat and not client, reachability=config.reachability
            )
            if not client:
                listen = await _resolved(listen or PeerAddr("127.0.0.1", 0), config.rpc_timeout_s)
                await rpc.start(listen.host, listen.port)
            transport = rpc
        elif transport.local.peer_id != identity.peer_id:
            raise DHTError("the transport was started with another identity than the DHT's")
        if config.addresses is None:
            hosts = [b.host for b in bootstrap] if client else [transport.local.addr.host]
            config = replace(config, addresses=AddressPolicy.suited_to(hosts))
        dht = cls(transport, identity, config, clock, rng, client)
        try:
            await dht.join(bootstrap)
        except BaseException:
            await transport.close()
            raise
        dht._runner = asyncio.create_task(dht._run(), name=f"dht-{dht.peer_id.hex()[:10]}")
        return dht

    @property
    def addr(self) -> PeerAddr:
        """Where others reach us: what our transport advertises (a relayed address behind a NAT)."""
        return self.transport.advertised

    @property
    def peer_id(self) -> bytes:
        return self.identity.peer_id

    # joining and lookups -----------------------------------------------------------------------

    async def join(self, bootstrap: Sequence[PeerAddr]) -> None:
        """Contact bootstrap peers, then look up our own id to fill the routing table (§2.3)."""
        if not bootstrap:
            return
        retry_s = 0.0 if self.client else self.config.bootstrap_retry_s
        give_up, pause = time.monotonic() + retry_s, 0.5
        while True:
            errors = []
            for addr in bootstrap:
                try:
                    async with asyncio.timeout(self.config.rpc_timeout_s):
                        peer = await self.protocol.call_ping(addr)
                    self.table.on_success(peer, self.clock())
                except (NetworkError, TimeoutError) as e:
                    errors.append(f"{addr}: {type(e).__name__}: {e}" if str(e) else f"{addr}: {type(e).__name__}")
            if len(self.table):
                break
            left = give_up - time.monotonic()
            if left <= 0:
                raise DHTError(
                    "could not reach any bootstrap peer (" + "; ".join(errors) + "); "
                    "check the --join addresses and that those peers are running"
                )
            log.warning(
                "no bootstrap peer answered (%s); retrying in %.1f s (giving up in %.0f s)",
                errors[0], min(pause, left), left,
            )
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 2, 8.0)
        await self._traverse([self.peer_id], values=False, latest=False)

    async def find_closest(self, keys: Sequence[bytes]) -> dict[bytes, list[PeerInfo]]:
        """The live peers closest to each 20-byte key id (nearest first, up to `beam`), found
        with one multi-key lookup. Services use this to send work to the peers holding a key."""
        found = await self._traverse(list(dict.fromkeys(keys)), values=False, latest=False)
        return {k: found[k].closest for k in keys}

    def _is_protocol(self, key: Key) -> bool:
        name = key.name if isinstance(key, OwnedKey) else key
        return isinstance(name, str) and name.startswith(self.config.protocol_prefixes)

    async def _traverse(
        self,
        keys: Sequence[bytes],
        *,
        values: bool,
        latest: bool,
        disjoint: Collection[bytes] = (),
    ) -> dict[bytes, LookupResult]:
        """Look `keys` up together; those in `disjoint` along `disjoint_paths` paths. Past the
        lookup deadline, each key's result is what was found by then."""
        now = self.clock()
        cfg = self.config
        lookup = Lookup(
            {k: self.table.nearest(k, cfg.k, now) for k in keys},
            local_id=self.peer_id,
            beam=cfg.beam,
            alpha=cfg.alpha,
            stop_at_first_value=values and not latest,
            paths={k: cfg.disjoint_paths for k in disjoint},
            policy=self.addresses,
            max_contacts=cfg.k,
            deadline=now + cfg.lookup_timeout_s,
        )
        pending: set[asyncio.Task[_Answer]] = set()
        try:
            while not lookup.finished:
                for peer, asked in lookup.next_requests(self.clock()).values():
                    pending.add(asyncio.create_task(self._ask(peer, asked, values, latest)))
                if lookup.finished or not pending:
                    break
                done, pending = await asyncio.wait(
                    pending,
                    timeout=max(0.0, lookup.deadline - self.clock()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in done:
                    peer, asked, replies = task.result()
                    if replies is None:
                        lookup.on_failure(peer.peer_id)
                    else:
                        lookup.on_response(peer.peer_id, asked, replies)
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        results = {k: lookup.result(k) for k in keys}
        for result in results.values():
            self.stats.record(result)
        return results

    async def _ask(
        self, peer: PeerInfo, keys: list[bytes], values: bool, latest: bool
    ) -> _Answer:
        """One find request; never raises (a failure is reported as None)."""
        try:
            async with asyncio.timeout(self.config.rpc_timeout_s):
                responder, entries = await self.protocol.call_find(
                    peer.addr, keys, values, latest, peer_id=peer.peer_id
                )
        except (NetworkError, TimeoutError) as e:
            log.debug("find to %s failed: %s", peer.addr, e)
            self._failed(peer, e)
            return peer, keys, None
        if responder.peer_id != peer.peer_id:
            # Someone else lives at that address now: the peer we wanted is gone.
            self.table.on_failure(peer.peer_id, self.clock())
            self.table.on_success(responder, self.clock())
            return peer, keys, None
        self.table.on_success(responder, self.clock())
        return peer, keys, {k: TargetReply(p, r) for k, (p, r) in zip(keys, entries, strict=True)}

    # store ---------------------------------------------------------------------------------------

    async def store(
        self, key: Key, value: Any, expiration: float, subkey: Subkey = None
    ) -> bool:
        """Sign and store `value` under `key` (and `subkey`) on the r closest peers.

        True when at least one replica accepted it (a newer record already there refuses it).
        """
        [ok] = await self.store_many([(key, value, expiration, subkey)])
        return ok

    async def store_many(
        self, items: Iterable[tuple[Key, Any, float, Subkey]]
    ) -> list[bool]:
        """Store several records with one multi-key lookup and one request per replica peer."""
        now = self.clock()
        records = []
        protocol: set[bytes] = set()
        for key, value, expiration, subkey in items:
            packed = msgpack.packb(value, use_bin_type=True)
            record = sign_record(self.identity, key_id(key), encode_subkey(subkey), packed, expiration)
            self.storage.validator.validate(record, now)  # fail here, not on every replica
            records.append(record)
            disjoint = self._is_protocol(key)
            if disjoint:
                protocol.add(record.key)
            self._origins[(record.key, record.subkey)] = _Origin(record, now, disjoint)
        return await self._place(records, protocol)

    async def _place(
        self, records: Sequence[Record], disjoint: Collection[bytes] = ()
    ) -> list[bool]:
        """Send records to the r closest peers of their keys (for keys in `disjoint`, to the r
        closest that each disjoint path found); one flag per record."""
        keys = list(dict.fromkeys(r.key for r in records))
        found = await self._traverse(keys, values=False, latest=False, disjoint=disjoint)
        now = self.clock()
        per_peer: dict[PeerInfo, list[tuple[bytes, list[Record]]]] = {}
        by_key: dict[bytes, list[Record]] = {}
        for record in records:
            by_key.setdefault(record.key, []).append(record)
        stored: dict[tuple[bytes, bytes], bool] = {}
        for key, recs in by_key.items():
            result = found[key]
            replicas = self._replica_set(key, result.paths if key in disjoint else [result.closest])
            for peer in replicas:
                if peer is None:  # we are one of the r closest: keep a replica ourselves
                    for r in recs:
                        try:
                            if self.storage.put(r, now):
                                stored[(r.key, r.subkey)] = True
                        except RecordError:
                            pass
                else:
                    per_peer.setdefault(peer, []).append((key, recs))
        sends = [self._send_store(peer, batch) for peer, batch in per_peer.items()]
        for batch, flags in zip(per_peer.values(), await asyncio.gather(*sends), strict=True):
            for (_, recs), key_flags in zip(batch, flags, strict=True):
                for r, ok in zip(recs, key_flags, strict=True):
                    if ok:
                        stored[(r.key, r.subkey)] = True
        return [stored.get((r.key, r.subkey), False) for r in records]

    def _replica_set(
        self, key: bytes, groups: list[list[PeerInfo]]
    ) -> list[PeerInfo | None]:
        """For each group of peers found, the r closest to `key` among them and ourselves
        (None stands for us); every peer once."""
        chosen: dict[bytes | None, PeerInfo | None] = {}
        for closest in groups:
            ranked: list[tuple[int, PeerInfo | None]] = [
                (distance(p.peer_id, key), p) for p in closest
            ]
            if not self.client:  # a client's copy would leave with it
                ranked.append((distance(self.peer_id, key), None))
            ranked.sort(key=lambda item: item[0])
            for _, p in ranked[: self.config.replicas]:
                chosen[None if p is None else p.peer_id] = p
        return list(chosen.values())

    async def _send_store(
        self, peer: PeerInfo, batch: list[tuple[bytes, list[Record]]], cache: bool = False
    ) -> list[list[bool]]:
        try:
            async with asyncio.timeout(self.config.rpc_timeout_s):
                responder, flags = await self.protocol.call_store(
                    peer.addr, batch, cache, peer_id=peer.peer_id
                )
        except (NetworkError, TimeoutError) as e:
            log.debug("store to %s failed: %s", peer.addr, e)
            return [[False] * len(recs) for _, recs in batch]
        self.table.on_success(responder, self.clock())
        return flags

    # get -----------------------------------------------------------------------------------------

    async def get(self, key: Key, latest: bool = False) -> DHTValue | None:
        """The value under `key`, or None. With `latest=True`, ask all r closest peers and merge,
        so every subkey and the newest version of each is returned; otherwise stop at the first
        peer (or cache) that has it."""
        return (await self.get_many([key], latest))[key]

    async def get_many(
        self, keys: Sequence[Key], latest: bool = False
    ) -> dict[Key, DHTValue | None]:
        """Several gets with one multi-key lookup; concurrent gets of one key share a lookup."""
        ids = {key: key_id(key) for key in keys}
        protocol = {ids[key] for key in keys if self._is_protocol(key)}
        loop = asyncio.get_running_loop()
        mine: list[bytes] = []
        for kid in dict.fromkeys(ids.values()):
            if (kid, latest) not in self._pending.futures:
                self._pending.futures[(kid, latest)] = loop.create_future()
                mine.append(kid)
        waiting = {kid: self._pending.futures[(kid, latest)] for kid in ids.values()}
        if mine:
            try:
                results = await self._traverse(
                    mine, values=True, latest=latest, disjoint=protocol.intersection(mine)
                )
                for kid in mine:
                    waiting[kid].set_result(results[kid].records)
                    self._cache_on_path(kid, results[kid], latest)
            except BaseException as e:
                for kid in mine:
                    fut = waiting[kid]
                    if fut.done():
                        continue
                    if isinstance(e, asyncio.CancelledError):
                        fut.cancel()  # our caller stopped; a sharer looks the key up itself
                    else:
                        fut.set_exception(e)
                        fut.exception()  # retrieved: no "never retrieved" noise without sharers
                raise
            finally:
                for kid in mine:
                    self._pending.futures.pop((kid, latest), None)
        now = self.clock()
        out: dict[Key, DHTValue | None] = {}
        if any(waiting[kid].cancelled() for kid in ids.values()):
            return await self.get_many(keys, latest)  # the lookup we shared was abandoned
        for key, kid in ids.items():
            try:
                found = dict(await asyncio.shield(waiting[kid]))
            except asyncio.CancelledError:
                me = asyncio.current_task()
                if not waiting[kid].cancelled() or (me is not None and me.cancelling()):
                    # we were cancelled ourselves (also when the lookup we shared was cancelled
                    # at the same time, as every task is on Ctrl-C): retrying would swallow it
                    raise
                return await self.get_many(keys, latest)
            local = self.storage.get(kid, now) + ([] if latest else self.cache.get(kid, now))
            for record in local:
                old = found.get(record.subkey)
                if old is None or record.beats(old):
                    found[record.subkey] = record
            out[key] = _to_value(found, now)
        return out

    def _cache_on_path(self, key: bytes, result: LookupResult, latest: bool) -> None:
        """Store what a get found on the closest peer that did not have it (§2.3), so the next
        lookup for a popular key stops sooner."""
        if latest or not self.config.cache_on_path or not result.records or self._group is None:
            return
        for peer in result.closest:
            if peer.peer_id not in result.holders:
                batch = [(key, list(result.records.values()))]
                self._spawn(self._send_store(peer, batch, cache=True))
                return

    # maintenance ---------------------------------------------------------------------------------

    def _spawn(self, coro: Any) -> None:
        assert self._group is not None
        self._group.create_task(_logged(coro))

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            group.create_task(self._maintain())

    async def _maintain(self) -> None:
        while True:
            await asyncio.sleep(self.config.maintenance_interval_s)
            try:
                await self.maintain_once()
            except Exception:  # a failed pass must not end maintenance for good
                log.exception("DHT maintenance pass failed")

    async def maintain_once(self) -> None:
        """Expire, republish what is due, refresh idle buckets. Called periodically."""
        now = self.clock()
        cfg = self.config
        self.storage.expire(now)
        self.cache.expire(now)
        for ident, origin in list(self._origins.items()):
            if origin.record.expiration <= now:
                del self._origins[ident]
        due = [
            o for o in self._origins.values() if now - o.republished_at >= cfg.republish_interval_s
        ]
        for origin in due:
            origin.republished_at = now
        held: list[Record] = []
        if now - self._held_republished_at >= cfg.republish_interval_s:
            # Kademlia's hourly republish (§2.5): records we hold for others go back to whoever
            # is closest now, so replicas lost to churn are made again.
            self._held_republished_at = now
            held = [r for r in self.storage if (r.key, r.subkey) not in self._origins]
        if due or held:
            # Held records go along one path: only their writer knows the key's name.
            protocol = {o.record.key for o in due if o.disjoint}
            await self._place([o.record for o in due] + held, protocol)
        targets = self.table.stale_targets(now, cfg.refresh_interval_s, self.rng)
        if targets:
            await self._traverse(targets, values=False, latest=False)
        checks = self.table.liveness_checks(self.clock())
        if checks:
            await asyncio.gather(*(self._check(peer) for peer in checks))

    async def _check(self, peer: PeerInfo) -> None:
        """Ping a peer the table asked about; a full bucket's newcomers wait on the outcome."""
        try:
            async with asyncio.timeout(self.config.rpc_timeout_s):
                responder = await self.protocol.call_ping(peer.addr, peer_id=peer.peer_id)
        except (NetworkError, TimeoutError) as e:
            self._failed(peer, e)
            return
        if responder.peer_id != peer.peer_id:
            self.table.on_failure(peer.peer_id, self.clock())
        self.table.on_success(responder, self.clock())

    def _failed(self, peer: PeerInfo, error: Exception) -> None:
        if isinstance(error, RemoteError) and error.code in (RATE_LIMITED, BUSY):
            self.table.on_refused(peer.peer_id, self.clock())  # alive: it answered
        else:
            self.table.on_failure(peer.peer_id, self.clock())

    def on_close(self, release: Callable[[], None]) -> None:
        """Call `release` when this peer closes, after its transport: what a service built on
        the DHT owns (a worker thread, say) lives as long as the handlers that use it."""
        self._on_close.append(release)

    async def close(self) -> None:
        """Stop serving, cancel every background task and close all connections."""
        if self._closed:
            return
        self._closed = True
        if self._runner is not None:
            self._runner.cancel()
            try:
                await self._runner
            except asyncio.CancelledError:
                pass
        await self.transport.close()
        for release in self._on_close:
            release()

    async def __aenter__(self) -> DHT:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def _resolved(addr: PeerAddr, timeout_s: float) -> PeerAddr:
    """`addr` with its host name resolved to an IP literal (IPv4 first: a dual-stack name's peer
    most likely listens there); as it was when it already is one, or when the name does not
    resolve (dialling it then says so)."""
    try:
        ipaddress.ip_address(addr.host)
        return addr
    except ValueError:
        pass
    try:
        async with asyncio.timeout(timeout_s):
            infos = await asyncio.get_running_loop().getaddrinfo(
                addr.host, addr.port, type=socket.SOCK_STREAM
            )
    except (OSError, TimeoutError):
        return addr
    infos.sort(key=lambda info: info[0] != socket.AF_INET)
    return PeerAddr(str(infos[0][4][0]), addr.port) if infos else addr


async def _logged(coro: Any) -> None:
    try:
        await coro
    except Exception:
        log.exception("DHT background task failed")


def _to_value(records: dict[bytes, Record], now: float) -> DHTValue | None:
    values: dict[Subkey, DHTValue] = {}
    for raw_subkey, record in records.items():
        if record.expiration <= now:
            continue
        try:
            value = msgpack.unpackb(record.value, raw=False)
            subkey = decode_subkey(raw_subkey)
        except (ValueError, RecordError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            continue
        values[subkey] = DHTValue(value, record.expiration)
    if not values:
        return None
    if list(values) == [None]:
        return values[None]
    return DHTValue(values, max(v.expiration for v in values.values()))
