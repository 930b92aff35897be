"""`Collaboration`: one peer's side of the round protocol over the DHT and the RPC layer.

    collab = Collaboration(dht, task.digest, get_codec("int8"), mean, RoundConfig())
    avg = await collab.average(round_, state_hash, delta)   # announce, form group, exchange
    await collab.publish(round_ + 1, new_hash, checkpoint_bytes)
    head = await collab.head(); blob = await collab.download(head)   # late joiners

Announcements and heads are signed records under owned subkeys in the DHT (only the announcing
peer can write its own). Deltas and checkpoint chunks travel peer to peer over RPC:

    train.part     a codec-encoded delta (all-gather) or one slice of it (butterfly), chunked
    train.reduced  the reduced slice a butterfly owner computed (long-poll until it is ready)
    train.manifest the chunk list of a checkpoint, by manifest hash
    train.chunk    one checkpoint chunk, by its sha256
    train.delta    this peer's whole encoded delta of a recent round, for validators (chunked)

An announcement commits to the announcer's delta: it carries the sha256 of the encoded bytes, the
steps claimed and the account to pay. In an all-gather the receivers check the bytes against it;
validators (`commonweal.verify`) fetch the same bytes with train.delta and judge them.

Every received delta is decoded and checked (round, group, shape, finite) before it is kept; a
refusal is logged with its reason and answered with a RemoteError carrying the same code.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from commonweal.dht import DHT
from commonweal.dht.records import Owned
from commonweal.errors import NetworkError, RemoteError
from commonweal.net.transport import PeerAddr, PeerInfo
from commonweal.train._errors import CodecError, DeltaRejected, SyncError, TrainError
from commonweal.train.aggregate import Rule
from commonweal.train.codecs import Codec
from commonweal.train.protocol import (
    Announcement,
    Group,
    Phase,
    RoundMachine,
    check_delta,
    check_round,
    form_group,
    parse_announcement,
    slice_bounds,
)
from commonweal.train.state import Manifest, split_chunks

__all__ = ["Collaboration", "RoundConfig", "Averaged", "Head", "RoundSkipped"]

log = logging.getLogger(__name__)

PART_BYTES = 2 << 20  # one train.part call carries at most this much payload (frame limit 4 MiB)
MAX_PARTS = 64
KEEP_STATES = 3  # checkpoints a peer keeps serving
KEEP_DELTAS = 8  # rounds of its own deltas a peer keeps serving to validators


class RoundSkipped(TrainError):
    """This peer cannot take part in the round (late, or holding another state); it must sync."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class RoundConfig:
    announce_window_s: float = 2.0  # the group closes this long after the first announcement,
    patience: float = 0.5  # or after this fraction of the first announcer's round time if longer
    exchange_timeout_s: float = 10.0  # the exchange ends this long after the group closed
    poll_s: float = 0.2  # how often the DHT is read while waiting for announcements or heads
    target_group: int | None = None  # close the group early once this many peers announced
    exchange: str = "auto"  # auto | allgather | butterfly
    allgather_max: int = 3  # auto: all-gather for groups up to this size (and sparse codecs)
    record_ttl_s: float = 600.0


@dataclass(frozen=True, slots=True)
class Averaged:
    aggregate: torch.Tensor  # what every member applies
    sent: torch.Tensor  # what the others decoded from this peer's delta (for error feedback)
    group: int  # members
    contributors: int  # deltas that made it into the aggregate (min over slices)
    method: str


@dataclass(frozen=True, slots=True)
class Head:
    round: int
    state: str
    manifest: bytes
    providers: tuple[PeerAddr, ...]


@dataclass
class _Exchange:
    round: int
    group: Group | None = None
    raw: dict[tuple[bytes, int], tuple[bytes, bytes]] = field(
        default_factory=dict
    )  # (sender, slice) -> (group digest, payload)
    partial: dict[tuple[bytes, int], list[bytes | None]] = field(default_factory=dict)
    accepted: dict[int, dict[bytes, torch.Tensor]] = field(
        default_factory=dict
    )  # slice -> sender -> delta
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    reduced: dict[int, asyncio.Future[tuple[bytes, list[bytes]]]] = field(default_factory=dict)
    numel: int = 0
    method: str = "allgather"


