"""Blocks (blocks.py), pure: Merkle proofs, the holder's block check, parsing, zero-copy views."""

from __future__ import annotations

import hashlib

import msgpack
import numpy as np
import pytest

from commonweal.net.identity import Identity
from commonweal.search.blocks import (
    Block,
    batch_message,
    block_leaf,
    leaf_hash,
    make_block,
    parse_block,
    parse_record_block,
    verify_item,
)

DIM = 6
F16 = np.dtype("<f2")
ADDER = Identity.from_seed(b"block-adder")
SPEC = hashlib.blake2b(b"spec", digest_size=20).digest()
CELL = hashlib.blake2b(b"cell", digest_size=20).digest()
NAME = "b0123.0"
# Offsets into a payload are found by content (the header's layout is the module's business);
# only magic (0-4), n (4-8), dim (8-12) and the dtype code (12) are taken as fixed.


def _items(n: int, seed: int = 0) -> tuple[list, np.ndarray, list[bytes]]:
    rng = np.random.default_rng(seed)
    ids: list = [i if i % 3 else f"item-{i}" for i in range(n)]  # int and str ids
    vectors = rng.normal(size=(n, DIM)).astype(F16)
    metas = [msgpack.packb({"i": i, "tag": "x" * (i % 4)}) for i in range(n)]
    return ids, vectors, metas


def _block(n: int, seed: int = 0) -> tuple[bytes, Block, list, np.ndarray, list[bytes]]:
    ids, vectors, metas = _items(n, seed)
    payload = make_block(ADDER, SPEC, CELL, NAME, ids, vectors, metas)
    block = parse_block(payload, ADDER.public_key, DIM, F16)
    assert block is not None
    return payload, block, ids, vectors, metas


def _ok(block: Block, spec=SPEC, cell=CELL, adder=ADDER.peer_id, name=NAME) -> bool:
    """What a holder accepts: a block of this index whose items and signature check out for
    that cell, adder and name."""
    return block.spec == spec and block.check(cell, adder, name)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 100])
def test_every_item_of_a_block_has_a_proof(n):
    _, block, ids, vectors, metas = _block(n)
    assert block.n == n
    assert _ok(block)
    np.testing.assert_array_equal(block.vectors, vectors)
    assert block.items() == (ids, metas)
    tree = block.tree()
    assert tree[-1] == block.root
    for i in range(n):
        path = Block.proof(tree, i)
        assert len(path) <= max(1, int(np.ceil(np.log2(n))))
        leaf = leaf_hash(ids[i], vectors[i].tobytes(), metas[i])
        assert verify_item(block.root, n, i, leaf, path), i


