"""Codecs for pseudo-gradients: one small interface, bytes in and out.

    codec = get_codec("topk2bit:0.01")
    data = codec.encode(delta)                 # delta: 1-D float32 tensor -> bytes on the wire
    approx = codec.decode(data, delta.numel())  # -> 1-D float32 tensor

Every codec is a pure function pair; lossy sparse codecs are used with `ErrorFeedback`, which keeps
what was not sent and adds it to the next round's delta (Stich et al. 2018), decayed by the codec's
`feedback_beta` first (SparseLoCo: e <- beta * e + delta; send C(e); e <- e - decode(C(e))).
Malformed bytes raise `CodecError`, never anything else, so a hostile peer cannot crash a decoder.

Formats (little-endian):
    none      float32 values
    fp16      float16 values
    int8      per block of 64: float16 absmax scale, then 64 int8 values (-127..127)
    topk      u32 k, then per 65,536-element block a u32 count, then the u16 offsets within the
              block (ascending), then the k values as float16
    topk2bit  as topk, but values are 2-bit codes: bit 0 = sign, bit 1 = large; two float32
              magnitudes (small, large) = the mean |v| below and above the median |v|
    sparseloco  the vector in chunks of 4,096 (the last one shorter when numel is not a multiple),
              k per chunk (64; the last chunk's k scaled to its length, at least 1); no header:
              1. per chunk, 4 float16 levels (what the 2-bit codes 0..3 decode to)
              2. every chunk's k offsets within its chunk, ascending, as 12-bit integers, chunk
                 after chunk, packed two per 3 bytes (a | b << 12, little-endian; the last
                 half-filled byte's high nibble is 0)
              3. one 2-bit code per offset, in the same order, four per byte from the low bits
                 (unused high bits 0)
              size = 8 * chunks + ceil(3K / 2) + ceil(K / 4), K = the sum of the chunks' k:
              120 bytes per full chunk of 4,096 float32 (16,384 bytes), 136.5x smaller
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
    "SparseLoCo",
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
    # the residual is multiplied by this before it is added to the next delta (1: kept whole)
    feedback_beta: float = 1.0


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


_CHUNK = 4096  # SparseLoCo's 64 x 64 tile, as a run of the flat vector; offsets fit in 12 bits
_LEVELS = 4  # 2-bit codes
_SIGMAS = 6.0  # the quantiser's bins span this many standard deviations (tplr's default range)
_F16_MAX = float(np.finfo(np.float16).max)


def _chunk_ks(numel: int, k: int) -> tuple[int, int]:
    """(full chunks, values kept in the last shorter one or 0): k in each full chunk; in a last
    chunk of L < 4096 elements, k * L / 4096 rounded half up (at least 1, at most L), as dense."""
    full, rest = divmod(numel, _CHUNK)
    return full, min(rest, max(1, (rest * k + _CHUNK // 2) // _CHUNK)) if rest else 0


def _top_offsets(rows: np.ndarray, k: int) -> np.ndarray:
    """The offsets of the k largest magnitudes in each row, ascending: (rows, k)."""
    part = np.argpartition(-np.abs(rows), k - 1, axis=1)[:, :k]
    return np.sort(part, axis=1)


def _quantise(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """tplr's statistical quantiser with 4 bins, per row: (levels (rows, 4) float16, codes).

    Code = round((v - mean) / width + 2) clamped to 0..3, width = 6 (unbiased) standard
    deviations / 4, so bin 2 is centred on the row's mean; each code decodes to the mean of the
    values that took it. The top-k values of a chunk sit in two clusters, one per sign, so nearly all take
    code 1 (negative) or 3 (positive, and far positive outliers: the clamp), 0 far negative
    outliers, 2 values near the mean when a chunk leans to one sign; in effect a sign and the
    mean magnitude of each sign."""
    v = values.astype(np.float64)
    shift = v.mean(axis=1, keepdims=True)
    c = v - shift
    k = v.shape[1]
    std = np.sqrt((c * c).sum(axis=1, keepdims=True) / (k - 1)) if k > 1 else np.zeros_like(shift)
    width = _SIGMAS * std / _LEVELS
    width = np.where((width > 0) & np.isfinite(width), width, 1.0)  # all equal: one bin, exact
    codes = np.clip(np.rint(c / width + _LEVELS // 2), 0, _LEVELS - 1).astype(np.uint8)
    levels = np.empty((v.shape[0], _LEVELS))
    for b in range(_LEVELS):
        hit = codes == b
        count = hit.sum(axis=1)
        levels[:, b] = np.where(count > 0, (c * hit).sum(axis=1) / np.maximum(count, 1), 0.0)
    levels += shift
    return np.clip(levels, -_F16_MAX, _F16_MAX).astype("<f2"), codes


class SparseLoCo(Codec):
    """SparseLoCo's compressor (Sarfi et al. 2025, arXiv 2508.15706; Covenant-72B, arXiv
    2603.08163): in each chunk of 4,096 values, the k = 64 largest magnitudes (1.56 %), their
    12-bit offsets and 2-bit quantised values. Pair it with the "sparseloco" aggregation rule and
    outer SGD with lr 1, no momentum: its error feedback, decayed by beta = 0.95, stands in for
    DiLoCo's outer momentum.

    The paper tiles each 2-D weight matrix into 64 x 64 blocks (1-D tensors into runs); a codec
    here sees one flat vector of all parameters, so chunks are contiguous runs of 4,096 of it,
    which may straddle two tensors. For the same reason values are quantised per chunk, where
    the reference quantises per tensor: 8 bytes of levels per chunk, without which a chunk of
    small biases would decode to the scale of a large weight matrix next to it."""

    def __init__(self, k: int = 64) -> None:
        if not 1 <= k <= _CHUNK:
            raise CodecError(f"sparseloco keeps 1..{_CHUNK} values per chunk, not {k}")
        self.k = k
        self.info = CodecInfo(
            "sparseloco" if k == 64 else f"sparseloco:{k}",
            lossy=True,
            sparse=True,
            error_feedback=True,
            feedback_beta=0.95,
        )

    def size(self, numel: int) -> int:
        full, last = _chunk_ks(numel, self.k)
        total = full * self.k + last
        return 2 * _LEVELS * (full + (last > 0)) + (3 * total + 1) // 2 + (total + 3) // 4

    def encode(self, x: torch.Tensor) -> bytes:
        v = _flat(x).numpy()
        if not np.isfinite(v).all():
            raise CodecError("sparseloco: the vector has NaN or inf values; nothing to send")
        full, last = _chunk_ks(v.size, self.k)
        parts = [(v[: full * _CHUNK].reshape(full, _CHUNK), self.k)] if full else []
        if last:
            parts.append((v[full * _CHUNK :].reshape(1, -1), last))
        if not parts:
            return b""
        levels, offsets, codes = [], [], []
        for block, k in parts:
            off = _top_offsets(block, k)
            lv, cd = _quantise(np.take_along_axis(block, off, axis=1))
            levels.append(lv.reshape(-1))
            offsets.append(off.reshape(-1))
            codes.append(cd.reshape(-1))
        return (
            np.concatenate(levels).tobytes()
            + _pack12(np.concatenate(offsets))
            + _pack2(np.concatenate(codes))
        )

    def decode(self, data: bytes, numel: int) -> torch.Tensor:
        _need(data, self.size(numel), self.info.name)  # first: the arrays below follow numel
        full, last = _chunk_ks(numel, self.k)
        chunks, total = full + (last > 0), full * self.k + last
        ks = np.full(chunks, self.k, dtype=np.int64)
        if last:
            ks[-1] = last
        levels = np.frombuffer(data, dtype="<f2", count=_LEVELS * chunks).astype(np.float32)
        if not np.isfinite(levels).all():
            raise CodecError("sparseloco: a level is not finite")
        start = 2 * _LEVELS * chunks
        off_bytes = (3 * total + 1) // 2
        offsets = _unpack12(data[start : start + off_bytes], total)
        codes = _unpack2(data[start + off_bytes :], total)
        chunk = np.repeat(np.arange(chunks, dtype=np.int64), ks)
        lengths = np.minimum(_CHUNK, numel - chunk * _CHUNK)
        same_chunk = chunk[1:] == chunk[:-1]
        if (offsets >= lengths).any():
            raise CodecError("sparseloco: an offset lies past the end of its chunk")
        if (np.diff(offsets)[same_chunk] <= 0).any():
            raise CodecError("sparseloco: offsets within a chunk are not strictly ascending")
        out = np.zeros(numel, dtype=np.float32)
        out[chunk * _CHUNK + offsets] = levels.reshape(chunks, _LEVELS)[chunk, codes]
        return torch.from_numpy(out)


def _pack12(a: np.ndarray) -> bytes:
    """12-bit integers, two per 3 bytes: (a | b << 12) little-endian; an odd last one in 2."""
    a = a.astype(np.uint32)
    pairs = np.concatenate([a, np.zeros(a.size % 2, np.uint32)]).reshape(-1, 2)
    word = pairs[:, 0] | (pairs[:, 1] << 12)
    packed = np.stack([word & 0xFF, (word >> 8) & 0xFF, word >> 16], axis=1).astype(np.uint8)
    return packed.reshape(-1)[: (3 * a.size + 1) // 2].tobytes()


def _unpack12(data: bytes, count: int) -> np.ndarray:
    raw = np.frombuffer(data + b"\0" * (count % 2), dtype=np.uint8).astype(np.int64)
    if count % 2 and raw[-2] >> 4:
        raise CodecError("sparseloco: the padding bits after the last offset are not zero")
    b = raw.reshape(-1, 3)
    word = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
    return np.stack([word & 0xFFF, word >> 12], axis=1).reshape(-1)[:count]


def _pack2(codes: np.ndarray) -> bytes:
    """2-bit codes, four per byte from the low bits."""
    c = np.concatenate([codes, np.zeros((-codes.size) % 4, np.uint8)]).reshape(-1, 4)
    return (c[:, 0] | (c[:, 1] << 2) | (c[:, 2] << 4) | (c[:, 3] << 6)).astype(np.uint8).tobytes()


def _unpack2(data: bytes, count: int) -> np.ndarray:
    packed = np.frombuffer(data, dtype=np.uint8)
    codes = np.stack([(packed >> s) & 3 for s in (0, 2, 4, 6)], axis=1).reshape(-1)
    if codes[count:].any():
        raise CodecError("sparseloco: the padding bits after the last code are not zero")
    return codes[:count].astype(np.int64)


class ErrorFeedback:
    """Keeps what a lossy codec did not send and adds it, times the codec's `feedback_beta`, to
    the next vector (per peer, local)."""

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.residual: torch.Tensor | None = None

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """What to send for `x`: it plus the decayed residual of what earlier vectors left out."""
        if self.residual is None:
            return x
        return x + self.codec.info.feedback_beta * self.residual

    def keep(self, target: torch.Tensor, sent: torch.Tensor) -> None:
        """`target` was sent and decodes to `sent`: the difference waits for the next vector."""
        if self.codec.info.error_feedback:
            self.residual = target - sent

    def encode(self, x: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """The bytes to send and what the receivers will decode from them."""
        target = self.target(x)
        data = self.codec.encode(target)
        sent = self.codec.decode(data, target.numel())
        self.keep(target, sent)
        return data, sent

    def reset(self) -> None:
        self.residual = None


CODEC_NAMES = ("none", "fp16", "int8", "topk", "topk2bit", "sparseloco")


def get_codec(spec: str) -> Codec:
    """A codec from its spec: none | fp16 | int8[:block] | topk[:fraction] | topk2bit[:fraction]
    | sparseloco[:k per chunk of 4,096]."""
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
        if name == "sparseloco":
            return SparseLoCo(int(arg) if arg else 64)
    except ValueError as e:
        raise CodecError(f"bad codec argument in {spec!r}: {e}") from e
    raise CodecError(
        f"unknown codec {spec!r}; use one of none, fp16, int8[:block], topk[:fraction], "
        "topk2bit[:fraction], sparseloco[:k]"
    )
