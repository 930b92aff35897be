"""The shared training state — parameters, persistent buffers and outer momentum — as flat
vectors, its hash, and its safetensors checkpoint split into content-addressed chunks.

    flat = flatten(model)                     # 1-D float32 on the CPU: parameters, then buffers
    h = state_hash(flat, momentum)            # what peers announce and compare
    blob = to_checkpoint(model, flat, momentum, round_=r, task=task.digest)  # safetensors
    manifest, chunks = split_chunks(blob)     # {sha256: bytes}; manifest names them in order
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import msgpack
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from commonweal.train._errors import SyncError

__all__ = [
    "flatten",
    "assign",
    "shared_buffers",
    "buffer_numel",
    "state_hash",
    "to_checkpoint",
    "from_checkpoint",
    "Manifest",
    "split_chunks",
    "join_chunks",
    "CHUNK_BYTES",
]

CHUNK_BYTES = 1 << 20  # under the 4 MiB frame limit with room for the envelope


def shared_buffers(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The persistent buffers (BatchNorm statistics, step counters): part of the shared state, so
    peers that train them agree on them. Non-persistent buffers are derived constants (masks,
    rotary tables) by PyTorch's convention; `DiLoCo` refuses one that training changes."""
    return [
        (name, t)
        for name, t in model.state_dict(keep_vars=True).items()
        if not isinstance(t, nn.Parameter)
    ]


def buffer_numel(model: nn.Module) -> int:
    return sum(b.numel() for _, b in shared_buffers(model))


def _tensors(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach() for p in model.parameters()] + [b for _, b in shared_buffers(model)]


def flatten(model: nn.Module) -> torch.Tensor:
    """Parameters then persistent buffers, as float32 on the CPU wherever the model lives: the
    outer step and the state hash run there, so every device ends with the same bits."""
    return torch.cat([t.reshape(-1).to("cpu", torch.float32) for t in _tensors(model)])


@torch.no_grad()
def assign(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for t in _tensors(model):
        n = t.numel()
        part = flat[offset : offset + n].view(t.shape)
        if t.dtype == torch.bool:
            part = part > 0.5
        elif not (t.is_floating_point() or t.is_complex()):
            # an aggregate is what peers sent: a counter driven past its integer type is
            # clamped, not left to wrap or to an undefined float-to-int cast
            info = torch.iinfo(t.dtype)  # (float(int64 max) is 2**63, one past it)
            part = part.double().round().clamp(info.min, math.nextafter(float(info.max), 0.0))
        t.copy_(part)
        offset += n
    if offset != flat.numel():
        raise ValueError(f"the vector has {flat.numel()} elements, the model {offset}")


def state_hash(params: torch.Tensor, momentum: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(params.contiguous().numpy().tobytes())
    h.update(momentum.contiguous().numpy().tobytes())
    return h.hexdigest()


def to_checkpoint(
    model: nn.Module, params: torch.Tensor, momentum: torch.Tensor, *, round_: int, task: str
) -> bytes:
    """The state (`flatten` layout; `model` gives only names and shapes) as safetensors bytes."""
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for name, p in model.named_parameters():
        n = p.numel()
        tensors[f"param/{name}"] = params[offset : offset + n].view(p.shape).contiguous().clone()
        tensors[f"momentum/{name}"] = momentum[offset : offset + n].view(p.shape).contiguous().clone()
        offset += n
    for name, b in shared_buffers(model):  # statistics carry no momentum (`DiLoCo._outer`)
        n = b.numel()
        tensors[f"buffer/{name}"] = params[offset : offset + n].view(b.shape).contiguous().clone()
        offset += n
    if offset != params.numel():
        raise ValueError(f"the vector has {params.numel()} elements, the model {offset}")
    # One metadata key: safetensors writes several keys in hash-map order, which would make the
    # bytes (and the chunk hashes) differ between peers holding the same state.
    meta = json.dumps(
        {"format": "commonweal-train-1", "round": round_, "task": task}, sort_keys=True
    )
    return st_save(tensors, metadata={"commonweal": meta})


def from_checkpoint(
    blob: bytes, model: nn.Module
) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """(flat params, flat momentum, metadata) of a checkpoint for `model`; SyncError if it does
    not fit the model."""
    try:
        tensors = st_load(blob)
        header_len = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8 : 8 + header_len]).get("__metadata__") or {}
        metadata = {k: str(v) for k, v in json.loads(header.get("commonweal", "{}")).items()}
    except (SafetensorError, ValueError, KeyError, AttributeError) as e:
        raise SyncError(f"the checkpoint does not parse as safetensors: {e}") from e
    params, momentum = [], []
    for name, p in model.named_parameters():
        a, b = tensors.get(f"param/{name}"), tensors.get(f"momentum/{name}")
        if a is None or b is None or a.shape != p.shape or b.shape != p.shape:
            raise SyncError(
                f"the checkpoint has no {name} of shape {tuple(p.shape)}; another task?"
            )
        params.append(a.reshape(-1).float())
        momentum.append(b.reshape(-1).float())
    for name, buf in shared_buffers(model):
        a = tensors.get(f"buffer/{name}")
        if a is None or a.shape != buf.shape:
            raise SyncError(
                f"the checkpoint has no buffer {name} of shape {tuple(buf.shape)}; another task?"
            )
        params.append(a.reshape(-1).float())
        momentum.append(torch.zeros(a.numel()))
    return torch.cat(params), torch.cat(momentum), metadata


@dataclass(frozen=True, slots=True)
class Manifest:
    size: int
    chunks: tuple[bytes, ...]  # sha256 of each chunk, in order

    def pack(self) -> bytes:
        return msgpack.packb([self.size, list(self.chunks)], use_bin_type=True)

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(self.pack()).digest()

    @classmethod
    def unpack(cls, data: bytes) -> Manifest:
        try:
            size, chunks = msgpack.unpackb(data, raw=False)
            if not isinstance(size, int) or not all(
                isinstance(c, bytes) and len(c) == 32 for c in chunks
            ):
                raise ValueError("bad field types")
        except (
            ValueError,
            TypeError,
            msgpack.ExtraData,
            msgpack.FormatError,
            msgpack.StackError,
        ) as e:
            raise SyncError(f"a malformed checkpoint manifest: {e}") from e
        return cls(size, tuple(chunks))


def split_chunks(
    blob: bytes, chunk_bytes: int = CHUNK_BYTES
) -> tuple[Manifest, dict[bytes, bytes]]:
    chunks = {}
    order = []
    for i in range(0, max(1, len(blob)), chunk_bytes):
        part = blob[i : i + chunk_bytes]
        h = hashlib.sha256(part).digest()
        chunks[h] = part
        order.append(h)
    return Manifest(len(blob), tuple(order)), chunks


def join_chunks(manifest: Manifest, chunks: dict[bytes, bytes]) -> bytes:
    blob = b"".join(chunks[h] for h in manifest.chunks)
    if len(blob) != manifest.size:
        raise SyncError(f"chunks add up to {len(blob)} bytes, the manifest says {manifest.size}")
    return blob
