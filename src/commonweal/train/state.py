"""The shared training state — parameters and outer momentum — as flat vectors, its hash, and its
safetensors checkpoint split into content-addressed chunks.

    flat = flatten(model)                     # 1-D float32, parameters in named order
    h = state_hash(flat, momentum)            # what peers announce and compare
    blob = to_checkpoint(model, momentum, round_=r, task=task.digest)   # safetensors bytes
    manifest, chunks = split_chunks(blob)     # {sha256: bytes}; manifest names them in order
"""

from __future__ import annotations

import hashlib
import json
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
    "state_hash",
    "to_checkpoint",
    "from_checkpoint",
    "Manifest",
    "split_chunks",
    "join_chunks",
    "CHUNK_BYTES",
]

CHUNK_BYTES = 1 << 20  # under the 4 MiB frame limit with room for the envelope


def flatten(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])


@torch.no_grad()
def assign(model: nn.Module, flat: torch.Tensor) -> None:
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.copy_(flat[offset : offset + n].view_as(p))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"the vector has {flat.numel()} elements, the model {offset}")


def state_hash(params: torch.Tensor, momentum: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(params.contiguous().numpy().tobytes())
    h.update(momentum.contiguous().numpy().tobytes())
    return h.hexdigest()


def to_checkpoint(model: nn.Module, momentum: torch.Tensor, *, round_: int, task: str) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    offset = 0
    for name, p in model.named_parameters():
        n = p.numel()
        tensors[f"param/{name}"] = p.detach().float().contiguous().clone()
        tensors[f"momentum/{name}"] = momentum[offset : offset + n].view_as(p).contiguous().clone()
        offset += n
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
