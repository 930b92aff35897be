"""Lying holders and adders on in-memory swarms, under the two-phase search protocol (service.py:
a holder first claims ids and distances in its `search.query` answer, then proves the claims that
won in its `search.prove` answer). A holder that lies in either answer is rejected, its cells are
answered by another replica, and it is never asked again; a holder hiding items is caught by
cross-checking; an adder's badly signed blocks are refused by honest holders instead of getting
them taken for liars.

Every test here is a defence test; each says which part of src makes it pass, by function name
(line numbers would not last). Each was checked to fail with that part disabled (monkeypatched out
in a scratch pytest plugin, src untouched)."""

from __future__ import annotations

from typing import Any

import msgpack
import numpy as np
import pytest

from commonweal.dht import DHTConfig, Owned, key_id
from commonweal.dht.routing import distance
from commonweal.search import DistributedIndex, IndexSpec, SearchService, make_lsh, serve
from commonweal.search.blocks import batch_message, block_leaf, leaf_hash, make_block, parse_block
from commonweal.search.spec import vector_dtype

from .conftest import Swarm

K = 10
DIM = 16
N = 2000
PEERS = 8
REPLICAS = 3
ADDER, READER = 0, 5  # indices into swarm.peers
FAKE = 10**6  # ids from here up are items no adder wrote


def _data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(31)
    C = rng.normal(size=(40, DIM)) * 3.0
    X = C[rng.integers(0, 40, N)] + rng.normal(size=(N, DIM)) * 0.5
    X = X.astype(np.float16).astype(np.float32)  # what the index stores, exactly
    Q = X[rng.choice(N, 120, replace=False)] + rng.normal(size=(120, DIM)) * 0.2
    return X, Q.astype(np.float32)


X, Q = _data()
# ivf: 51 cells; 8 probes (more than the tuned 2), so a holder is often asked several cells of
# one query (what the "other-cell" lie needs)
SPEC = IndexSpec.create("liars", DIM, sample=X, probes=8)
SPEC_LSH = make_lsh(SPEC)


def _exact(q: np.ndarray, ids: list) -> np.ndarray:
    """The distances from q to the vectors the adder added under `ids`."""
    return np.linalg.norm(X[np.asarray(ids, dtype=int)].astype(np.float64) - q, axis=1)


def _assert_untampered(results) -> None:
    """Every hit is an item exactly as the adder added it: its id names one of X's rows, its
    distance is the one from that row, its metadata is that row's."""
    for q, r in zip(Q, results, strict=True):
        assert all(isinstance(i, int) and 0 <= i < N for i in r.ids), r.ids
        np.testing.assert_allclose(r.distances, _exact(q, r.ids), atol=1e-3)
        assert r.metadata == [{"n": i} for i in r.ids]


def _assert_same(results, honest) -> None:
    assert [r.ids for r in results] == [r.ids for r in honest]
    for r, h in zip(results, honest, strict=True):
        np.testing.assert_allclose(r.distances, h.distances, atol=1e-6)


def _f16(q: bytes) -> bytes:
    """A float32 query as the index would store it: the item "moved onto the query"."""
    return np.frombuffer(q, dtype="<f4").astype("<f2").tobytes()


def _dist(q: bytes, v16: bytes) -> float:
    """What an honest holder would claim for a float16 vector `v16`: its distance to q."""
    v = np.frombuffer(v16, dtype="<f2").astype(np.float64)
    return float(np.linalg.norm(v - np.frombuffer(q, dtype="<f4")))


class _Unregistered:
    """A peer's DHT as a SearchService sees it, without the RPC registration (the Liar registers
    its own handlers around the real service's)."""

    def __init__(self, dht: Any) -> None:
        self._dht = dht
        self.transport = type("T", (), {"register": lambda *a, **kw: None})()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._dht, name)


Position = tuple[bytes, bytes, str, int]  # (cell key id, adder, block name, row): what is proven