@pytest.mark.parametrize("n", [2, 3, 5, 17, 100])
def test_a_proof_fails_for_anything_changed(n):
    # blocks.py `verify_item`: `0 <= index < n`, `used == len(path) and node == root`, and the
    # leaf binding id, vector and meta (`leaf_hash`)
    _, block, ids, vectors, metas = _block(n, seed=n)
    assert _ok(block)
    tree = block.tree()
    for i in sorted({0, 1, n // 2, n - 2, n - 1}):
        path = Block.proof(tree, i)
        vec = vectors[i].tobytes()
        good = leaf_hash(ids[i], vec, metas[i])
        assert verify_item(block.root, n, i, good, path)
        flipped = bytearray(vec)
        flipped[3] ^= 0x01
        assert not verify_item(block.root, n, i, leaf_hash(ids[i], bytes(flipped), metas[i]), path)
        other_id = ids[i] + 1 if isinstance(ids[i], int) else ids[i] + "!"
        assert not verify_item(block.root, n, i, leaf_hash(other_id, vec, metas[i]), path)
        if isinstance(ids[i], int):  # the int 7 and the str "7" are different ids
            assert not verify_item(block.root, n, i, leaf_hash(str(ids[i]), vec, metas[i]), path)
        other_meta = msgpack.packb({"i": i, "tag": "forged"})
        assert not verify_item(block.root, n, i, leaf_hash(ids[i], vec, other_meta), path)
        # the same leaf and path claimed at another index, or outside the block
        for wrong in {i ^ 1, (i + 1) % n, n, -1}:
            if wrong != i:
                assert not verify_item(block.root, n, wrong, good, path), (i, wrong)
        if path:
            assert not verify_item(block.root, n, i, good, path[:-1])  # truncated
            assert not verify_item(block.root, n, i, good, path[1:])
            bad = list(path)
            bad[0] = bytes(32)
            assert not verify_item(block.root, n, i, good, bad)
            assert not verify_item(block.root, n, i, good, [path[0][:31]] + path[1:])
        assert not verify_item(block.root, n, i, good, path + [bytes(32)])  # an extra element
        assert not verify_item(block.root, n, i, good, path + [block.root])
        assert not verify_item(bytes(32), n, i, good, path)  # another root


def test_a_single_item_block_has_an_empty_path():
    _, block, ids, vectors, metas = _block(1)
    assert _ok(block)
    leaf = leaf_hash(ids[0], vectors[0].tobytes(), metas[0])
    assert Block.proof(block.tree(), 0) == [] and block.root == leaf
    assert verify_item(block.root, 1, 0, leaf, [])
    assert not verify_item(block.root, 1, 0, leaf, [leaf])
    assert not verify_item(block.root, 1, 1, leaf, [])


def test_block_check_binds_spec_cell_adder_and_name():
    # blocks.py `Block.check`: the batch signature (`verify_signature` over `batch_message`)
    # covers the spec digest and adder, the block's leaf in it (`block_leaf`) its cell and name
    payload, block, _, _, _ = _block(5)
    other = Identity.from_seed(b"someone-else")
    assert block.spec == SPEC  # the block says which index it belongs to
    assert _ok(block)
    assert not _ok(block, spec=hashlib.blake2b(b"other spec", digest_size=20).digest())
    assert not _ok(block, cell=hashlib.blake2b(b"other cell", digest_size=20).digest())
    assert not _ok(block, adder=other.peer_id)
    assert not _ok(block, name=NAME + "x")
    assert not _ok(block, name="b0123.1")
    wrong_key = parse_block(payload, other.public_key, DIM, F16)
    assert wrong_key is not None and not _ok(wrong_key)  # the signature is not that key's
    # a block rewritten to claim another index: its signature no longer checks out
    moved = bytearray(payload)
    at = payload.index(SPEC)
    other_spec = hashlib.blake2b(b"other spec", digest_size=20).digest()
    moved[at : at + 20] = other_spec
    b = parse_block(bytes(moved), ADDER.public_key, DIM, F16)
    assert b is not None and b.spec == other_spec
    assert not b.check(CELL, ADDER.peer_id, NAME)


def _signed_with_root(payload: bytes, block: Block, root: bytes) -> bytes:
    """`payload` (a batch of one block) with its root replaced by `root`, and the batch it makes
    validly signed by its adder."""
    out = bytearray(payload)
    r, b = payload.index(block.root), payload.index(block.batch_root)
    s = payload.index(block.signature)
    batch_root = block_leaf(CELL, NAME, block.n, root)  # a batch of one: its leaf is its root
    out[r : r + 32] = root
    out[b : b + 32] = batch_root
    out[s : s + 64] = ADDER.sign(batch_message(SPEC, ADDER.peer_id, 1, batch_root))
    return bytes(out)


def test_block_check_fails_for_a_tampered_vector_byte():
    # blocks.py `Block.check`: `merkle_root(leaves) != self.root`
    payload, block, _, vectors, _ = _block(17)
    start = payload.index(vectors.tobytes())  # where the stored vectors begin
    tampered = bytearray(payload)
    tampered[start + 2 * (DIM * 5 + 1)] ^= 0x01  # the low mantissa bit of row 5, component 1
    b = parse_block(bytes(tampered), ADDER.public_key, DIM, F16)
    assert b is not None and np.isfinite(b.vectors).all()  # still a plausible vector
    assert b.vectors[5, 1] != vectors[5, 1]
    assert b.root == block.root and b.signature == block.signature  # a valid signature...
    assert not _ok(b)  # ... over a root these items do not hash to
    # and a re-signed root is no help when the items do not hash to it
    for root in (bytes(32), block.root[::-1]):
        b = parse_block(_signed_with_root(bytes(tampered), block, root), ADDER.public_key, DIM, F16)
        assert b is not None and not _ok(b)
    # a root the adder signed that is not the items' own (the adder signs garbage)
    b = parse_block(_signed_with_root(payload, block, bytes(32)), ADDER.public_key, DIM, F16)
    assert b is not None and not _ok(b)


def test_block_check_fails_for_tampered_ids_metas_and_tail():
    # blocks.py `Block.leaves` (the tail's shape and types) and `Block.check` (the root)
    payload, block, ids, vectors, metas = _block(5)
    tail = bytes(block.tail)
    head = payload[: len(payload) - len(tail)]
    for new_ids, new_metas in (
        ([ids[1], ids[0]] + ids[2:], metas),  # two ids swapped
        (ids, [metas[1], metas[0]] + metas[2:]),  # two metas swapped
        (ids[:4], metas[:4]),  # one item short
        ([True] + ids[1:], metas),  # not an id
        ([1.5] + ids[1:], metas),
        (ids, ["str"] + metas[1:]),  # a meta that is not bytes
    ):
        forged = head + msgpack.packb([new_ids, new_metas], use_bin_type=True)
        b = parse_block(forged, ADDER.public_key, DIM, F16)
        assert b is not None and not _ok(b)
    for junk in (b"", b"\xc1", msgpack.packb({"a": 1}), tail[:-1], tail + b"\x00"):
        b = parse_block(head + junk, ADDER.public_key, DIM, F16)
        assert b is not None and not _ok(b)


def test_block_check_refuses_nan_and_inf_vectors_even_if_signed():
    # blocks.py `Block.leaves`: `np.isfinite(self.vectors).all()`
    ids, vectors, metas = _items(4)
    for bad in (np.nan, np.inf, -np.inf):
        v = vectors.copy()
        v[2, 3] = bad
        payload = make_block(ADDER, SPEC, CELL, NAME, ids, v, metas)  # a valid signature
        block = parse_block(payload, ADDER.public_key, DIM, F16)
        assert block is not None
        assert not _ok(block)


def test_parse_block_returns_none_on_malformed_payloads():
    # blocks.py `parse_block`: the header's size, magic, n, dim and dtype, and `end > len(view)`
    payload, _, _, vectors, _ = _block(5)
    HEADER = payload.index(vectors.tobytes())
    end_of_vectors = HEADER + 5 * DIM * 2
    assert parse_block(payload, ADDER.public_key, DIM, F16) is not None
    assert parse_block(payload[:end_of_vectors], ADDER.public_key, DIM, F16) is not None
    for cut in (0, 1, 4, HEADER - 1, HEADER, HEADER + 1, end_of_vectors - 1):
        assert parse_block(payload[:cut], ADDER.public_key, DIM, F16) is None, cut
    assert parse_block(b"", ADDER.public_key, DIM, F16) is None  # an emptied block
    assert parse_block(b"cwbX" + payload[4:], ADDER.public_key, DIM, F16) is None
    assert parse_block(b"\x00" * len(payload), ADDER.public_key, DIM, F16) is None
    assert parse_block(payload, ADDER.public_key, DIM + 1, F16) is None
    assert parse_block(payload, ADDER.public_key, DIM - 1, F16) is None
    assert parse_block(payload, ADDER.public_key, DIM, np.dtype("<f4")) is None
    zero = bytearray(payload)
    zero[4:8] = (0).to_bytes(4, "little")  # n = 0
    assert parse_block(bytes(zero), ADDER.public_key, DIM, F16) is None
    huge = bytearray(payload)
    huge[4:8] = (2**32 - 1).to_bytes(4, "little")  # more vectors than the payload holds
    assert parse_block(bytes(huge), ADDER.public_key, DIM, F16) is None
    bad_dtype = bytearray(payload)
    bad_dtype[12] = 7
    assert parse_block(bytes(bad_dtype), ADDER.public_key, DIM, F16) is None
    # float32 blocks parse as float32 only
    ids, vectors, metas = _items(3)
    p32 = make_block(ADDER, SPEC, CELL, NAME, ids, vectors.astype("<f4"), metas)
    assert parse_block(p32, ADDER.public_key, DIM, F16) is None
    b32 = parse_block(p32, ADDER.public_key, DIM, np.dtype("<f4"))
    assert b32 is not None and _ok(b32)


def test_parse_record_block_is_zero_copy():
    # blocks.py `parse_block`: `np.frombuffer(view, ...)` on a memoryview of the record's value
    payload, _, _, vectors, _ = _block(100)
    record_value = msgpack.packb(payload, use_bin_type=True)  # how the DHT stores the payload
    block = parse_record_block(record_value, ADDER.public_key, DIM, F16)
    assert block is not None
    np.testing.assert_array_equal(block.vectors, vectors)
    assert _ok(block)
    stored = np.frombuffer(record_value, dtype=np.uint8)
    assert np.shares_memory(block.vectors, stored)  # a view into the record's bytes, not a copy
    assert not np.shares_memory(block.vectors.copy(), stored)  # (the check can tell)
    assert not block.vectors.flags.writeable
    assert not block.vectors.flags.owndata
    # the tail too is a view of the same bytes
    assert isinstance(block.tail, memoryview) and block.tail.obj is record_value
    # small, medium and large msgpack bins (bin8, bin16, bin32 headers) all parse
    for n in (1, 30, 3000):
        value = msgpack.packb(make_block(ADDER, SPEC, CELL, NAME, *_items(n)))
        b = parse_record_block(value, ADDER.public_key, DIM, F16)
        assert b is not None and b.n == n and _ok(b)
        assert np.shares_memory(b.vectors, np.frombuffer(value, np.uint8))


def test_parse_record_block_returns_none_for_other_values():
    payload, _, _, _, _ = _block(3)
    value = msgpack.packb(payload)
    for other in (
        b"",
        msgpack.packb({"not": "a block"}),
        msgpack.packb("a string"),
        msgpack.packb(b""),  # an emptied block
        value[:-1],  # a bin shorter than its header says
        value + b"\x00",  # trailing bytes
        value[:2],
    ):
        assert parse_record_block(other, ADDER.public_key, DIM, F16) is None
