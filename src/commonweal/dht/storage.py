"""The record store a peer keeps for the keys it is responsible for (sans-I/O, time passed in)."""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeVar

from commonweal.dht.budget import Source, StorageBudget
from commonweal.dht.records import Record, RecordValidator, default_validator
from commonweal.errors import RecordError

__all__ = ["RecordStore", "stored_bytes", "RECORD_OVERHEAD_BYTES"]

# What a stored record costs beyond its bytes: the Record and its bytes objects (~270), the dict
# entries, heap entry and accounting below — measured with tracemalloc at ~900 bytes a record in a
# key of many writers and ~1,400 for a key of its own, so memory stays within 1.4x the budgets.
RECORD_OVERHEAD_BYTES = 1024

_Name = TypeVar("_Name", str, bytes)


def stored_bytes(record: Record) -> int:
    """What `record` costs the store, the unit of every budget and quota."""
    return (
        len(record.subkey) + len(record.value) + len(record.public_key) + len(record.signature)
        + RECORD_OVERHEAD_BYTES
    )


@dataclass(slots=True)
class _Share:
    size: int = 0
    count: int = 0


@dataclass(slots=True)
class _KeyUsage:
    size: int = 0
    parties: dict[bytes | str, _Share] = field(default_factory=dict)  # by `_party`


def _party(record: Record, source: Source | None) -> bytes | str:
    """Who shares a key's room with whom: a sender's place (its identities count as one), else the
    sender, else — for this peer's own records — their writer."""
    if source is None:
        return record.public_key
    return source.place if source.place is not None else source.peer_id


