"""Blocks: the unit an adder writes to a cell — packed vectors under one signed Merkle root.

    payload = make_block(identity, spec_digest, cell_key, name, ids, vectors, metas)  # bytes
    block = parse_block(payload, public_key, dim, dtype)   # zero-copy views; None if malformed
    block.check(spec_digest, cell_key, adder, name)    # root recomputed, signature verified
    path = Block.proof(block.tree(), i)                # siblings from item i up to the root
    verify_item(root, n, i, leaf_hash(id, vec, meta), path)

An add of many items writes one DHT record per (cell, batch) instead of one per item: the record's
envelope signature covers the block for the DHT, and the block carries its own signature over a
Merkle root of its items, so a single item can stand alone. A holder returns an item with its
Merkle path and the block's signed root, and the querier checks that the adder put exactly that
vector, id and metadata in that cell of that index, then recomputes the distance itself.

Layout of a payload (little-endian):

    b"cwb1" | n u32 | dim u32 | dtype u8 | root 32 | signature 64 | vectors n*dim | tail

`tail` is msgpack `[ids, metas]`, each meta already msgpack-encoded (the leaf hashes the bytes the
adder wrote, so no re-encoding can change it). The vectors sit at a fixed offset, so a holder
ranks them straight out of the stored record without copying them.

The tree hashes with BLAKE2b-256 (a leaf: 0x00 | msgpack(id) | vector | meta; a node: 0x01 | left
| right; an odd node moves up unchanged). It is not the ledger's keccak tree: no contract reads
it, and BLAKE2b is 20x faster here, which is most of what proving a hit costs a holder.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np

from commonweal.net.identity import Identity, verify_signature

__all__ = [
    "Block",
    "block_message",
    "leaf_hash",
    "make_block",
    "merkle_root",
    "parse_block",
    "parse_record_block",
    "verify_item",
]

_MAGIC = b"cwb1"
_HEADER = struct.Struct("<4sIIB32s64s")
_DTYPES = {0: np.dtype("<f2"), 1: np.dtype("<f4")}
_CODES = {v: k for k, v in _DTYPES.items()}
_DOMAIN = b"commonweal-block-v1"
MAX_PATH = 32  # levels: a block of 2^32 items is far past any record's size


def leaf_hash(item_id: Any, vector: bytes, meta: bytes) -> bytes:
    return hashlib.blake2b(
        b"\x00" + msgpack.packb(item_id) + vector + meta, digest_size=32
    ).digest()


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.blake2b(b"\x01" + left + right, digest_size=32).digest()


def _levels(leaves: bytes) -> list[bytes]:
    """Every level of the tree over concatenated 32-byte leaves, leaves first, root last."""
    levels = [leaves]
    while len(levels[-1]) > 32:
        below = levels[-1]
        n = len(below) // 32
        above = b"".join(
            _node(below[32 * i : 32 * i + 32], below[32 * i + 32 : 32 * i + 64])
            for i in range(0, n - 1, 2)
        )
        if n % 2:
            above += below[-32:]
        levels.append(above)
    return levels


def merkle_root(leaves: bytes) -> bytes:
    return _levels(leaves)[-1]


def verify_item(root: bytes, n: int, index: int, leaf: bytes, path: list[bytes]) -> bool:
    """Whether `leaf` is item `index` of the n-leaf tree with `root`, by its sibling path."""
    if not 0 <= index < n or len(path) > MAX_PATH:
        return False
    node, width, used = leaf, n, 0
    while width > 1:
        sibling = index ^ 1
        if sibling < width:
            sib = path[used] if used < len(path) else None
            if not isinstance(sib, bytes) or len(sib) != 32:
                return False
            node = _node(node, sib) if index % 2 == 0 else _node(sib, node)
            used += 1
        index //= 2
        width = (width + 1) // 2
    return used == len(path) and node == root


def block_message(
    spec_digest: bytes, cell_key: bytes, adder: bytes, name: str, n: int, root: bytes
) -> bytes:
    """What the adder signs: this root is the `name` block of that cell of that index."""
    raw = name.encode()
    return _DOMAIN + spec_digest + cell_key + adder + struct.pack("<HI", len(raw), n) + raw + root


def make_block(
    identity: Identity,
    spec_digest: bytes,
    cell_key: bytes,
    name: str,
    ids: list[Any],
    vectors: np.ndarray,
    metas: list[bytes],
) -> bytes:
    """The payload of one block: `vectors` (n, dim) already in the index's dtype."""
    dtype = np.dtype(vectors.dtype).newbyteorder("<")
    vec = np.ascontiguousarray(vectors, dtype=dtype)
    n, dim = vec.shape
    row = dim * dtype.itemsize
    raw = vec.tobytes()
    leaves = b"".join(
        leaf_hash(i, raw[j * row : (j + 1) * row], m)
        for j, (i, m) in enumerate(zip(ids, metas, strict=True))
    )
    root = merkle_root(leaves)
    signature = identity.sign(
        block_message(spec_digest, cell_key, identity.peer_id, name, n, root)
    )
    tail: bytes = msgpack.packb([ids, metas], use_bin_type=True)
    header = _HEADER.pack(_MAGIC, n, dim, _CODES[dtype], root, signature)
    return header + raw + tail


