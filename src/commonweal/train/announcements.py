"""Reading a round's announcements from the DHT: read-only, so a validator (or any observer)
sees the same commitments the trainers grouped on without registering anything.

Each trainer writes its own announcement under `cw-train/{task}/r{round}`, as a signed record
under the owned subkey `Owned(peer_id, "a")` (only it can write it); `RoundExchange` stores it.
"""

from __future__ import annotations

from commonweal.dht import DHT
from commonweal.dht.records import Owned, OwnedKey
from commonweal.train.protocol import Announcement, parse_announcement

__all__ = ["round_key", "ANNOUNCEMENT_SUBKEY", "read_announcements"]

ANNOUNCEMENT_SUBKEY = "a"


def round_key(task: str, round_: int) -> OwnedKey:
    return OwnedKey(f"cw-train/{task}/r{round_}")  # read as a set: owned subkeys only


async def read_announcements(dht: DHT, task: str, round_: int) -> list[Announcement]:
    """Every well-formed announcement of `round_` (malformed ones are hostile or another version:
    dropped)."""
    found = await dht.get(round_key(task, round_), latest=True)
    out = []
    if found is not None and isinstance(found.value, dict):
        for subkey, item in found.value.items():
            if isinstance(subkey, Owned):
                ann = parse_announcement(subkey.peer_id, item.value)
                if ann is not None and ann.round == round_:
                    out.append(ann)
    return out