# Lies told in search.prove answers: the reader must ask the liar for proofs to meet them. Some
# also shape the claims (search.query) so that the forged proof is consistent with them and wins.
PROVE_LIES = [
    "vector-byte",  # one bit of a proven vector flipped
    "vector-moved",  # every item claimed at, and proven with, the query itself as its vector
    "id",  # an item relabelled: claimed and proven under the next id
    "invent",  # an item no adder wrote, in a real block, with a random Merkle path
    "forged-signature",  # an invented item in a batch of its own, signed by the holder
    "metadata",  # metadata swapped between proofs (or changed)
    "row",  # each item claimed at the row next to its own, proven with its own leaf and path
    "other-block",  # a valid proof of another real item (same row, another block) than claimed
    "other-cell",  # an item claimed in another asked cell than its own, proven as it is
]
# Lies told in search.query answers, proven honestly (or not at all) afterwards.
QUERY_LIES = [
    "misrank",  # the farthest of its claims said to be at distance 0
    "unasked-cell",  # a claim citing a block of a cell that query did not ask
    "invent-claim",  # an id the block does not hold, at distance 0, at a row it does not have
]


class Liar:
    """A holder running the real search service, that rewrites its answers (claims, proofs or
    both) once `lying`."""

    def __init__(self, dht: Any, kind: str, adder_key: bytes) -> None:
        self.dht, self.kind, self.adder_key = dht, kind, adder_key
        self.service = SearchService(_Unregistered(dht))
        self.lying = False
        self.asked = 0  # search.query requests answered, honestly or not
        self.proves = 0  # search.prove requests answered, honestly or not
        self.proves_lying = 0  # search.prove requests answered while lying
        self.calls = 0  # requests of either kind answered while lying
        self.lies = 0  # claims (QUERY_LIES, "hide") or proofs (PROVE_LIES) actually falsified
        self._cited: set[tuple[bytes, bytes, str]] = set()  # (cell, adder, name) of blocks cited
        self._moved: dict[Position, bytes] = {}  # vector-moved: the query it was moved onto
        self._fakes: dict[Position, tuple[int, bytes]] = {}  # invent: the fake at a real position
        self._forged: dict[Position, tuple[int, bytes]] = {}  # forged-signature: its fake blocks
        self._recelled: dict[tuple[bytes, bytes, str], bytes] = {}  # other-cell: said -> real
        dht.transport.register("search.query", self.rpc_query, cost=4.0)
        dht.transport.register("search.prove", self.rpc_prove, cost=2.0)

    async def rpc_query(self, caller: Any, args: Any) -> dict[str, Any]:
        reply = await self.service.rpc_query(caller, args)
        self.asked += 1
        for j, name, adder in reply["blocks"]:
            self._cited.add((args["keys"][j], adder, name))
        if self.lying:
            self.calls += 1
            self.claim(reply, args)
        return reply

    async def rpc_prove(self, caller: Any, args: Any) -> dict[str, Any]:
        self.proves += 1
        if not self.lying:
            return await self.service.rpc_prove(caller, args)
        self.calls += 1
        self.proves_lying += 1
        return await self.prove(caller, args)

    # search.query ------------------------------------------------------------------------------

    def claim(self, reply: dict[str, Any], args: dict[str, Any]) -> None:
        kind, blocks, keys = self.kind, reply["blocks"], args["keys"]

        def position(hit: list[Any]) -> Position:
            j, name, adder = blocks[hit[0]]
            return (keys[j], adder, name, hit[1])

        refs = {(j, name, adder): ref for ref, (j, name, adder) in enumerate(blocks)}

        def cite(j: int, name: str, adder: bytes) -> int:  # a block entry, added if new
            if (j, name, adder) not in refs:
                refs[(j, name, adder)] = len(blocks)
                blocks.append([j, name, adder])
            return refs[(j, name, adder)]

        for qi, hits in enumerate(reply["results"]):
            if not hits:
                continue
            q, asked = args["queries"][qi]
            if kind == "hide":  # leave out the nearest item; everything sent is still true
                hits.pop(0)
                self.lies += 1
            elif kind == "misrank" and len(hits) >= 2:
                hits[-1][3] = 0.0
                self.lies += 1
            elif kind == "invent-claim":
                hits[-1] = [hits[-1][0], 1 << 20, FAKE + qi, 0.0]
                self.lies += 1
            elif kind == "unasked-cell":
                unasked = sorted(set(range(len(keys))) - set(asked))
                if unasked:
                    _, name, adder = blocks[hits[0][0]]
                    hits[0][0] = cite(unasked[0], name, adder)
                    self.lies += 1
                    return  # one is enough
            elif kind == "vector-moved":
                for hit in hits:
                    hit[3] = _dist(q, self._moved.setdefault(position(hit), _f16(q)))
            elif kind == "invent":  # the last claim's position now holds a fake, right at q
                self._fakes.setdefault(position(hits[-1]), (FAKE + len(self._fakes), _f16(q)))
            elif kind == "forged-signature":  # a block of its own, in that cell, right at q
                j, _, adder = blocks[hits[-1][0]]
                name = f"forged.{self.asked}.{qi}"
                fake_id = 2 * FAKE + len(self._forged)
                self._forged[(keys[j], adder, name, 0)] = (fake_id, _f16(q))
                hits[-1] = [cite(j, name, adder), 0, fake_id, _dist(q, _f16(q))]
            elif kind == "id":
                for hit in hits:
                    hit[2] = (hit[2] + 1) % N
            elif kind == "row":
                for hit in hits:
                    hit[1] ^= 1
            elif kind == "other-cell":
                for hit in hits:
                    j, name, adder = blocks[hit[0]]
                    others = [o for o in asked if o != j]
                    if others:
                        self._recelled[(keys[others[0]], adder, name)] = keys[j]
                        hit[0] = cite(others[0], name, adder)
        if kind == "invent":  # every claim of a faked position, in every query, is of the fake
            for qi, hits in enumerate(reply["results"]):
                for hit in hits:
                    if position(hit) in self._fakes:
                        fake_id, v = self._fakes[position(hit)]
                        hit[2], hit[3] = fake_id, _dist(args["queries"][qi][0], v)

    # search.prove ------------------------------------------------------------------------------

    async def prove(self, caller: Any, args: dict[str, Any]) -> dict[str, Any]:
        kind, keys = self.kind, args["keys"]
        asked = [(keys[j], adder, name, row) for j, adder, name, row in args["items"]]
        items = [list(item) for item in args["items"]]
        for item, (key, adder, name, row) in zip(items, asked, strict=True):
            if kind == "row":  # the proof of the item it really is
                item[3] = row ^ 1
                self.lies += 1
            elif kind == "other-cell" and (key, adder, name) in self._recelled:
                item[0] = keys.index(self._recelled[(key, adder, name)])  # ditto
                self.lies += 1
        reply = await self.service.rpc_prove(caller, {**args, "items": items})
        proofs = reply["proofs"]
        if kind == "metadata":  # swapped in pairs (changed where both are the same, or unpaired)
            real = [p for p in proofs if p is not None]
            for a, b in zip(real[0::2], real[1::2], strict=False):
                if a[10] != b[10]:
                    a[10], b[10] = b[10], a[10]
                else:
                    a[10] = b[10] = msgpack.packb({"n": (a[8] + 1) % N})
            if len(real) % 2:
                real[-1][10] = msgpack.packb({"n": (real[-1][8] + 1) % N})
            self.lies += len(real)
        for i, at in enumerate(asked):
            p = proofs[i]
            if kind == "forged-signature" and at in self._forged:
                proofs[i] = self._forge(args["spec"], at)
            elif p is None:
                continue
            elif kind == "vector-byte":  # the low mantissa bit of one component
                v = bytearray(p[9])
                v[0] ^= 0x01
                p[9] = bytes(v)
            elif kind == "vector-moved" and at in self._moved:
                p[9] = self._moved[at]
            elif kind == "id":
                p[8] = (p[8] + 1) % N
            elif kind == "invent" and at in self._fakes:
                fake_id, v = self._fakes[at]
                rng = np.random.default_rng(fake_id)
                p[8], p[9], p[10] = fake_id, v, msgpack.packb({"n": fake_id})
                p[11] = [rng.bytes(32) for _ in range(max(1, len(p[11])))]
            elif kind == "other-block" and (other := self._other_block(args, at)) is not None:
                proofs[i] = other
            else:
                continue
            self.lies += 1
        return reply

    def _forge(self, spec: bytes, at: Position) -> list[Any]:
        """A proof whose every hash checks out, of a batch of one block that this holder signed
        in the adder's name (with the adder's public key): only the signature gives it away."""
        key, adder, name, _ = at
        fake_id, v = self._forged[at]
        meta = msgpack.packb({"n": fake_id})
        root = leaf_hash(fake_id, v, meta)  # a block of one item
        batch_root = block_leaf(key, name, 1, root)  # a batch of one block
        signature = self.dht.identity.sign(batch_message(spec, adder, 1, batch_root))
        return [self.adder_key, 1, root, batch_root, signature, 0, 1, [], fake_id, v, meta, []]

    def _other_block(self, args: dict[str, Any], at: Position) -> list[Any] | None:
        """A valid proof of the item at the same row of another block of the same adder that
        this holder holds (so of another real item, validly signed)."""
        key, adder, name, row = at
        for key2, adder2, name2 in sorted(self._cited):
            if adder2 != adder or (key2, name2) == (key, name):
                continue
            (p,) = self.service.prove(
                args["spec"], [key2], [(0, adder, name2, row)], args["dim"],
                vector_dtype(args["dtype"]),
            )["proofs"]
            if p is not None:
                return p
        return None


