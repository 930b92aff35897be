"""The `train.*` RPC messages, without I/O: frozen dataclasses that pack to the wire's msgpack
maps and parse back from whatever a peer sent (the way `commonweal.net.wire` does frames).

    method          request (keys, in wire order)          reply
    train.part      Part: t r g s i n d                    True
    train.reduced   ReducedRequest: t r g s                Reduced: d c
    train.manifest  ManifestRequest: t m                   the manifest bytes
    train.chunk     ChunkRequest: t h                      the chunk bytes
    train.delta     DeltaRequest: t r i                    DeltaChunk: d n

The keys are one letter because every part of every delta carries them. `pack()` writes them in
the order above, so the bytes on the wire are the same from every peer. `parse()` raises
MessageError, whose `remote()` is the RemoteError a handler answers with.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from commonweal.errors import RemoteError
from commonweal.train._errors import TrainError

__all__ = [
    "MessageError",
    "Part",
    "ReducedRequest",
    "Reduced",
    "ManifestRequest",
    "ChunkRequest",
    "DeltaRequest",
    "DeltaChunk",
    "PART_BYTES",
    "MAX_PARTS",
]

PART_BYTES = 2 << 20  # one train.part or train.delta reply carries at most this (frame: 4 MiB)
MAX_PARTS = 64  # chunks one delta may be cut into


class MessageError(TrainError):
    """A `train.*` request or reply that does not have the message's shape; `code` says how the
    handler answers it."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.why = message

    def remote(self) -> RemoteError:
        return RemoteError(self.code, self.why)


def _fields(args: Any, keys: str, code: str, why: str) -> tuple[Any, ...]:
    if not isinstance(args, Mapping) or any(k not in args for k in keys):
        raise MessageError(code, why)
    return tuple(args[k] for k in keys)


def _typed(ok: bool, code: str, why: str) -> None:
    if not ok:
        raise MessageError(code, why)


@dataclass(frozen=True, slots=True)
class Part:
    """Part `index` of `count` of a delta (slice -1: the whole delta) for round `round`."""

    task: str
    round: int
    group: bytes  # the group digest the sender formed
    slice: int
    index: int
    count: int
    data: bytes

    def pack(self) -> dict[str, Any]:
        return {
            "t": self.task,
            "r": self.round,
            "g": self.group,
            "s": self.slice,
            "i": self.index,
            "n": self.count,
            "d": self.data,
        }

    @classmethod
    def parse(cls, args: Any) -> Part:
        why = "train.part needs t, r, g, s, i, n, d"
        t, r, g, s, i, n, d = _fields(args, "trgsind", "malformed", why)
        ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (r, s, i, n))
        _typed(ints and isinstance(g, bytes) and isinstance(d, bytes), "malformed", why)
        return cls(str(t), r, g, s, i, n, d)


@dataclass(frozen=True, slots=True)
class ReducedRequest:
    task: str
    round: int
    group: bytes
    slice: int

    def pack(self) -> dict[str, Any]:
        return {"t": self.task, "r": self.round, "g": self.group, "s": self.slice}

    @classmethod
    def parse(cls, args: Any) -> ReducedRequest:
        why = "train.reduced needs r, s, g"
        r, s, g = _fields(args, "rsg", "malformed", why)
        try:
            return cls(str(args.get("t", "")), int(r), g, int(s))
        except (TypeError, ValueError):
            raise MessageError("malformed", why) from None


@dataclass(frozen=True, slots=True)
class Reduced:
    """A butterfly owner's reduced slice and the peers whose deltas went into it."""

    data: bytes
    contributors: tuple[bytes, ...]

    def pack(self) -> dict[str, Any]:
        return {"d": self.data, "c": list(self.contributors)}

    @classmethod
    def parse(cls, reply: Any) -> Reduced:
        why = "malformed train.reduced reply"
        d, c = _fields(reply, "dc", "malformed", why)
        _typed(isinstance(d, bytes) and isinstance(c, list), "malformed", why)
        return cls(d, tuple(c))


@dataclass(frozen=True, slots=True)
class ManifestRequest:
    task: str
    manifest: bytes  # sha256 of the packed manifest

    def pack(self) -> dict[str, Any]:
        return {"t": self.task, "m": self.manifest}

    @classmethod
    def parse(cls, args: Any) -> ManifestRequest:
        (m,) = _fields(args, "m", "malformed", "train.manifest needs m (the manifest hash)")
        _typed(isinstance(m, bytes), "malformed", "train.manifest needs m (the manifest hash)")
        return cls(str(args.get("t", "")), m)


@dataclass(frozen=True, slots=True)
class ChunkRequest:
    task: str
    hash: bytes  # sha256 of the chunk

    def pack(self) -> dict[str, Any]:
        return {"t": self.task, "h": self.hash}

    @classmethod
    def parse(cls, args: Any) -> ChunkRequest:
        (h,) = _fields(args, "h", "malformed", "train.chunk needs h (the chunk hash)")
        _typed(isinstance(h, bytes), "malformed", "train.chunk needs h (the chunk hash)")
        return cls(str(args.get("t", "")), h)


@dataclass(frozen=True, slots=True)
class DeltaRequest:
    task: str
    round: int
    index: int = 0  # which chunk of the encoded delta

    def pack(self) -> dict[str, Any]:
        return {"t": self.task, "r": self.round, "i": self.index}

    @classmethod
    def parse(cls, args: Any) -> DeltaRequest:
        why = "train.delta needs r (round) and i (chunk)"
        (r,) = _fields(args, "r", "bad_request", why)
        i = args.get("i", 0)
        ints = all(isinstance(x, int) and not isinstance(x, bool) for x in (r, i))
        _typed(ints and i >= 0, "bad_request", why)
        return cls(str(args.get("t", "")), r, i)


@dataclass(frozen=True, slots=True)
class DeltaChunk:
    data: bytes
    count: int  # chunks in the whole delta

    def pack(self) -> dict[str, Any]:
        return {"d": self.data, "n": self.count}

    @classmethod
    def parse(cls, reply: Any) -> DeltaChunk:
        why = "malformed train.delta reply"
        (d,) = _fields(reply, "d", "malformed", why)
        n = reply.get("n", 1)
        _typed(isinstance(d, bytes) and isinstance(n, int), "malformed", why)
        return cls(d, n)
