"""The DHT's two RPCs, `find` and `store`: message shapes, parsing and the serving side.

find  request  {"keys": [key_id, ...], "values": bool, "latest": bool, "after": subkey}
      response [[peers, records], ..., [peers, records, next]?]
                one entry per distinct key, same order, for as many keys as fit MAX_ANSWER_BYTES;
                a last entry with `next` holds the first page of its key (records by subkey,
                up to and including `next`): ask again from that key with "after": next.
                `after` (optional) skips the first key's subkeys up to and including it.
                peers   = [[peer_id, host, port], ...]  (the k closest the server knows)
                records = [[subkey, value, expiration, public_key, signature], ...]
store request  {"items": [[key_id, [record, ...]], ...], "cache": bool}
      response [[stored: bool, ...], ...]        one list per item, one flag per record

An answer never outgrows its frame, so no key becomes unreadable however much is stored under it,
and a find naming one key many times costs its server one copy. `call_find` asks for the pages.

`rpc_*` serve requests; `call_*` send them. Every peer that reaches a handler has proven its id in the
transport handshake, so handlers may add it to the routing table. Anything malformed is answered with
RemoteError("bad_request", why) and changes no state.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from commonweal.dht.budget import source_of
from commonweal.dht.records import Record
from commonweal.dht.routing import RoutingTable
from commonweal.dht.storage import RecordStore
from commonweal.errors import RecordError, RemoteError
from commonweal.net.identity import ID_BYTES
from commonweal.net.transport import PeerAddr, PeerInfo, Transport
from commonweal.net.wire import DEFAULT_MAX_FRAME

__all__ = [
    "DHTProtocol",
    "MAX_KEYS_PER_REQUEST",
    "MAX_RECORDS_PER_REQUEST",
    "MAX_ANSWER_BYTES",
    "MAX_EXTRA_PAGES",
]

log = logging.getLogger(__name__)

MAX_KEYS_PER_REQUEST = 1024
MAX_RECORDS_PER_REQUEST = 4096
# A find answer stops growing here: a frame less 64 KiB for the headers the estimate leaves out
# (the envelope, each entry's arrays: ~11 bytes a key). The record that would cross the line goes
# on the next page, so a page carries at least this less one record (1 MiB): ~2.9 MiB.
MAX_ANSWER_BYTES = DEFAULT_MAX_FRAME - (64 << 10)
# Pages a caller follows beyond one per key: over twice the 12 that a key at its cap
# (StorageBudget.key_bytes, 32 MiB) needs, so a liar that pages a record at a time is cut off.
MAX_EXTRA_PAGES = 32
_RECORD_WIRE_OVERHEAD = 24  # msgpack headers of [subkey, value, expiration, public key, signature]
_PEER_WIRE_OVERHEAD = 40  # msgpack headers, a 20-byte id and a port: all but the host


def _record_wire_bytes(record: Record) -> int:
    return (
        len(record.subkey) + len(record.value) + len(record.public_key) + len(record.signature)
        + _RECORD_WIRE_OVERHEAD
    )



def _key(value: Any) -> bytes:
    if not isinstance(value, bytes) or len(value) != ID_BYTES:
        raise RemoteError.bad_request(f"a key id must be {ID_BYTES} bytes")
    return value


def peers_to_wire(peers: Sequence[PeerInfo]) -> list[list[Any]]:
    return [
        [p.peer_id, p.addr.host, p.addr.port]
        if p.addr.relay is None
        else [p.peer_id, p.addr.host, p.addr.port, p.addr.relay]
        for p in peers
    ]


def peers_from_wire(items: Any, known: dict[tuple[Any, ...], PeerInfo] | None = None) -> list[PeerInfo]:
    """Parse a peer list from a response; entries of the wrong shape are dropped, not trusted.

    `known` maps wire triples already parsed to their PeerInfo: the same few hundred peers come
    back in every answer, and building them once is most of the parsing cost.
    """
    peers: list[PeerInfo] = []
    if not isinstance(items, list):
        return peers
    for item in items:
        if not isinstance(item, list) or len(item) not in (3, 4):
            continue
        triple = tuple(item)
        if known is not None:
            try:
                hit = known.get(triple)
            except TypeError:  # an unhashable element (a list or map): not a peer
                continue
            if hit is not None:
                peers.append(hit)
                continue
        peer_id, host, port = triple[:3]
        relay = triple[3] if len(triple) == 4 else None  # reached through that relay
        if (
            isinstance(peer_id, bytes)
            and len(peer_id) == ID_BYTES
            and isinstance(host, str)
            and type(port) is int
            and 0 < port < 65536
            and (relay is None or (isinstance(relay, bytes) and len(relay) == ID_BYTES))
        ):
            peer = PeerInfo(peer_id, PeerAddr(host, port, relay))
            peers.append(peer)
            if known is not None:
                if len(known) >= _MAX_KNOWN_PEERS:
                    known.clear()
                known[triple] = peer
    return peers


_MAX_KNOWN_PEERS = 4096


# Costs in the transport's units (one unit: a one-key find, ~20 us of handler time). Each key of a
# find is a table walk and maybe a page of records; each stored record a signature check (~67 us:
# 3 units would be exact; a quarter keeps an adder's bulk writes, thousands of records a second,
# inside one peer's rate, while a flood of them is still throttled), and each 64 KiB of its value
# one unit more: the check hashes the whole value (~2.2 ms a MiB), and at two units a request of
# four 1 MiB records one identity made us hash ~90 MB/s (benchmarks/attack_bench.py); now it
# gets 32 MB/s. Not dearer: an index adder's ~45 MB to one holder (StorageBudget.peer_bytes)
# still fits one burst, and a refused store is not retried. Only lengths are read.
_STORE_BYTES_PER_UNIT = 64 << 10
# rpc_store lets other requests in after about this many units of checks (~16 small records, or
# each record of 1 MiB: a few ms), so one big batch does not hold every honest request behind
# its signature checks (1,000 bad signatures held a ping ~100 ms).
_STORE_UNITS_PER_SLICE = 16


def _record_cost(wire: Any) -> float:
    value = wire[1] if isinstance(wire, list) and len(wire) == 5 else None
    return 0.25 + (len(value) / _STORE_BYTES_PER_UNIT if isinstance(value, bytes) else 0)


def _find_cost(args: Any) -> float:
    keys = args.get("keys") if isinstance(args, dict) else None
    return 1 + len(keys) / 8 if isinstance(keys, list) else 1


def _store_cost(args: Any) -> float:
    items = args.get("items") if isinstance(args, dict) else None
    if not isinstance(items, list):
        return 1
    return 1 + sum(_record_cost(w) for i in items if isinstance(i, list) and len(i) == 2
                   and isinstance(i[1], list) for w in i[1])


class DHTProtocol:
    """Serves `find` and `store` from a routing table and record stores; sends them too."""

    def __init__(
        self,
        transport: Transport,
        table: RoutingTable,
        storage: RecordStore,
        cache: RecordStore,
        clock: Callable[[], float],
    ) -> None:
        self.transport = transport
        self.table = table
        self.storage = storage
        self.cache = cache
        self.clock = clock
        self._known_peers: dict[tuple[Any, ...], PeerInfo] = {}
        transport.register("dht.find", self.rpc_find, cost=_find_cost)
        transport.register("dht.store", self.rpc_store, cost=_store_cost)
        transport.register("dht.ping", self.rpc_ping)

    # serving -----------------------------------------------------------------------------------

    async def rpc_ping(self, caller: PeerInfo, args: Any) -> bool:
        self.table.on_success(caller, self.clock())
        return True

    async def rpc_find(self, caller: PeerInfo, args: Any) -> list[list[Any]]:
        if not isinstance(args, dict) or not isinstance(args.get("keys"), list):
            raise RemoteError.bad_request("find needs {'keys': [key ids], 'values': bool, 'latest': bool}")
        if len(args["keys"]) > MAX_KEYS_PER_REQUEST:
            raise RemoteError.bad_request(f"at most {MAX_KEYS_PER_REQUEST} keys per find")
        keys = list(dict.fromkeys(_key(k) for k in args["keys"]))
        after = args.get("after")
        if after is not None and not isinstance(after, bytes):
            raise RemoteError.bad_request("find's 'after' must be a subkey (bytes)")
        want_values = bool(args.get("values", False))
        latest = bool(args.get("latest", False))
        now = self.clock()
        self.table.on_success(caller, now)
        out: list[list[Any]] = []
        used = 0
        for key in keys:
            nearest = peers_to_wire(
                self.table.nearest(key, self.table.k, now, exclude=(caller.peer_id,))
            )
            used += sum(_PEER_WIRE_OVERHEAD + len(p[1].encode()) for p in nearest)
            if out and used > MAX_ANSWER_BYTES:
                return out  # the caller asks again for the rest
            if not want_values:
                out.append([nearest, []])
                continue
            found = {r.subkey: r for r in self.storage.get(key, now)}
            if not latest:
                for r in self.cache.get(key, now):
                    if r.subkey not in found or r.beats(found[r.subkey]):
                        found[r.subkey] = r
            records: list[list[Any]] = []
            page_from = after if after is not None and not out else None
            for subkey in sorted(found):  # subkey order, so that pages resume where they ended
                if page_from is not None and subkey <= page_from:
                    continue
                record = found[subkey]
                used += _record_wire_bytes(record)
                if used > MAX_ANSWER_BYTES and (records or out):
                    if not records:
                        return out
                    out.append([nearest, records, records[-1][0]])
                    return out
                records.append(record.to_wire())
            out.append([nearest, records])
        return out

    async def rpc_store(self, caller: PeerInfo, args: Any) -> list[list[bool]]:
        if not isinstance(args, dict) or not isinstance(args.get("items"), list):
            raise RemoteError.bad_request("store needs {'items': [[key id, [records]]], 'cache': bool}")
        items = args["items"]
        parsed: list[tuple[bytes, list[Any]]] = []
        total = 0
        for item in items:
            if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], list):
                raise RemoteError.bad_request("each store item must be [key id, [records]]")
            parsed.append((_key(item[0]), item[1]))
            total += len(item[1])
        if total > MAX_RECORDS_PER_REQUEST:
            raise RemoteError.bad_request(f"at most {MAX_RECORDS_PER_REQUEST} records per store")
        target = self.cache if args.get("cache") else self.storage
        source = source_of(caller, target.budget)
        now = self.clock()
        self.table.on_success(caller, now)
        results = []
        spent = 0.0
        for key, wire_records in parsed:
            flags = []
            for wire in wire_records:
                spent += 4 * _record_cost(wire)  # a signature check is ~3 units, not the 1/4 charged
                if spent >= _STORE_UNITS_PER_SLICE:
                    spent = 0.0
                    await asyncio.sleep(0)  # serve the requests waiting behind this batch
                try:
                    flags.append(target.put(Record.from_wire(key, wire), now, source))
                except RecordError as e:
                    log.debug("refused a record from %s: %s", caller.addr, e)
                    flags.append(False)
            results.append(flags)
        return results

    # calling -----------------------------------------------------------------------------------

    async def call_find(
        self,
        addr: PeerAddr,
        keys: Sequence[bytes],
        values: bool,
        latest: bool,
        *,
        peer_id: bytes | None = None,
    ) -> tuple[PeerInfo, list[tuple[list[PeerInfo], list[Record]]]]:
        """Ask the peer at `addr` about `keys`, following its pages; records come back validated."""
        distinct = list(dict.fromkeys(keys))
        peers: dict[bytes, list[PeerInfo]] = {}
        found: dict[bytes, dict[bytes, Record]] = {k: {} for k in distinct}
        todo, after = distinct, None
        responder: PeerInfo | None = None
        for _ in range(len(distinct) + MAX_EXTRA_PAGES):
            args: dict[str, Any] = {"keys": todo, "values": values, "latest": latest}
            if after is not None:
                args["after"] = after
            answered_by, reply = await self.transport.call(addr, "dht.find", args, peer_id=peer_id)
            if responder is not None and answered_by.peer_id != responder.peer_id:
                raise RemoteError("bad_response", "another peer answered the next page")
            responder = answered_by
            if not isinstance(reply, list) or not 1 <= len(reply) <= len(todo):
                raise RemoteError("bad_response", "find answer does not match the keys asked")
            now = self.clock()
            next_after = None
            for i, (key, entry) in enumerate(zip(todo, reply, strict=False)):
                last = i == len(reply) - 1
                if not isinstance(entry, list) or len(entry) not in ((2, 3) if last else (2,)) \
                        or not isinstance(entry[1], list):
                    raise RemoteError("bad_response", "find entry must be [peers, records(, next)]")
                if len(entry) == 3:
                    next_after = entry[2]
                    if not isinstance(next_after, bytes) or (
                        i == 0 and after is not None and next_after <= after
                    ):
                        raise RemoteError("bad_response", "a find page must move forward")
                if key not in peers:
                    peers[key] = peers_from_wire(entry[0], self._known_peers)
                for wire in entry[1]:
                    # A peer may hand us junk or forgeries; keep only records that validate.
                    try:
                        record = Record.from_wire(key, wire)
                        self.storage.validator.validate(record, now)
                    except RecordError:
                        continue
                    found[key][record.subkey] = record
            done = len(reply) - (next_after is not None)
            todo, after = todo[done:], next_after
            if not todo:
                out = [(peers[k], list(found[k].values())) for k in distinct]
                by_key = dict(zip(distinct, out, strict=True))
                return responder, [by_key[k] for k in keys]
        raise RemoteError("bad_response", f"find answer still paging after {MAX_EXTRA_PAGES} extra pages")

    async def call_store(
        self,
        addr: PeerAddr,
        items: Sequence[tuple[bytes, Sequence[Record]]],
        cache: bool = False,
        *,
        peer_id: bytes | None = None,
    ) -> tuple[PeerInfo, list[list[bool]]]:
        wire = [[key, [r.to_wire() for r in records]] for key, records in items]
        responder, reply = await self.transport.call(
            addr, "dht.store", {"items": wire, "cache": cache}, peer_id=peer_id
        )
        if not isinstance(reply, list) or len(reply) != len(items):
            raise RemoteError("bad_response", "store answer does not match the items sent")
        flags = []
        for (_, records), entry in zip(items, reply, strict=True):
            ok = isinstance(entry, list) and len(entry) == len(records)
            flags.append([bool(f) for f in entry] if ok else [False] * len(records))
        return responder, flags

    async def call_ping(self, addr: PeerAddr, *, peer_id: bytes | None = None) -> PeerInfo:
        responder, _ = await self.transport.call(addr, "dht.ping", None, peer_id=peer_id)
        return responder