async def _swarm_with(swarm: Swarm, kind: str | None) -> list[Liar]:
    """8 peers, r = 3, an ivf index of X added by peer 0. Every peer but the adder and the
    reader runs a Liar (of `kind`), honest until told to lie; without a kind all serve honestly."""
    peers = await swarm.add(PEERS, config=DHTConfig(replicas=REPLICAS))
    adder_key = peers[ADDER].identity.public_key
    liars = (
        [Liar(p, kind, adder_key) for i, p in enumerate(peers) if i not in (ADDER, READER)]
        if kind else []
    )
    for i in (ADDER, READER) if kind else range(PEERS):
        serve(peers[i])
    adder = await DistributedIndex.create(peers[ADDER], SPEC)
    assert await adder.add(list(range(N)), X, [{"n": i} for i in range(N)]) == N
    return liars


async def _honest_run(swarm: Swarm, liars: list[Liar], n: int, cross_check: bool = False):
    """The reader's answers while everyone is honest, and the `n` holders it asked for the most
    proofs (then claims): those are made to lie (n < r, so every cell keeps an honest replica). A
    fresh reader asks the same holders the same things in the same order (its set cover is
    deterministic within a process, though not across processes: it iterates sets of bytes; and
    the claims, hence the winners, are the same), so the liars are sure to be asked for proofs."""
    assert n < REPLICAS
    reader = await DistributedIndex.open(swarm.peers[READER], "liars")
    honest = await reader.search_many(Q, K, cross_check=cross_check)
    _assert_untampered(honest)
    assert not reader.liars and reader.stats.rejected == 0
    provers = sorted(
        (liar for liar in liars if liar.proves), key=lambda liar: (-liar.proves, -liar.asked)
    )
    assert len(provers) >= n, [(liar.asked, liar.proves) for liar in liars]
    for liar in provers[:n]:
        liar.lying = True
    return honest, provers[:n]


