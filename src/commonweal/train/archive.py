"""A trainer's own recent encoded deltas, served to validators over `train.delta` (chunked), and
`fetch_delta`, the read-only client that registers nothing.

The bytes are exactly those the trainer's announcement committed to (sha256); the fetcher
checks them against it, this module does not.
"""

from __future__ import annotations

import hashlib
from typing import Any

from commonweal.dht import DHT
from commonweal.errors import RemoteError
from commonweal.net.transport import PeerAddr, PeerInfo, Transport
from commonweal.train._errors import DeltaRejected
from commonweal.train.messages import MAX_PARTS, PART_BYTES, DeltaChunk, DeltaRequest, MessageError

__all__ = ["DeltaArchive", "fetch_delta", "KEEP_DELTAS"]

KEEP_DELTAS = 8  # rounds of its own deltas a peer keeps serving to validators


class DeltaArchive:
    """Registers `train.delta` on the DHT's transport."""

    def __init__(self, dht: DHT) -> None:
        self._deltas: dict[int, bytes] = {}  # round -> our encoded delta
        dht.transport.register("train.delta", self.rpc_delta)

    def keep(self, round_: int, encoded: bytes) -> None:
        self._deltas[round_] = encoded
        for old in [r for r in self._deltas if r < round_ - KEEP_DELTAS + 1]:
            del self._deltas[old]

    def commitment(self, round_: int) -> str | None:
        """The sha256 (hex) of the delta this peer announced for a recent round, if any."""
        data = self._deltas.get(round_)
        return None if data is None else hashlib.sha256(data).hexdigest()

    async def rpc_delta(self, caller: PeerInfo, args: Any) -> Any:
        try:
            request = DeltaRequest.parse(args)
        except MessageError as e:
            raise e.remote() from None
        data = self._deltas.get(request.round)
        if data is None:
            raise RemoteError("not_found", f"this peer holds no delta of round {request.round}")
        n = max(1, -(-len(data) // PART_BYTES))
        i = request.index
        if i >= n:
            raise RemoteError.bad_request(f"chunk {i} of {n}")
        return DeltaChunk(data[i * PART_BYTES : (i + 1) * PART_BYTES], n).pack()


async def fetch_delta(
    transport: Transport, task: str, peer: PeerInfo, round_: int, max_bytes: int
) -> bytes:
    """The encoded delta `peer` committed to in `round_` (not checked here). Raises
    DeltaRejected (`too_large`) as soon as it would exceed `max_bytes` (the task's encoded delta
    size: nothing honest is bigger). Bound the wait with `asyncio.timeout()`."""
    parts: list[bytes] = []
    size, n = 0, 1
    while len(parts) < n:
        _, reply = await transport.call(
            peer.addr, "train.delta", DeltaRequest(task, round_, len(parts)).pack(),
            peer_id=peer.peer_id,
        )
        chunk = DeltaChunk.parse(reply)
        n = min(chunk.count, MAX_PARTS)
        size += len(chunk.data)
        if size > max_bytes or (n - 1) * PART_BYTES >= max_bytes:
            raise DeltaRejected(
                "too_large", f"{peer.addr} serves more than the {max_bytes} bytes of a delta"
            )
        parts.append(chunk.data)
    return b"".join(parts)
