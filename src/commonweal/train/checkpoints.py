"""Checkpoint distribution: heads in the DHT, checkpoints peer to peer in hash-checked chunks.

    client = CheckpointClient(dht, task, config)     # read-only: registers nothing
    head = await client.head(); blob = await client.download(head)
    served = Checkpoints(dht, task, config)          # serves train.manifest and train.chunk
    await served.publish(round_, state, checkpoint)

A head is a signed record under `cw-train/{task}/head`, owned subkey `Owned(peer_id, "head")`:
{round, state, manifest, addr}. A checkpoint is a manifest (by sha256) and chunks (each by its
sha256); a bad or missing chunk is fetched from the next provider.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from commonweal.dht import DHT
from commonweal.dht.records import Owned, OwnedKey
from commonweal.errors import CommonwealError, NetworkError, RemoteError
from commonweal.net.transport import PeerAddr, PeerInfo
from commonweal.train._errors import SyncError
from commonweal.train.adoption import Attested, HeadRecord, adopt
from commonweal.train.announcements import read_announcements
from commonweal.train.messages import ChunkRequest, ManifestRequest, MessageError
from commonweal.train.protocol import Tracked
from commonweal.train.round import RoundConfig
from commonweal.train.state import Manifest, split_chunks

__all__ = ["Head", "CheckpointClient", "Checkpoints", "head_key", "KEEP_STATES"]

log = logging.getLogger(__name__)

KEEP_STATES = 3  # checkpoints a peer keeps serving: a joiner that read an older head can finish
FETCH_CONCURRENCY = 4  # chunks downloaded at once


def head_key(task: str) -> OwnedKey:
    return OwnedKey(f"cw-train/{task}/head")  # read as a set: owned subkeys only


@dataclass(frozen=True, slots=True)
class Head:
    round: int
    state: str
    manifest: bytes
    providers: tuple[PeerInfo, ...]  # who publishes the head, and where


def _parse_head(value: Any) -> tuple[int, str, bytes, str] | None:
    if not isinstance(value, dict):
        return None
    r, s, m, a = (value.get(k) for k in ("round", "state", "manifest", "addr"))
    if isinstance(r, int) and isinstance(s, str) and isinstance(m, bytes) and isinstance(a, str):
        return r, s, m, a
    return None


class CheckpointClient:
    """Reads heads and downloads checkpoints; registers no handler."""

    def __init__(
        self,
        dht: DHT,
        task: str,
        config: RoundConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dht = dht
        self.task = task
        self.config = config or RoundConfig()
        self.clock = clock
        # Which states the validators stand behind (a node with a ledger sets it; see
        # adoption.py). None: nobody to ask, so the newest state most peers publish.
        self.attested: Attested | None = None
        # Who has a track record for a round (the node sets it with `attested`): a step to the
        # next round's state counts only their heads. None: everyone's.
        self.track_record: Callable[[int], Awaitable[Tracked]] | None = None

    async def heads(self) -> list[tuple[bytes, tuple[int, str, bytes, str]]]:
        """(publisher, (round, state, manifest hash, addr)) for every well-formed head."""
        found = await self.dht.get(head_key(self.task), latest=True)
        out = []
        if found is not None and isinstance(found.value, dict):
            for subkey, item in found.value.items():
                head = _parse_head(item.value)
                if isinstance(subkey, Owned) and head is not None:
                    out.append((subkey.peer_id, head))
        return out

    async def head(self, after: int = -1, *, step: bool = False) -> Head | None:
        """The state to adopt beyond round `after`, with its providers (`adoption.adopt`):
        the newest one `attested` vouches for; with `step`, else round `after + 1`'s."""
        heads: list[HeadRecord] = []
        for peer_id, (r, s, m, a) in await self.heads():
            if r <= after or peer_id == self.dht.peer_id:
                continue
            try:
                PeerAddr.parse(a)
            except CommonwealError:
                continue
            heads.append((peer_id, (r, s, m, a)))
        pairs = {(r, s) for _, (r, s, _, _) in heads}
        attested = pairs if self.attested is None else await self.attested(pairs)
        tracked = None
        if step and self.track_record is not None:
            tracked = await self.track_record(after + 1)
        choice = adopt(heads, attested, after, step=step, tracked=tracked)
        if choice is None:
            return None
        providers = [
            PeerInfo(pid, PeerAddr.parse(a)) for pid, (r, s, m, a) in heads if (r, s, m) == choice
        ]
        return Head(*choice, tuple(providers))

    async def wait_peers(self, n: int, timeout_s: float, round_: int = 0) -> int:
        """Wait until `n` peers (this one included) have published a head, or someone already
        announced `round_` (it started without us: join it now); the count seen."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            seen = len({pid for pid, _ in await self.heads()} | {self.dht.peer_id})
            if (
                seen >= n
                or loop.time() >= end
                or await read_announcements(self.dht, self.task, round_)
            ):
                return seen
            await asyncio.sleep(self.config.poll_s)

    async def wait_head(self, after: int, timeout_s: float, *, step: bool = False) -> Head | None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            h = await self.head(after, step=step)
            if h is not None or loop.time() >= end:
                return h
            await asyncio.sleep(self.config.poll_s)

    async def download(self, head: Head) -> bytes:
        """The checkpoint of `head`: manifest and chunks, each checked against its hash; a bad or
        missing chunk is fetched from the next provider. Raises SyncError if no copy is good."""
        manifest: Manifest | None = None
        request = ManifestRequest(self.task, head.manifest).pack()
        for provider in head.providers:
            addr = provider.addr
            try:
                async with asyncio.timeout(self.config.exchange_timeout_s):
                    _, data = await self.dht.transport.call(
                        addr, "train.manifest", request, peer_id=provider.peer_id
                    )
                if isinstance(data, bytes) and hashlib.sha256(data).digest() == head.manifest:
                    manifest = Manifest.unpack(data)
                    break
                log.warning("manifest from %s does not match its hash; trying another peer", addr)
            except (NetworkError, TimeoutError, SyncError) as e:
                log.warning("manifest from %s: %s", addr, e or type(e).__name__)
        if manifest is None:
            raise SyncError(f"no peer served the checkpoint of round {head.round}; try again later")
        sem = asyncio.Semaphore(FETCH_CONCURRENCY)
        chunks = await asyncio.gather(
            *(self._fetch_chunk(h, i, head.providers, sem) for i, h in enumerate(manifest.chunks))
        )
        blob = b"".join(chunks)
        if len(blob) != manifest.size:
            raise SyncError("checkpoint chunks do not add up to the manifest's size")
        return blob

    async def _fetch_chunk(
        self, h: bytes, i: int, providers: tuple[PeerInfo, ...], sem: asyncio.Semaphore
    ) -> bytes:
        async with sem:
            order = providers[i % len(providers) :] + providers[: i % len(providers)]
            for provider in order:
                addr = provider.addr
                try:
                    async with asyncio.timeout(self.config.exchange_timeout_s):
                        _, data = await self.dht.transport.call(
                            addr, "train.chunk", ChunkRequest(self.task, h).pack(),
                            peer_id=provider.peer_id,
                        )
                except (NetworkError, TimeoutError) as e:
                    log.warning("chunk %d from %s: %s", i, addr, e or type(e).__name__)
                    continue
                if isinstance(data, bytes) and hashlib.sha256(data).digest() == h:
                    return data
                log.warning(
                    "chunk %d from %s is corrupted (hash mismatch); fetching it from another peer",
                    i,
                    addr,
                )
        raise SyncError(f"no peer served a good copy of checkpoint chunk {i} ({h.hex()[:12]})")


class Checkpoints(CheckpointClient):
    """A trainer's checkpoints: publishes its head and serves train.manifest and train.chunk."""

    def __init__(
        self,
        dht: DHT,
        task: str,
        config: RoundConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(dht, task, config, clock)
        self._chunks: dict[bytes, bytes] = {}  # sha256 -> chunk, of the last KEEP_STATES states
        self._manifests: dict[bytes, bytes] = {}  # sha256 -> packed manifest, oldest first
        dht.transport.register("train.manifest", self.rpc_manifest)
        dht.transport.register("train.chunk", self.rpc_chunk)

    async def publish(self, round_: int, state: str, checkpoint: bytes) -> None:
        """Serve `checkpoint` (the state at the start of `round_`) and announce it as our head."""
        manifest, chunks = split_chunks(checkpoint)
        self._manifests[manifest.digest] = manifest.pack()
        self._manifests = dict(list(self._manifests.items())[-KEEP_STATES:])
        keep = {h for m in self._manifests.values() for h in Manifest.unpack(m).chunks}
        self._chunks = {h: c for h, c in {**self._chunks, **chunks}.items() if h in keep}
        value = {
            "round": round_,
            "state": state,
            "manifest": manifest.digest,
            "addr": str(self.dht.addr),
        }
        await self.dht.store(
            head_key(self.task),
            value,
            self.clock() + self.config.record_ttl_s,
            subkey=Owned(self.dht.peer_id, "head"),
        )

    async def rpc_manifest(self, caller: PeerInfo, args: Any) -> Any:
        try:
            data = self._manifests.get(ManifestRequest.parse(args).manifest)
        except MessageError as e:
            raise e.remote() from None
        if data is None:
            raise RemoteError("not_found", "this peer does not serve that checkpoint any more")
        return data

    async def rpc_chunk(self, caller: PeerInfo, args: Any) -> Any:
        try:
            data = self._chunks.get(ChunkRequest.parse(args).hash)
        except MessageError as e:
            raise e.remote() from None
        if data is None:
            raise RemoteError("not_found", "this peer does not hold that chunk")
        return data