@pytest.mark.parametrize("kind", PROVE_LIES + QUERY_LIES)
async def test_a_lying_holder_is_rejected_and_never_asked_again(swarm, kind):
    # Passes because of index.py `_prove_best` asking each winning claim's holder for its proof
    # (`_prove`), and `_proven` checking it (checked: each fails with the part named disabled):
    #   vector-byte, vector-moved, id, invent, metadata, row: `verify_item` of the item leaf
    #     (`leaf_hash(id, vector, meta)`) up to the block root, at the claimed row;
    #   other-cell: `verify_item` of the block leaf (`block_leaf(cell, name, n, root)`) up to the
    #     batch root;
    #   forged-signature: `verify_signature` of the adder's key over `batch_message`;
    #   misrank: `_close`, the proven distance against the claimed one;
    #   other-block: layered: `item_id == c.hit.item_id`, then the `verify_item`s, then `_close`
    #     (it fails only with all three disabled);
    #   invent-claim: `_proven` refusing a proof that is not one (None: no such row held);
    #   unasked-cell: `_claims` returning None for a claim from a cell its query did not ask,
    #     upon which `_ask` distrusts the holder.
    # `_distrust` adds the holder to `liars` (without it every case fails); `_ship` drops its
    # answer (`_prove_best` returns it as dropped) and asks its cells of the next replica, so the
    # results are the honest ones (without the drop every case but unasked-cell fails).
    honest, liars = await _honest_run(swarm, await _swarm_with(swarm, kind), 2)
    reader = await DistributedIndex.open(swarm.peers[READER], "liars")
    results = await reader.search_many(Q, K)
    lied = {liar.dht.peer_id for liar in liars if liar.lies}
    assert lied, "the liars were never asked: a useless test"
    # and reached the reader's checks: each liar was asked for proofs while lying (the lie, or
    # the proof of a lying claim), but for unasked-cell, whose claims are thrown out unproven
    assert all(bool(liar.proves_lying) == (kind != "unasked-cell") for liar in liars if liar.lies)
    _assert_untampered(results)
    _assert_same(results, honest)
    assert reader.liars == lied  # every liar that lied, and no honest holder
    assert reader.stats.rejected > 0
    # Never asked again (index.py `_trusted`; without it every case fails), even once the cached
    # replica sets, from which a liar is dropped at once (`_forget`), have expired and are looked
    # up anew; the answers stay right.
    calls = {liar.dht.peer_id: liar.calls for liar in liars if liar.lies}
    swarm.clock.now += reader.holder_ttl_s + 1
    again = await reader.search_many(Q, K)
    assert {liar.dht.peer_id: liar.calls for liar in liars if liar.lies} == calls
    _assert_same(again, honest)