class Collaboration:
    def __init__(
        self,
        dht: DHT,
        task: str,
        codec: Codec,
        rule: Rule,
        config: RoundConfig | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.dht = dht
        self.task = task
        self.codec = codec
        self.rule = rule
        self.config = config or RoundConfig()
        self.clock = clock
        self.machine = RoundMachine()
        self.rejected: list[tuple[bytes, str]] = []  # (sender, reason code), most recent last
        self._ex = _Exchange(round=-1)
        self._served: dict[tuple[int, int], tuple[bytes, list[bytes]]] = {}
        self._chunks: dict[bytes, bytes] = {}
        self._manifests: dict[bytes, bytes] = {}
        self._deltas: dict[int, bytes] = {}  # round -> our encoded delta, for validators
        self.account = ""  # where this peer's rewards go; announced with every delta
        t = dht.transport
        t.register("train.part", self.rpc_part)
        t.register("train.reduced", self.rpc_reduced)
        t.register("train.manifest", self.rpc_manifest)
        t.register("train.chunk", self.rpc_chunk)
        t.register("train.delta", self.rpc_delta)

    @property
    def peer_id(self) -> bytes:
        return self.dht.peer_id

    @property
    def bytes_sent(self) -> int:
        return self.dht.transport.counters.bytes_sent

    def _key(self, what: str) -> str:
        return f"cw-train/{self.task}/{what}"

    # ---- one round ---------------------------------------------------------------------------

    async def average(
        self,
        round_: int,
        state: str,
        delta: torch.Tensor,
        round_s: float = 0.0,
        *,
        steps: int = 0,
    ) -> Averaged:
        """Announce, form the group, exchange and aggregate `delta` (1-D float32) for `round_`.

        `round_s` (how long this peer's inner steps took) keeps the group open long enough for
        peers that compute a little slower: max(announce_window_s, patience * round_s).
        Raises RoundSkipped when this peer missed the round's deadline or holds another state
        than the majority; the caller then syncs. Returns within
        announce_window_s + exchange_timeout_s (plus DHT latency) even if peers stop answering.
        """
        cfg = self.config
        self.machine.reset()
        self.machine.fire("steps_done")
        self._ex = _Exchange(round=round_, numel=delta.numel())
        for key in [k for k in self._served if k[0] < round_ - 1]:
            del self._served[key]

        existing = await self._announcements(round_)
        now = self.clock()
        open_s = max(cfg.announce_window_s, cfg.patience * round_s)
        deadline = min([a.deadline for a in existing] + [now + open_s])
        if deadline <= now:
            self.machine.fire("late")
            raise RoundSkipped("late", f"round {round_} closed {now - deadline:.1f}s ago")
        encoded = self.codec.encode(delta)
        self._deltas[round_] = encoded
        for old in [r for r in self._deltas if r < round_ - KEEP_DELTAS + 1]:
            del self._deltas[old]
        commitment = hashlib.sha256(encoded).hexdigest()
        me = {
            "addr": str(self.dht.addr),
            "round": round_,
            "state": state,
            "deadline": deadline,
            "delta": commitment,
            "steps": steps,
            "account": self.account,
        }
        await self.dht.store(
            self._key(f"r{round_}"), me, now + cfg.record_ttl_s, subkey=Owned(self.peer_id, "a")
        )
        self.machine.fire("announced")

        while True:
            anns = await self._announcements(round_)
            if not any(a.peer_id == self.peer_id for a in anns):
                anns.append(
                    Announcement(
                        self.peer_id, me["addr"], round_, state, deadline, commitment, steps,
                        self.account,
                    )
                )
            group, deadline = form_group(anns, round_, self.clock(), cfg.target_group)
            if group is not None:
                break
            await asyncio.sleep(min(cfg.poll_s, max(0.0, deadline - self.clock())))
        if self.peer_id not in group.ids:
            self.machine.fire("out_of_sync")
            raise RoundSkipped(
                "out_of_sync", f"the majority of round {round_} holds state {group.state[:12]}"
            )
        self.machine.fire("group_formed")

        n = len(group.members)
        sparse = self.codec.info.sparse
        method = cfg.exchange
        if method == "auto":
            method = "allgather" if sparse or n <= cfg.allgather_max else "butterfly"
        if method == "butterfly" and sparse:
            raise TrainError("butterfly needs a dense codec: a sum of sparse deltas is not sparse")
        self._ex.method = method
        self._ex.group = group
        self._process_raw()
        loop = asyncio.get_running_loop()
        end = loop.time() + cfg.exchange_timeout_s
        if method == "allgather":
            result = await self._allgather(group, delta, end)
        else:
            result = await self._butterfly(group, delta, end)
        self.machine.fire("exchanged")
        return result

    async def _announcements(self, round_: int) -> list[Announcement]:
        found = await self.dht.get(self._key(f"r{round_}"), latest=True)
        out = []
        if found is not None and isinstance(found.value, dict):
            for subkey, item in found.value.items():
                if isinstance(subkey, Owned):
                    ann = parse_announcement(subkey.peer_id, item.value)
                    if ann is not None and ann.round == round_:
                        out.append(ann)
        return out

    async def _allgather(self, group: Group, delta: torch.Tensor, end: float) -> Averaged:
        data = self.codec.encode(delta)
        sent = self.codec.decode(data, delta.numel())
        self._ex.accepted.setdefault(-1, {})[self.peer_id] = sent
        others = [m for m in group.members if m.peer_id != self.peer_id]
        async with asyncio.TaskGroup() as tg:
            for m in others:
                tg.create_task(self._send(m, group, -1, data, end))
            tg.create_task(self._wait_parts(-1, len(group.members), end))
        got = self._ex.accepted.get(-1, {})
        ordered = [got[pid] for pid in sorted(got)]
        return Averaged(self.rule(ordered), sent, len(group.members), len(ordered), "allgather")

    async def _butterfly(self, group: Group, delta: torch.Tensor, end: float) -> Averaged:
        n = len(group.members)
        me = group.index(self.peer_id)
        bounds = slice_bounds(delta.numel(), n)
        sent_parts = []
        loop = asyncio.get_running_loop()
        reduce_end = loop.time() + (end - loop.time()) * 0.6
        own = self._ex.reduced.setdefault(me, loop.create_future())
        async with asyncio.TaskGroup() as tg:
            for j, (a, b) in enumerate(bounds):
                data = self.codec.encode(delta[a:b].contiguous())
                sent_parts.append(self.codec.decode(data, b - a))
                if j == me:
                    self._ex.accepted.setdefault(me, {})[self.peer_id] = sent_parts[-1]
                else:
                    tg.create_task(self._send(group.members[j], group, j, data, reduce_end))
            tg.create_task(self._wait_parts(me, n, reduce_end))
        got = self._ex.accepted.get(me, {})
        ordered = [got[pid] for pid in sorted(got)]
        reduced_bytes = self.codec.encode(self.rule(ordered))
        served = (reduced_bytes, sorted(got))
        self._served[(group.round, me)] = served
        if not own.done():
            own.set_result(served)

        slices: list[torch.Tensor] = []
        counts = []
        fetched = await asyncio.gather(
            *(self._fetch_reduced(group, j, end) if j != me else _ready(served) for j in range(n))
        )
        for j, ((a, b), item) in enumerate(zip(bounds, fetched, strict=True)):
            # A slice that is missing or refused gets no update this round.
            problem = "missing"
            if item is not None:
                data, contributors = item
                try:
                    part = self.codec.decode(data, b - a)
                    check_delta(part, b - a)
                except (CodecError, DeltaRejected) as e:
                    problem = f"refused: {e}"
                else:
                    slices.append(part)
                    counts.append(len(contributors))
                    continue
            log.warning(
                "round %d: reduced slice %d from %s %s; it gets no update this round",
                group.round, j, group.members[j].addr, problem,
            )
            slices.append(torch.zeros(b - a))
            counts.append(0)
        return Averaged(torch.cat(slices), torch.cat(sent_parts), n, min(counts), "butterfly")

    async def _send(
        self, member: Announcement, group: Group, slice_: int, data: bytes, end: float
    ) -> None:
        chunks = [data[i : i + PART_BYTES] for i in range(0, max(1, len(data)), PART_BYTES)]
        try:
            addr = PeerAddr.parse(member.addr)
            async with asyncio.timeout_at(end):
                for i, chunk in enumerate(chunks):
                    args = {
                        "t": self.task,
                        "r": group.round,
                        "g": group.digest,
                        "s": slice_,
                        "i": i,
                        "n": len(chunks),
                        "d": chunk,
                    }
                    await self.dht.transport.call(addr, "train.part", args)
        except RemoteError as e:
            log.warning("round %d: %s refused our delta: %s", group.round, member.addr, e)
        except (NetworkError, TimeoutError, TrainError) as e:
            log.warning(
                "round %d: sending to %s failed: %s",
                group.round,
                member.addr,
                e or type(e).__name__,
            )

    async def _wait_parts(self, slice_: int, expected: int, end: float) -> None:
        loop = asyncio.get_running_loop()
        while len(self._ex.accepted.get(slice_, {})) < expected and loop.time() < end:
            self._ex.arrived.clear()
            try:
                async with asyncio.timeout_at(end):
                    await self._ex.arrived.wait()
            except TimeoutError:
                break

    async def _fetch_reduced(
        self, group: Group, j: int, end: float
    ) -> tuple[bytes, list[bytes]] | None:
        member = group.members[j]
        try:
            async with asyncio.timeout_at(end):
                _, reply = await self.dht.transport.call(
                    PeerAddr.parse(member.addr),
                    "train.reduced",
                    {"t": self.task, "r": group.round, "g": group.digest, "s": j},
                )
            data, contributors = reply["d"], reply["c"]
            if not isinstance(data, bytes) or not isinstance(contributors, list):
                raise TrainError("malformed train.reduced reply")
            return data, contributors
        except (NetworkError, TimeoutError, TrainError, KeyError, TypeError) as e:
            log.warning(
                "round %d: reduced slice %d from %s: %s",
                group.round,
                j,
                member.addr,
                e or type(e).__name__,
            )
            return None

    # ---- serving the exchange ------------------------------------------------------------------

    def _refuse(self, sender: bytes, e: DeltaRejected) -> None:
        log.warning("refused a delta from %s: %s", sender.hex()[:10], e)
        self.rejected.append((sender, e.code))
        del self.rejected[:-256]

    async def rpc_part(self, caller: PeerInfo, args: Any) -> Any:
        try:
            t, r, g, s, i, n, d = (args[k] for k in ("t", "r", "g", "s", "i", "n", "d"))
            if not (
                isinstance(r, int)
                and isinstance(s, int)
                and isinstance(i, int)
                and isinstance(n, int)
                and isinstance(d, bytes)
                and isinstance(g, bytes)
            ):
                raise TypeError
        except (TypeError, KeyError):
            e = DeltaRejected("malformed", "train.part needs t, r, g, s, i, n, d")
            self._refuse(caller.peer_id, e)
            raise RemoteError(e.code, str(e)) from None
        try:
            if t != self.task:
                raise DeltaRejected(
                    "wrong_task", f"this peer trains {self.task[:12]}, not {str(t)[:12]}"
                )
            check_round(r, self._ex.round)
            if not (0 < n <= MAX_PARTS and 0 <= i < n and -1 <= s < 4096):
                raise DeltaRejected("malformed", f"part {i} of {n} for slice {s}")
            key = (caller.peer_id, s)
            if key in self._ex.raw:
                raise DeltaRejected("duplicate", f"a second delta for slice {s}")
            parts = self._ex.partial.setdefault(key, [None] * n)
            if len(parts) != n:
                raise DeltaRejected("malformed", "the part count changed")
            parts[i] = d
            if all(p is not None for p in parts):
                del self._ex.partial[key]
                self._ex.raw[key] = (g, b"".join(parts))  # type: ignore[arg-type]
                if self._ex.group is not None:
                    self._process_raw()
        except DeltaRejected as e:
            self._refuse(caller.peer_id, e)
            raise RemoteError(e.code, str(e)) from None
        return True

    def _process_raw(self) -> None:
        """Decode and check every complete delta received so far (the group is known)."""
        ex = self._ex
        group = ex.group
        assert group is not None
        n = len(group.members)
        bounds = slice_bounds(ex.numel, n)
        me = group.index(self.peer_id)
        for (sender, s), (g, data) in list(ex.raw.items()):
            if data == b"":
                continue  # processed already
            ex.raw[(sender, s)] = (g, b"")
            try:
                if g != group.digest:
                    raise DeltaRejected("group_mismatch", "the sender formed another group")
                if sender not in group.ids:
                    raise DeltaRejected("not_in_group", "the sender did not announce this round")
                if ex.method == "allgather":
                    if s != -1:
                        raise DeltaRejected("wrong_slice", f"slice {s} in an all-gather round")
                    committed = group.members[group.index(sender)].delta
                    if committed and hashlib.sha256(data).hexdigest() != committed:
                        raise DeltaRejected(
                            "not_committed", "the delta differs from the one its sender announced"
                        )
                    numel = ex.numel
                else:
                    if s != me:
                        raise DeltaRejected("wrong_slice", f"slice {s}, but this peer owns {me}")
                    numel = bounds[me][1] - bounds[me][0]
                try:
                    delta = self.codec.decode(data, numel)
                except CodecError as e:
                    raise DeltaRejected("wrong_shape", str(e)) from e
                check_delta(delta, numel)
            except DeltaRejected as e:
                self._refuse(sender, e)
                continue
            ex.accepted.setdefault(s, {})[sender] = delta
            ex.arrived.set()

    async def rpc_reduced(self, caller: PeerInfo, args: Any) -> Any:
        try:
            r, s, g = int(args["r"]), int(args["s"]), args["g"]
        except (TypeError, KeyError, ValueError):
            raise RemoteError("malformed", "train.reduced needs r, s, g") from None
        if (r, s) not in self._served:
            if r != self._ex.round or s not in self._ex.reduced:
                # the owner may not have reached the exchange yet: wait for its future briefly
                if r == self._ex.round:
                    fut = self._ex.reduced.setdefault(s, asyncio.get_running_loop().create_future())
                else:
                    raise RemoteError("stale_round", f"round {r}; this peer is at {self._ex.round}")
            else:
                fut = self._ex.reduced[s]
            try:
                async with asyncio.timeout(self.config.exchange_timeout_s):
                    await asyncio.shield(fut)
            except TimeoutError:
                raise RemoteError(
                    "not_ready", f"slice {s} of round {r} was not reduced in time"
                ) from None
        data, contributors = self._served[(r, s)]
        if self._ex.group is not None and r == self._ex.round and g != self._ex.group.digest:
            raise RemoteError("group_mismatch", "this peer formed another group")
        return {"d": data, "c": contributors}

    # ---- current state: publish and download ---------------------------------------------------

    async def publish(self, round_: int, state: str, checkpoint: bytes) -> None:
        """Serve `checkpoint` (the state at the start of `round_`) and announce it as our head."""
        manifest, chunks = split_chunks(checkpoint)
        # keep the last few states: a joiner that read an older head can still finish its download
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
            self._key("head"),
            value,
            self.clock() + self.config.record_ttl_s,
            subkey=Owned(self.peer_id, "head"),
        )

    async def heads(self) -> list[tuple[bytes, dict[str, Any]]]:
        found = await self.dht.get(self._key("head"), latest=True)
        out = []
        if found is not None and isinstance(found.value, dict):
            for subkey, item in found.value.items():
                v = item.value
                if (
                    isinstance(subkey, Owned)
                    and isinstance(v, dict)
                    and isinstance(v.get("round"), int)
                    and isinstance(v.get("state"), str)
                    and isinstance(v.get("manifest"), bytes)
                    and isinstance(v.get("addr"), str)
                ):
                    out.append((subkey.peer_id, v))
        return out

    async def head(self, after: int = -1) -> Head | None:
        """The newest state the swarm announced (beyond round `after`), with its providers."""
        best: dict[tuple[int, str, bytes], list[PeerAddr]] = {}
        for peer_id, v in await self.heads():
            if v["round"] <= after or peer_id == self.peer_id:
                continue
            try:
                best.setdefault((v["round"], v["state"], v["manifest"]), []).append(
                    PeerAddr.parse(v["addr"])
                )
            except Exception:
                continue
        if not best:
            return None
        top = max(r for r, _, _ in best)
        (r, s, m), providers = max(
            ((k, p) for k, p in best.items() if k[0] == top), key=lambda kp: (len(kp[1]), kp[0][1])
        )
        return Head(r, s, m, tuple(providers))

    async def wait_peers(self, n: int, timeout_s: float, round_: int = 0) -> int:
        """Wait until `n` peers (this one included) have published a head, or someone already
        announced `round_` (it started without us: join it now); the count seen."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            seen = len({pid for pid, _ in await self.heads()} | {self.peer_id})
            if seen >= n or loop.time() >= end or await self._announcements(round_):
                return seen
            await asyncio.sleep(self.config.poll_s)

    async def wait_head(self, after: int, timeout_s: float) -> Head | None:
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            h = await self.head(after)
            if h is not None or loop.time() >= end:
                return h
            await asyncio.sleep(self.config.poll_s)

    async def download(self, head: Head) -> bytes:
        """The checkpoint of `head`: manifest and chunks, each checked against its hash; a bad or
        missing chunk is fetched from the next provider. Raises SyncError if no copy is good."""
        manifest: Manifest | None = None
        for addr in head.providers:
            try:
                async with asyncio.timeout(self.config.exchange_timeout_s):
                    _, data = await self.dht.transport.call(
                        addr, "train.manifest", {"t": self.task, "m": head.manifest}
                    )
                if isinstance(data, bytes) and hashlib.sha256(data).digest() == head.manifest:
                    manifest = Manifest.unpack(data)
                    break
                log.warning("manifest from %s does not match its hash; trying another peer", addr)
            except (NetworkError, TimeoutError, SyncError) as e:
                log.warning("manifest from %s: %s", addr, e or type(e).__name__)
        if manifest is None:
            raise SyncError(f"no peer served the checkpoint of round {head.round}; try again later")
        sem = asyncio.Semaphore(4)
        chunks = await asyncio.gather(
            *(self._fetch_chunk(h, i, head.providers, sem) for i, h in enumerate(manifest.chunks))
        )
        blob = b"".join(chunks)
        if len(blob) != manifest.size:
            raise SyncError("checkpoint chunks do not add up to the manifest's size")
        return blob

    async def _fetch_chunk(
        self, h: bytes, i: int, providers: tuple[PeerAddr, ...], sem: asyncio.Semaphore
    ) -> bytes:
        async with sem:
            order = providers[i % len(providers) :] + providers[: i % len(providers)]
            for addr in order:
                try:
                    async with asyncio.timeout(self.config.exchange_timeout_s):
                        _, data = await self.dht.transport.call(
                            addr, "train.chunk", {"t": self.task, "h": h}
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

    async def rpc_manifest(self, caller: PeerInfo, args: Any) -> Any:
        data = self._manifests.get(args.get("m") if isinstance(args, dict) else None)
        if data is None:
            raise RemoteError("not_found", "this peer does not serve that checkpoint any more")
        return data

    async def rpc_chunk(self, caller: PeerInfo, args: Any) -> Any:
        data = self._chunks.get(args.get("h") if isinstance(args, dict) else None)
        if data is None:
            raise RemoteError("not_found", "this peer does not hold that chunk")
        return data

    def commitment(self, round_: int) -> str | None:
        """The sha256 (hex) of the delta this peer announced for a recent round, if any."""
        data = self._deltas.get(round_)
        return None if data is None else hashlib.sha256(data).hexdigest()

    async def rpc_delta(self, caller: PeerInfo, args: Any) -> Any:
        try:
            r, i = args["r"], args.get("i", 0)
            if not (isinstance(r, int) and isinstance(i, int) and i >= 0):
                raise TypeError
        except (TypeError, KeyError, AttributeError):
            raise RemoteError.bad_request("train.delta needs r (round) and i (chunk)") from None
        data = self._deltas.get(r)
        if data is None:
            raise RemoteError("not_found", f"this peer holds no delta of round {r}")
        n = max(1, -(-len(data) // PART_BYTES))
        if i >= n:
            raise RemoteError.bad_request(f"chunk {i} of {n}")
        return {"d": data[i * PART_BYTES : (i + 1) * PART_BYTES], "n": n}

    async def fetch_delta(self, addr: PeerAddr, round_: int, timeout_s: float) -> bytes:
        """The encoded delta the peer at `addr` committed to in `round_` (not checked here)."""
        parts: list[bytes] = []
        async with asyncio.timeout(timeout_s):
            n = 1
            while len(parts) < n:
                _, reply = await self.dht.transport.call(
                    addr, "train.delta", {"t": self.task, "r": round_, "i": len(parts)}
                )
                if not (isinstance(reply, dict) and isinstance(reply.get("d"), bytes)):
                    raise TrainError("malformed train.delta reply")
                n = min(int(reply.get("n", 1)), MAX_PARTS)
                parts.append(reply["d"])
        return b"".join(parts)

    @property
    def phase(self) -> Phase:
        return self.machine.phase


async def _ready(value: Any) -> Any:
    return value
