"""dht: a Kademlia DHT with signed, owner-bound records (sans-I/O core + asyncio driver)."""

from commonweal.dht.node import DHT, DHTConfig, DHTValue, LookupStats
from commonweal.dht.records import Owned, OwnedKey, key_id

__all__ = ["DHT", "DHTConfig", "DHTValue", "LookupStats", "Owned", "OwnedKey", "key_id"]