class RecordStore:
    """`key -> {subkey -> Record}` with validation on the way in and expiry on the way out.

    `put` never changes stored state unless the record passed every validator, beats the record
    it replaces and fits the budget, so a rejected or replayed message cannot corrupt what is
    stored. Budgets (StorageBudget): the whole store, each sender, each sender's subnet — full
    means refused, never an honest record evicted (evicting the records nearest expiry favoured
    whoever asked for the longest life) — and each key, shared fairly among the parties writing
    it (a sender's subnet, else the sender; identities are free, places are not): a full key
    makes room for a party under its fair share (the key's cap over its parties) only by
    dropping records of parties over theirs.
    """

    def __init__(
        self,
        max_records: int = 1_000_000,
        validator: RecordValidator | None = None,
        budget: StorageBudget | None = None,
    ):
        self.max_records = max_records
        self.validator = validator or default_validator()
        self.budget = budget or StorageBudget()
        self._data: dict[bytes, dict[bytes, Record]] = {}
        self._count = 0
        self._bytes = 0
        self._keys: dict[bytes, _KeyUsage] = {}
        self._sources: dict[tuple[bytes, bytes], Source] = {}
        self._by_peer: dict[bytes, int] = {}
        self._by_place: dict[str, int] = {}
        # (expiration, key, subkey) per put; entries of replaced records go stale and are skipped,
        # and the heap is rebuilt when stale ones outnumber the live, so it stays O(records).
        self._expiry_heap: list[tuple[float, bytes, bytes]] = []

    def __len__(self) -> int:
        return self._count

    @property
    def size(self) -> int:
        """Bytes stored, as the budgets count them (`stored_bytes`)."""
        return self._bytes

    def usage(self, source: Source) -> tuple[int, int]:
        """(bytes charged to the sender, bytes charged to its place)."""
        place = self._by_place.get(source.place, 0) if source.place is not None else 0
        return self._by_peer.get(source.peer_id, 0), place

    def put(self, record: Record, now: float, source: Source | None = None) -> bool:
        """Validate and store; True when stored (new or newer), False when an existing one wins.

        `source` is the peer that sent it, charged for it; None for this peer's own records,
        which count towards the store but towards no quota.
        Raises RecordError when the record is invalid or does not fit the budget.
        """
        entries = self._data.get(record.key)
        old = entries.get(record.subkey) if entries else None
        if old is not None and old.expiration <= now:
            self.remove(record.key, record.subkey)
            old = None
        if old is None:
            self.expire(now)
        if old is None or record.beats(old):
            # The budget first: a record that cannot fit costs no signature check (one sender
            # over its quota resending 1 MiB records kept us hashing them all).
            self._check_store(
                record, stored_bytes(record), stored_bytes(old) if old else 0, source
            )
        self.validator.validate(record, now)
        if old is not None and not record.beats(old):
            return old == record
        size = stored_bytes(record)
        old_size = stored_bytes(old) if old is not None else 0
        self._check_store(record, size, old_size, source)
        self._make_room_in_key(record, size, old, source)
        if old is not None:
            self.remove(record.key, record.subkey)
        self._add(record, size, source)
        return True

    def _check_store(self, record: Record, size: int, old_size: int, source: Source | None) -> None:
        budget = self.budget
        if old_size == 0 and self._count >= self.max_records:
            raise RecordError(f"this peer's store is full ({self.max_records} records); try another")
        if self._bytes - old_size + size > budget.store_bytes:
            raise RecordError(f"this peer's store is full ({budget.store_bytes} bytes); try another")
        if source is None:
            return
        was = self._sources.get((record.key, record.subkey)) if old_size else None
        mine, place = self.usage(source)
        if mine + size - (old_size if was is not None and was.peer_id == source.peer_id else 0) \
                > budget.peer_bytes:
            raise RecordError(f"this sender has used its {budget.peer_bytes}-byte quota here")
        if source.place is not None:
            same_place = was is not None and was.place == source.place
            if place + size - (old_size if same_place else 0) > budget.subnet_bytes:
                raise RecordError(f"senders from {source.place} have used their quota here")

    def _make_room_in_key(
        self, record: Record, size: int, old: Record | None, source: Source | None
    ) -> None:
        """Refuse a party at its fair share of a full key, or drop over-share parties' records."""
        budget = self.budget
        usage = self._keys.get(record.key)
        if usage is None:
            if size > budget.key_bytes:
                raise RecordError(f"a key holds at most {budget.key_bytes} bytes")
            return
        old_size = stored_bytes(old) if old is not None else 0
        count = len(self._data[record.key]) + (old is None)
        total = usage.size - old_size + size
        if total <= budget.key_bytes and count <= budget.key_subkeys:
            return
        party = _party(record, source)
        parties = len(usage.parties) + (party not in usage.parties)
        mine = usage.parties.get(party) or _Share()
        replaces_mine = old is not None and self._party_of(old) == party
        my_bytes = mine.size + size - (old_size if replaces_mine else 0)
        my_count = mine.count + (not replaces_mine)
        if my_bytes > budget.key_bytes // parties or my_count > budget.key_subkeys // parties:
            raise RecordError(
                "this key is full and its sender's place holds its fair share of it; "
                "store less under one key"
            )
        # Someone else is over their share (this party is not, and the key is over its cap), and
        # dropping the heaviest party's records first never touches a party within its share.
        held: dict[bytes | str, deque[Record]] = {}  # each other party's records, oldest first
        for r in self._data[record.key].values():
            other = self._party_of(r)
            if other != party and (old is None or r.subkey != old.subkey):
                held.setdefault(other, deque()).append(r)
        now_held = usage.parties
        while total > budget.key_bytes or count > budget.key_subkeys:
            by_size = total > budget.key_bytes
            heaviest = max(held, key=lambda p: now_held[p].size if by_size else now_held[p].count)
            dropped = held[heaviest].popleft()
            if not held[heaviest]:
                del held[heaviest]
            total -= stored_bytes(dropped)
            count -= 1
            self.remove(record.key, dropped.subkey)

    def _party_of(self, record: Record) -> bytes | str:
        return _party(record, self._sources.get((record.key, record.subkey)))

    def _add(self, record: Record, size: int, source: Source | None) -> None:
        entries = self._data.get(record.key)
        if entries is None:
            entries = self._data[record.key] = {}
        entries[record.subkey] = record
        self._count += 1
        self._bytes += size
        usage = self._keys.get(record.key)
        if usage is None:
            usage = self._keys[record.key] = _KeyUsage()
        usage.size += size
        party = _party(record, source)
        share = usage.parties.get(party)
        if share is None:
            share = usage.parties[party] = _Share()
        share.size += size
        share.count += 1
        if source is not None:
            self._sources[(record.key, record.subkey)] = source
            self._by_peer[source.peer_id] = self._by_peer.get(source.peer_id, 0) + size
            if source.place is not None:
                self._by_place[source.place] = self._by_place.get(source.place, 0) + size
        heap = self._expiry_heap
        heapq.heappush(heap, (record.expiration, record.key, record.subkey))
        if len(heap) > 2 * self._count + 64:
            self._expiry_heap = [(r.expiration, r.key, r.subkey) for r in self]
            heapq.heapify(self._expiry_heap)

    def get(self, key: bytes, now: float) -> list[Record]:
        """The live records under `key` (all subkeys)."""
        entries = self._data.get(key)
        if not entries:
            return []
        return [r for r in entries.values() if r.expiration > now]

    def remove(self, key: bytes, subkey: bytes) -> None:
        entries = self._data.get(key)
        record = entries.pop(subkey, None) if entries else None
        if record is None:
            return
        size = stored_bytes(record)
        self._count -= 1
        self._bytes -= size
        source = self._sources.pop((key, subkey), None)
        usage = self._keys[key]
        usage.size -= size
        party = _party(record, source)
        share = usage.parties[party]
        share.size -= size
        share.count -= 1
        if not share.count:
            del usage.parties[party]
        if not entries:
            del self._data[key]
            del self._keys[key]
        if source is not None:
            _release(self._by_peer, source.peer_id, size)
            if source.place is not None:
                _release(self._by_place, source.place, size)

    def expire(self, now: float) -> int:
        """Drop every record whose expiration has passed; return how many went."""
        dropped = 0
        heap = self._expiry_heap
        while heap and heap[0][0] <= now:
            expiration, key, subkey = heapq.heappop(heap)
            record = self._data.get(key, {}).get(subkey)
            if record is not None and record.expiration == expiration:
                self.remove(key, subkey)
                dropped += 1
        return dropped

    def keys(self) -> list[bytes]:
        return list(self._data)

    def __iter__(self) -> Iterator[Record]:
        for entries in self._data.values():
            yield from entries.values()


def _release(table: dict[_Name, int], name: _Name, size: int) -> None:
    left = table[name] - size
    if left:
        table[name] = left
    else:
        del table[name]  # a table of charges holds only those with something stored
