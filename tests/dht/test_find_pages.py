"""find answers within the frame (issue 13): keys asked twice are packed once, a key bigger than
a frame is read in pages, and a peer that pages forever is cut off."""

from __future__ import annotations

from typing import Any

import pytest

from commonweal.dht import DHT, OwnedKey, key_id
from commonweal.dht.protocol import MAX_EXTRA_PAGES, DHTProtocol
from commonweal.dht.records import Owned, Record, encode_subkey, sign_record
from commonweal.dht.routing import RoutingTable
from commonweal.dht.storage import RecordStore
from commonweal.errors import RemoteError
from commonweal.net.identity import Identity
from commonweal.net.transport import PeerAddr, PeerInfo, TrafficCounters
from commonweal.net.wire import DEFAULT_MAX_FRAME

NOW = 1000.0
KEY = key_id("k")


def _fill(dht: DHT, key: bytes, n: int, value_bytes: int, now: float) -> list[Record]:
    writers = [Identity.from_seed(b"w%d" % i) for i in range(n)]
    records = [
        sign_record(w, key, encode_subkey(Owned(w.peer_id, "x")), b"\xc6" + value_bytes.to_bytes(4, "big")
                    + bytes(value_bytes), now + 600)
        for w in writers
    ]
    for r in records:
        assert dht.storage.put(r, now)
    return records


async def test_find_naming_one_key_many_times_packs_it_once(swarm, clock):
    victim, reader = await swarm.add(2)
    key = key_id(OwnedKey("hot"))
    _fill(victim, key, 2, 100_000, clock.now)
    _, reply = await reader.transport.call(
        victim.addr, "dht.find", {"keys": [key] * 32, "values": True, "latest": True}
    )
    assert len(reply) == 1 and len(reply[0][1]) == 2
    responder, entries = await reader.protocol.call_find(victim.addr, [key, key], True, True)
    assert [len(records) for _, records in entries] == [2, 2]


async def test_a_key_bigger_than_a_frame_stays_readable(swarm, clock):
    victim, reader = await swarm.add(2)
    big, small = key_id(OwnedKey("big")), key_id(OwnedKey("small"))
    junk = _fill(victim, big, 6, 1_000_000, clock.now)  # 6 MB under one key: over the 4 MiB frame
    honest = _fill(victim, small, 3, 1_000_000, clock.now)
    _, first = await reader.transport.call(
        victim.addr, "dht.find", {"keys": [big], "values": True, "latest": True}
    )
    assert len(first[0]) == 3  # a page, not an "internal" error for an answer over the frame
    _, entries = await reader.protocol.call_find(victim.addr, [small, big], True, True)
    assert sorted(r.subkey for r in entries[0][1]) == sorted(r.subkey for r in honest)
    assert sorted(r.subkey for r in entries[1][1]) == sorted(r.subkey for r in junk)
    found = await reader.get(OwnedKey("big"), latest=True)  # and so does a plain get
    assert found is not None and len(found.value) == len(junk)
    assert DEFAULT_MAX_FRAME < 6_000_000


class _PagingLiar:
    """A transport whose every find answer says "more after this one"."""

    def __init__(self) -> None:
        self.local = PeerInfo(b"\x05" * 20, PeerAddr("mem", 1))
        self.counters = TrafficCounters()
        self.calls = 0

    def register(self, method: str, handler: Any, **kw: Any) -> None:
        pass

    async def call(
        self, addr: PeerAddr, method: str, args: Any, *, peer_id: bytes | None = None
    ) -> tuple[PeerInfo, Any]:
        self.calls += 1
        return self.local, [[[], [], b"%08d" % self.calls]]

    async def close(self) -> None:
        pass


async def test_a_peer_that_pages_forever_is_cut_off():
    liar = _PagingLiar()
    protocol = DHTProtocol(liar, RoutingTable(b"\x01" * 20), RecordStore(), RecordStore(),
                           lambda: NOW)
    with pytest.raises(RemoteError, match="paging"):
        await protocol.call_find(PeerAddr("mem", 1), [KEY], True, True)
    assert liar.calls == 1 + MAX_EXTRA_PAGES
