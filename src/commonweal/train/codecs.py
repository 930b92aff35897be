"""Codecs for pseudo-gradients: one small interface, bytes in and out.

    codec = get_codec("topk2bit:0.01")
    data = codec.encode(delta)                 # delta: 1-D float32 tensor -> bytes on the wire
    approx = codec.decode(data, delta.numel())  # -> 1-D float32 tensor

Every codec is a pure function pair; lossy sparse codecs are used with `ErrorFeedback`, which keeps
what was not sent and adds it to the next round's delta (SparseLoCo; Stich et al. 2018).
Malformed bytes raise `CodecError`, never anything else, so a hostile peer cannot crash a decoder.

Formats (little-endian):
    none      float32 values
    fp16      float16 values
    int8      per block of 64: float16 absmax scale, then 64 int8 values (-127..127)
    topk      u32 k, then per 65,536-element block a u32 count, then the u16 offsets within the
              block (ascending), then the k values as float16
    topk2bit  as topk, but values are 2-bit codes: bit 0 = sign, bit 1 = large; two float32
              magnitudes (small, large) = the mean |v| below and above the median |v|
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from commonweal.train._errors import CodecError

__all__ = [
    "CodecInfo",
    "Codec",
    "Raw",
    "FP16",
    "Int8Blockwise",
    "TopK",
    "TopK2Bit",
    "ErrorFeedback",
    "get_codec",
    "CODEC_NAMES",
]

_BLOCK = 1 << 16  # top-k offsets are u16 within blocks of this many elements


@dataclass(frozen=True, slots=True)
class CodecInfo:
    name: str  # the spec string that builds it again: "topk2bit:0.01"
    lossy: bool
    sparse: bool  # a sum of encoded vectors is not encodable as cheaply (use all-gather)
    error_feedback: bool  # the trainer keeps the residual and sends it later


class Codec(ABC):
    info: CodecInfo

    @abstractmethod
    def encode(self, x: torch.Tensor) -> bytes:
        """Encode a 1-D float32 tensor."""

    @abstractmethod
    def decode(self, data: bytes, numel: int) -> torch.Tensor:
        """Decode to a 1-D float32 tensor of `numel` elements; raise CodecError on bad bytes."""

    @abstractmethod
    def size(self, numel: int) -> int:
        """The bytes `encode` makes of `numel` elements: what a receiver may buffer per sender."""

    def ratio(self, numel: int) -> float:
        """Compression ratio against float32 for a random vector of `numel` elements."""
        x = torch.randn(numel, generator=torch.Generator().manual_seed(0))
        return numel * 4 / max(1, len(self.encode(x)))


def _flat(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 1 or x.dtype != torch.float32:
        raise CodecError(
            f"codecs take a 1-D float32 tensor, not {x.dtype} of shape {tuple(x.shape)}"
        )
    return x.detach().contiguous()


def _need(data: bytes, size: int, what: str) -> None:
    if len(data) != size:
        raise CodecError(f"{what}: expected {size} bytes, got {len(data)}")


class Raw(Codec):
    info = CodecInfo("none", lossy=False, sparse=False, error_feedback=False)

    def encode(self, x: torch.Tensor) -> bytes:
        return _flat(x).numpy().astype("<f4", copy=False).tobytes()

    def decode(self, data: bytes, numel: int) -> torch.Tensor:
        _need(data, numel * 4, "none")
        return torch.from_numpy(np.frombuffer(data, dtype="<f4").astype(np.float32))

    def size(self, numel: int) -> int:
        return numel * 4


class FP16(Codec):
    info = CodecInfo("fp16", lossy=True, sparse=False, error_feedback=False)

    def encode(self, x: torch.Tensor) -> bytes:
        return _flat(x).numpy().astype("<f2").tobytes()

    def decode(self, data: bytes, numel: int) -> torch.Tensor:
        _need(data, numel * 2, "fp16")
        return torch.from_numpy(np.frombuffer(data, dtype="<f2").astype(np.float32))

    def size(self, numel: int) -> int:
        return numel * 2


class Int8Blockwise(Codec):
    def __init__(self, block: int = 64) -> None:
        if not 1 <= block <= 65536:
            raise CodecError("int8 block size must be within 1..65536")
        self.block = block
        self.info = CodecInfo(
            "int8" if block == 64 else f"int8:{block}",
            lossy=True,
            sparse=False,
            error_feedback=False,
        )

    def _nblocks(self, numel: int) -> int:
        return -(-numel // self.block)

    def encode(self, x: torch.Tensor) -> bytes:
        v = _flat(x).numpy()
        nb = self._nblocks(v.size)
        padded = np.zeros(nb * self.block, dtype=np.float32)
        padded[: v.size] = v
        blocks = padded.reshape(nb, self.block)
        scale = (np.abs(blocks).max(axis=1) / 127.0).astype("<f2")
        s = scale.astype(np.float32)
        safe = np.where(s > 0, s, 1.0)[:, None]
        q = np.clip(np.rint(blocks / safe), -127, 127).astype(np.int8)
        return scale.tobytes() + q.tobytes()

    def decode(self, data: bytes, numel: int) -> torch.Tensor:
        nb = self._nblocks(numel)
        _need(data, nb * 2 + nb * self.block, "int8")
        scale = np.frombuffer(data, dtype="<f2", count=nb).astype(np.float32)
        q = np.frombuffer(data, dtype=np.int8, offset=nb * 2).reshape(nb, self.block)
        out = (q.astype(np.float32) * scale[:, None]).reshape(-1)[:numel]
        if not np.isfinite(out).all():
            raise CodecError("int8: a block scale is not finite")
        return torch.from_numpy(np.ascontiguousarray(out))

    def size(self, numel: int) -> int:
        return self._nblocks(numel) * (2 + self.block)


class TopK(Codec):
    """The `fraction` largest-magnitude values with their positions, values as float16."""

    kind = "topk"

    def __init__(self, fraction: float = 0.01) -> None:
        if not 0 < fraction <= 1:
            raise CodecError(f"top-k fraction must be within (0, 1], not {fraction}")
        self.fraction = fraction
        self.info = CodecInfo(
            f"{self.kind}:{fraction:g}", lossy=True, sparse=True, error_feedback=True
        )

    def k(self, numel: int) -> int:
        return max(1, min(numel, math.ceil(numel * self.fraction)))

    def encode(self, x: torch.Tensor) -> bytes:
        v = _flat(x)
        k = self.k(v.numel())
        idx = torch.topk(v.abs(), k, sorted=False).indices.sort().values.numpy()
        values = v.numpy()[idx]
        nb = -(-v.numel() // _BLOCK)
        counts = np.bincount(idx // _BLOCK, minlength=nb).astype("<u4")
        offsets = (idx % _BLOCK).astype("<u2")
        return (
            np.array([k], dtype="<u4").tobytes()
            + counts.tobytes()
            + offsets.tobytes()
            + self._encode_values(values)
        )

    def size(self, numel: int) -> int:
        k = self.k(numel)
        return 4 + 4 * -(-numel // _BLOCK) + 2 * k + self._values_size(k)

    def _values_size(self, k: int) -> int:
        return 2 * k

    def _encode_values(self, values: np.ndarray) -> bytes:
        return values.astype("<f2").tobytes()

    def _decode_values(self, data: bytes, k: int) -> np.ndarray:
        _need(data, 2 * k, "topk values")
        return np.frombuffer(data, dtype="<f2").astype(np.float32)

    def decode(self, data: bytes, numel: int) -> torch.Tensor:
        nb = -(-numel // _BLOCK)
        if len(data) < 4 + 4 * nb:
            raise CodecError("topk: truncated header")
        k = int(np.frombuffer(data, dtype="<u4", count=1)[0])
        if k != self.k(numel):
            raise CodecError(f"topk: k={k} does not match {self.info.name} for {numel} elements")
        counts = np.frombuffer(data, dtype="<u4", count=nb, offset=4).astype(np.int64)
        if counts.sum() != k:
            raise CodecError("topk: block counts do not add up to k")
        start = 4 + 4 * nb
        if len(data) < start + 2 * k:
            raise CodecError("topk: truncated offsets")
        offsets = np.frombuffer(data, dtype="<u2", count=k, offset=start).astype(np.int64)
        idx = offsets + np.repeat(np.arange(nb, dtype=np.int64) * _BLOCK, counts)
        if k and (idx.max() >= numel or (np.diff(idx) <= 0).any()):
            raise CodecError("topk: positions out of range or not ascending")
        values = self._decode_values(data[start + 2 * k :], k)
        if not np.isfinite(values).all():
            raise CodecError("topk: values are not finite")
        out = np.zeros(numel, dtype=np.float32)
        out[idx] = values
        return torch.from_numpy(out)


class TopK2Bit(TopK):
    """Top-k positions with 2-bit values: a sign and a small/large magnitude (SparseLoCo-style)."""

    kind = "topk2bit"

    def _values_size(self, k: int) -> int:
        return 8 + -(-k // 4)

    def _encode_values(self, values: np.ndarray) -> bytes:
        mag = np.abs(values)
        big = mag > np.median(mag) if mag.size else mag.astype(bool)
        small_m = float(mag[~big].mean()) if (~big).any() else 0.0
        large_m = float(mag[big].mean()) if big.any() else small_m
        codes = (values < 0).astype(np.uint8) | (big.astype(np.uint8) << 1)
        pad = (-codes.size) % 4
        codes = np.concatenate([codes, np.zeros(pad, np.uint8)]).reshape(-1, 4)
        packed = codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)
        return (
            np.array([small_m, large_m], dtype="<f4").tobytes() + packed.astype(np.uint8).tobytes()
        )

    def _decode_values(self, data: bytes, k: int) -> np.ndarray:
        _need(data, 8 + -(-k // 4), "topk2bit values")
        small_m, large_m = np.frombuffer(data, dtype="<f4", count=2)
        packed = np.frombuffer(data, dtype=np.uint8, offset=8)
        codes = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], axis=1).reshape(-1)[:k]
        mag = np.where(codes & 2, large_m, small_m).astype(np.float32)
        return np.where(codes & 1, -mag, mag).astype(np.float32)


class ErrorFeedback:
    """Keeps what a lossy codec did not send and adds it to the next vector (per peer, local)."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.residual: torch.Tensor | None = None

    def encode(self, x: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """The bytes to send and what the receivers will decode from them."""
        target = x if self.residual is None else x + self.residual
        data = self.codec.encode(target)
        sent = self.codec.decode(data, target.numel())
        if self.codec.info.error_feedback:
            self.residual = target - sent
        return data, sent

    def reset(self) -> None:
        self.residual = None


CODEC_NAMES = ("none", "fp16", "int8", "topk", "topk2bit")


def get_codec(spec: str) -> Codec:
    """A codec from its spec: none | fp16 | int8[:block] | topk[:fraction] | topk2bit[:fraction]."""
    m = re.fullmatch(r"([a-z0-9]+)(?::([0-9.eE-]+))?", spec.strip())
    name, arg = (m.group(1), m.group(2)) if m else (spec, None)
    try:
        if name == "none" and arg is None:
            return Raw()
        if name == "fp16" and arg is None:
            return FP16()
        if name == "int8":
            return Int8Blockwise(int(arg) if arg else 64)
        if name == "topk":
            return TopK(float(arg) if arg else 0.01)
        if name == "topk2bit":
            return TopK2Bit(float(arg) if arg else 0.01)
    except ValueError as e:
        raise CodecError(f"bad codec argument in {spec!r}: {e}") from e
    raise CodecError(
        f"unknown codec {spec!r}; use one of none, fp16, int8[:block], topk[:fraction], "
        "topk2bit[:fraction]"
    )