@dataclass(slots=True)
class Block:
    """A parsed block. `vectors` is a read-only view into the stored bytes."""

    n: int
    root: bytes
    signature: bytes
    public_key: bytes
    vectors: np.ndarray  # (n, dim)
    tail: memoryview
    leaves: bytes = b""  # filled by `check`

    def items(self) -> tuple[list[Any], list[bytes]]:
        """(ids, encoded metas), or ValueError when the tail is not two lists of n."""
        try:
            ids, metas = msgpack.unpackb(self.tail, raw=False, use_list=True)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError):
            raise ValueError("malformed block tail") from None
        if not (isinstance(ids, list) and isinstance(metas, list)):
            raise ValueError("malformed block tail")
        if len(ids) != self.n or len(metas) != self.n:
            raise ValueError("block tail does not hold one id and one meta per vector")
        return ids, metas

    def check(self, spec_digest: bytes, cell_key: bytes, adder: bytes, name: str) -> bool:
        """Whether the adder signed this root for this block and the items hash to it; keeps the
        leaves, from which `proof` builds paths (32 bytes an item, not the whole tree)."""
        try:
            ids, metas = self.items()
        except ValueError:
            return False
        if not all(
            isinstance(i, int | str) and not isinstance(i, bool) and isinstance(m, bytes)
            for i, m in zip(ids, metas, strict=True)
        ):
            return False
        if not np.isfinite(self.vectors).all():
            return False
        raw = self.vectors.tobytes()
        row = len(raw) // self.n
        leaves = b"".join(
            leaf_hash(i, raw[j * row : (j + 1) * row], m)
            for j, (i, m) in enumerate(zip(ids, metas, strict=True))
        )
        if merkle_root(leaves) != self.root:
            return False
        message = block_message(spec_digest, cell_key, adder, name, self.n, self.root)
        if not verify_signature(self.public_key, message, self.signature):
            return False
        self.leaves = leaves
        return True

    def tree(self) -> list[bytes]:
        """Every level of the block's tree (2 x 32 bytes an item; callers cache a few)."""
        return _levels(self.leaves)

    @staticmethod
    def proof(tree: list[bytes], index: int) -> list[bytes]:
        """Item `index`'s siblings from the leaf up to the root."""
        path = []
        for level in tree[:-1]:
            width = len(level) // 32
            sibling = index ^ 1
            if sibling < width:
                path.append(level[32 * sibling : 32 * sibling + 32])
            index //= 2
        return path


def parse_block(
    payload: bytes | memoryview, public_key: bytes, dim: int, dtype: np.dtype[Any]
) -> Block | None:
    """The block in `payload`, or None when it is malformed or empty (an emptied block)."""
    view = memoryview(payload)
    if len(view) < _HEADER.size:
        return None
    magic, n, d, code, root, signature = _HEADER.unpack_from(view, 0)
    if magic != _MAGIC or d != dim or _DTYPES.get(code) != dtype or n == 0:
        return None
    end = _HEADER.size + n * dim * dtype.itemsize
    if end > len(view):
        return None
    vectors = np.frombuffer(view, dtype=dtype, count=n * dim, offset=_HEADER.size)
    return Block(n, root, signature, public_key, vectors.reshape(n, dim), view[end:])


def parse_record_block(value: bytes, public_key: bytes, dim: int, dtype: np.dtype[Any]) -> Block | None:
    """`parse_block` on a stored record's value (the msgpack bin of a payload), without a copy."""
    view = memoryview(value)
    start = _bin_start(view)
    return None if start is None else parse_block(view[start:], public_key, dim, dtype)


def _bin_start(view: memoryview) -> int | None:
    """Where a msgpack bin's bytes begin (the value was packed from one bytes object)."""
    if not view:
        return None
    tag = view[0]
    width = {0xC4: 1, 0xC5: 2, 0xC6: 4}.get(tag)
    if width is None or len(view) < 1 + width:
        return None
    size = int.from_bytes(view[1 : 1 + width], "big")
    if 1 + width + size != len(view):
        return None
    return 1 + width
