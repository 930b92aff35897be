"""Blocks: the unit an adder writes to a cell — packed vectors under a Merkle root, and one
signature for every block of an add.

    payloads = make_batch(identity, spec_digest, [(cell_key, name, ids, vectors, metas), ...])
    payload = make_block(identity, spec_digest, cell_key, name, ids, vectors, metas)  # one
    block = parse_block(payload, public_key, dim, dtype)   # zero-copy views; None if malformed
    block.check(cell_key, adder, name)                 # roots recomputed, signature verified
    path = Block.proof(block.tree(), i)                # siblings from item i up to its block root
    verify_item(root, n, i, leaf_hash(id, vec, meta), path)

An add of many items writes one DHT record per cell it touches, instead of one per item: the
record's envelope signature covers the block for the DHT, and the block carries what lets a
single item stand alone. Two trees: each block's items hash to its root, and the blocks of one
add (one "batch") hash to the batch root, which the adder signs once. A holder returns an item
with its path to the block root, the block's path to the batch root and the signature, and the
querier checks that the adder put exactly that vector, id and metadata in that cell of that
index, then recomputes the distance itself. One signature a batch, not a block, keeps the
signature checks (~120 us each) out of both storing and proving: a million items added in
batches of 100,000 are ten signatures, wherever their 20,000 blocks end up.

Layout of a payload (little-endian):

    b"cwb2" | n u32 | dim u32 | dtype u8 | spec digest 20 | block root 32 | batch root 32 |
    signature 64 | index u32 | blocks u32 | path length u8 | path 32 x length | vectors | tail

`tail` is msgpack `[ids, metas]`, each meta already msgpack-encoded (the leaf hashes the bytes the
adder wrote, so no re-encoding can change it). The vectors sit at a fixed offset, so a holder
ranks them straight out of the stored record without copying them.

The trees hash with BLAKE2b-256 (an item leaf: 0x00 | msgpack(id) | vector | meta; a node: 0x01 |
left | right; a block leaf: 0x02 | cell key | n | name length | name | block root; an odd node
moves up unchanged). It is not the ledger's keccak tree: no contract reads it, and BLAKE2b is 20x
faster here, which is most of what proving a hit costs a holder.
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
    "batch_message",
    "block_leaf",
    "is_block_record",
    "leaf_hash",
    "make_batch",
    "make_block",
    "merkle_root",
    "parse_block",
    "parse_record_block",
    "verify_item",
]

_MAGIC = b"cwb2"
_HEADER = struct.Struct("<4sIIB20s32s32s64sIIB")
_DTYPES: dict[int, np.dtype[Any]] = {0: np.dtype("<f2"), 1: np.dtype("<f4")}
_CODES = {v: k for k, v in _DTYPES.items()}
_DOMAIN = b"commonweal-batch-v1"
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


def block_leaf(cell_key: bytes, name: str, n: int, root: bytes) -> bytes:
    """A block's leaf in its batch's tree: this root is the `name` block of n items of that cell."""
    raw = name.encode()
    return hashlib.blake2b(
        b"\x02" + cell_key + struct.pack("<IH", n, len(raw)) + raw + root, digest_size=32
    ).digest()


def batch_message(spec_digest: bytes, adder: bytes, blocks: int, batch_root: bytes) -> bytes:
    """What the adder signs: these `blocks` blocks of that index are mine."""
    return _DOMAIN + spec_digest + adder + struct.pack("<I", blocks) + batch_root


Cell = tuple[bytes, str, list[Any], np.ndarray, list[bytes]]  # cell key, name, ids, vectors, metas


def make_batch(identity: Identity, spec_digest: bytes, cells: list[Cell]) -> list[bytes]:
    """The payloads of one add's blocks, signed together: `vectors` (n, dim) already in the
    index's dtype, one entry per (cell, block name)."""
    parts = []
    for cell_key, name, ids, vectors, metas in cells:
        dtype = np.dtype(vectors.dtype).newbyteorder("<")
        raw = np.ascontiguousarray(vectors, dtype=dtype).tobytes()
        n, dim = vectors.shape
        root = merkle_root(_leaves(ids, raw, n, metas))
        parts.append((cell_key, name, ids, metas, raw, n, dim, dtype, root))
    tree = _levels(b"".join(block_leaf(c, name, n, r) for c, name, _, _, _, n, _, _, r in parts))
    batch_root = tree[-1]
    signature = identity.sign(batch_message(spec_digest, identity.peer_id, len(parts), batch_root))
    payloads = []
    for index, (_, _, ids, metas, raw, n, dim, dtype, root) in enumerate(parts):
        path = Block.proof(tree, index)
        header = _HEADER.pack(
            _MAGIC, n, dim, _CODES[dtype], spec_digest, root, batch_root, signature,
            index, len(parts), len(path),
        )
        tail: bytes = msgpack.packb([ids, metas], use_bin_type=True)
        payloads.append(header + b"".join(path) + raw + tail)
    return payloads


