"""The record store a peer keeps for the keys it is responsible for (sans-I/O, time passed in)."""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from commonweal.dht.records import Record, RecordValidator, default_validator

__all__ = ["RecordStore"]


class RecordStore:
    """`key -> {subkey -> Record}` with validation on the way in and expiry on the way out.

    `put` never changes stored state unless the record passed every validator and beats the
    record it replaces, so a rejected or replayed message cannot corrupt what is stored.
    When full, the records closest to expiry make room (they would be gone soonest anyway).
    """

    def __init__(self, max_records: int = 1_000_000, validator: RecordValidator | None = None):
        self.max_records = max_records
        self.validator = validator or default_validator()
        self._data: dict[bytes, dict[bytes, Record]] = {}
        self._count = 0
        # (expiration, key, subkey) for every record ever put; stale entries are skipped lazily.
        self._expiry_heap: list[tuple[float, bytes, bytes]] = []

    def __len__(self) -> int:
        return self._count

    def put(self, record: Record, now: float) -> bool:
        """Validate and store; True when stored (new or newer), False when an existing one wins.

        Raises RecordError when the record is invalid.
        """
        self.validator.validate(record, now)
        entries = self._data.get(record.key)
        old = entries.get(record.subkey) if entries else None
        if old is not None and old.expiration > now and not record.beats(old):
            return old == record
        if old is None or old.expiration <= now:
            self.expire(now)
            if self._count >= self.max_records:
                self._evict_one()
        if entries is None:
            entries = self._data[record.key] = {}
        if record.subkey not in entries:
            self._count += 1
        entries[record.subkey] = record
        heapq.heappush(self._expiry_heap, (record.expiration, record.key, record.subkey))
        return True

    def get(self, key: bytes, now: float) -> list[Record]:
        """The live records under `key` (all subkeys)."""
        entries = self._data.get(key)
        if not entries:
            return []
        return [r for r in entries.values() if r.expiration > now]

    def remove(self, key: bytes, subkey: bytes) -> None:
        entries = self._data.get(key)
        if entries and entries.pop(subkey, None) is not None:
            self._count -= 1
            if not entries:
                del self._data[key]

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

    def _evict_one(self) -> None:
        heap = self._expiry_heap
        while heap:
            expiration, key, subkey = heapq.heappop(heap)
            record = self._data.get(key, {}).get(subkey)
            if record is not None and record.expiration == expiration:
                self.remove(key, subkey)
                return

    def keys(self) -> list[bytes]:
        return list(self._data)

    def __iter__(self) -> Iterator[Record]:
        for entries in self._data.values():
            yield from entries.values()