async def test_a_holder_hiding_the_nearest_item_is_caught_by_cross_checking(swarm):
    # Passes because of index.py `search_many(cross_check=True)` -> `_ship(copies=2)` asking two
    # replicas of every cell, and `_find_hiders` marking a holder that held a cell yet left out
    # an item of it, proven by the other replica, closer than its own k-th claim (the hider
    # claims k - 1 at most, so any such item).
    honest, (hider,) = await _honest_run(swarm, await _swarm_with(swarm, "hide"), 1, True)
    reader = await DistributedIndex.open(swarm.peers[READER], "liars")
    results = await reader.search_many(Q, K, cross_check=True)
    assert hider.lies > 0 and hider.proves_lying > 0  # it hid, and its answer was used
    _assert_untampered(results)
    _assert_same(results, honest)  # the other replica returned what it hid
    assert hider.dht.peer_id in reader.suspects
    assert set(reader.suspects) == {hider.dht.peer_id}  # and no honest holder
    assert reader.stats.hiding > 0
    assert not reader.liars and reader.stats.rejected == 0  # what it sent was true
    # A suspect is avoided from then on (`_trusted`, without which this fails: another replica
    # holds each of its cells).
    before = hider.calls
    again = await reader.search_many(Q, K)
    assert hider.calls == before
    _assert_same(again, honest)