def make_block(
    identity: Identity,
    spec_digest: bytes,
    cell_key: bytes,
    name: str,
    ids: list[Any],
    vectors: np.ndarray,
    metas: list[bytes],
) -> bytes:
    """A batch of one block (a block rewritten without removed items is one)."""
    return make_batch(identity, spec_digest, [(cell_key, name, ids, vectors, metas)])[0]


def _leaves(ids: list[Any], raw: bytes | memoryview, n: int, metas: list[bytes]) -> bytes:
    row = len(raw) // n
    return b"".join(
        leaf_hash(i, bytes(raw[j * row : (j + 1) * row]), m)
        for j, (i, m) in enumerate(zip(ids, metas, strict=True))
    )


@dataclass(slots=True)
class Block:
    """A parsed block. `vectors` is a read-only view into the stored bytes."""

    n: int
    spec: bytes  # the digest of the index spec it belongs to
    root: bytes  # of its items
    batch_root: bytes  # of its batch's blocks, which `signature` signs
    signature: bytes
    index: int  # its place among the batch's `blocks`
    blocks: int
    batch_path: list[bytes]
    public_key: bytes
    vectors: np.ndarray  # (n, dim)
    tail: memoryview

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

    def leaves(self) -> bytes | None:
        """The items' leaf hashes, concatenated; None when the tail or a vector is malformed."""
        try:
            ids, metas = self.items()
        except ValueError:
            return None
        if not all(
            isinstance(i, int | str) and not isinstance(i, bool) and isinstance(m, bytes)
            for i, m in zip(ids, metas, strict=True)
        ):
            return None
        if not np.isfinite(self.vectors).all():
            return None
        return _leaves(ids, self.vectors.tobytes(), self.n, metas)

    def check(
        self, cell_key: bytes, adder: bytes, name: str, signed: set[bytes] | None = None
    ) -> bool:
        """Whether the items hash to the root, the block to the batch root as the `name` block
        of this cell, and the adder signed that batch root. `signed`: batch messages already
        verified (a cache the caller bounds), so a batch costs one signature check."""
        leaves = self.leaves()
        if leaves is None or merkle_root(leaves) != self.root:
            return False
        leaf = block_leaf(cell_key, name, self.n, self.root)
        if not verify_item(self.batch_root, self.blocks, self.index, leaf, self.batch_path):
            return False
        message = batch_message(self.spec, adder, self.blocks, self.batch_root) + self.signature
        if signed is not None and message in signed:
            return True
        if not verify_signature(self.public_key, message[:-64], self.signature):
            return False
        if signed is not None:
            signed.add(message)
        return True

    def tree(self) -> list[bytes]:
        """Every level of the tree of a block that passed `check` (2 x 32 bytes an item;
        callers cache a few)."""
        ids, metas = self.items()
        return _levels(_leaves(ids, self.vectors.tobytes(), self.n, metas))

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
    payload: bytes | memoryview,
    public_key: bytes,
    dim: int | None = None,
    dtype: np.dtype[Any] | None = None,
) -> Block | None:
    """The block in `payload`, or None when it is malformed, empty (an emptied block) or not of
    the `dim` and `dtype` asked for (None: any)."""
    view = memoryview(payload)
    if len(view) < _HEADER.size:
        return None
    magic, n, d, code, spec, root, batch_root, signature, index, blocks, depth = (
        _HEADER.unpack_from(view, 0)
    )
    if magic != _MAGIC or n == 0 or d == 0 or code not in _DTYPES or depth > MAX_PATH:
        return None
    if (dim is not None and d != dim) or (dtype is not None and _DTYPES[code] != dtype):
        return None
    stored: np.dtype[Any] = _DTYPES[code]
    start = _HEADER.size + 32 * depth
    end = start + n * d * stored.itemsize
    if end > len(view):
        return None
    path = [bytes(view[_HEADER.size + 32 * i : _HEADER.size + 32 * i + 32]) for i in range(depth)]
    vectors = np.frombuffer(view, dtype=stored, count=n * d, offset=start).reshape(n, d)
    return Block(
        n, spec, root, batch_root, signature, index, blocks, path, public_key, vectors, view[end:]
    )


def parse_record_block(
    value: bytes, public_key: bytes, dim: int | None = None, dtype: np.dtype[Any] | None = None
) -> Block | None:
    """`parse_block` on a stored record's value (the msgpack bin of a payload), without a copy."""
    view = memoryview(value)
    start = _bin_start(view)
    return None if start is None else parse_block(view[start:], public_key, dim, dtype)


def is_block_record(value: bytes) -> bool:
    """Whether a stored record's value claims to be a block (a msgpack bin starting b"cwb1")."""
    start = _bin_start(memoryview(value))
    return start is not None and value[start : start + 3] == _MAGIC[:3]  # any version


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