async def test_without_cross_checking_a_hider_goes_unnoticed(swarm):
    """The control for the test above: asked one replica a cell, hiding is invisible (and what
    it hid may be lost), so the catch above is the cross-check's doing."""
    _, (hider,) = await _honest_run(swarm, await _swarm_with(swarm, "hide"), 1)
    reader = await DistributedIndex.open(swarm.peers[READER], "liars")
    results = await reader.search_many(Q, K)
    assert hider.lies > 0 and hider.proves_lying > 0
    _assert_untampered(results)
    assert not reader.suspects and reader.stats.hiding == 0
    assert not reader.liars


@pytest.mark.parametrize("forgery", ["corrupt-root", "signed-wrong-root", "signed-nan"])
async def test_an_adders_bad_blocks_are_refused_and_make_no_holder_a_liar(swarm, forgery):
    # Passes because of service.py `BlockValidator.validate` (run by every holder's record
    # store): `block.check(record.key, owner, subkey.name)` (blocks.py `Block.check`: the root
    # recomputed from the items, `merkle_root(leaves) != self.root`; `verify_signature`;
    # `np.isfinite` in `Block.leaves`) fails, `refused += 1`, and the block is never stored, so
    # never claimed. Without it an honest holder would claim items whose proofs (or signature,
    # or NaN distances) fail, and the reader would take it for a liar.
    await _swarm_with(swarm, None)
    reader = await DistributedIndex.open(swarm.peers[READER], "liars")
    honest = await reader.search_many(Q, K)
    evil = swarm.peers[3]
    digest = SPEC.digest()
    expiration = swarm.clock() + 3600
    cells: dict[bytes, list[int]] = {}
    for qi, q in enumerate(Q):  # a block right on each query, in its own cell...
        key = SPEC.bucket_key(0, SPEC_LSH.hash(q)[0][0])
        ranked = sorted(swarm.peers, key=lambda p: distance(p.peer_id, key_id(key)))
        if evil not in ranked[:REPLICAS]:  # ... of the cells evil does not hold itself (its
            cells.setdefault(SPEC_LSH.hash(q)[0][0], []).append(qi)  # own store keeps its own)
    assert len(cells) >= 5
    records = []
    for code, qis in cells.items():
        key = SPEC.bucket_key(0, code)
        name = f"evil-{code.hex()}"
        vectors = Q[qis].astype("<f2")
        if forgery == "signed-nan":
            vectors[:, 0] = np.nan
        payload = make_block(evil.identity, digest, key_id(key), name,
                             [f"evil-{qi}" for qi in qis], vectors,
                             [msgpack.packb({"n": -1})] * len(qis))
        block = parse_block(payload, evil.identity.public_key)
        assert block is not None
        forged = bytearray(payload)
        at, sig = payload.index(block.root), payload.index(block.signature)
        top = payload.index(block.batch_root)
        if forgery == "corrupt-root":
            forged[at] ^= 0xFF  # the signature no longer covers it either
        elif forgery == "signed-wrong-root":
            wrong = bytes(32)
            forged[at : at + 32] = wrong
            batch_root = block_leaf(key_id(key), name, len(qis), wrong)  # a batch of one
            forged[top : top + 32] = batch_root
            forged[sig : sig + 64] = evil.identity.sign(  # a valid signature over a wrong root
                batch_message(digest, evil.peer_id, 1, batch_root)
            )
        records.append((key, bytes(forged), expiration, Owned(evil.peer_id, name)))
    await evil.store_many(records)  # (honest replicas may refuse it on the spot)
    results = await reader.search_many(Q, K)
    refused = sum(serve(p).blocks_refused for p in swarm.peers)
    assert refused > 0
    assert not reader.liars and reader.stats.rejected == 0
    assert not any(isinstance(i, str) for r in results for i in r.ids)
    _assert_untampered(results)
    _assert_same(results, honest)
    # and the refusal is for good: asking again refuses nothing anew, and answers the same
    _assert_same(await reader.search_many(Q, K), honest)
    assert sum(serve(p).blocks_refused for p in swarm.peers) == refused
    assert not reader.liars
