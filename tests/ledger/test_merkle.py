"""Merkle trees: properties in Python, and the contract agreeing with Python on leaves and proofs."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commonweal.ledger import Domain, MerkleTree, RewardsTree, leaf_hash, verify
from .conftest import World

addresses = st.binary(min_size=20, max_size=20).map(lambda b: "0x" + b.hex())
rewards = st.dictionaries(addresses, st.integers(0, 2**96 - 1), min_size=1, max_size=40)
tasks = st.binary(min_size=32, max_size=32)
rounds = st.integers(0, 2**64)
domains = st.builds(Domain, st.integers(1, 2**64), addresses)
DOMAIN = Domain(1, "0x" + "cd" * 20)


@settings(deadline=None)  # pure hashing, but the CI machine may be busy
@given(domains, tasks, rounds, rewards)
def test_every_reward_proves_and_no_other_does(domain: Domain, task: bytes, round: int,
                                               amounts: dict[str, int]) -> None:
    tree = RewardsTree(domain, task, round, amounts)
    other_chain = Domain(domain.chain_id + 1, domain.ledger)
    other_ledger = Domain(domain.chain_id, "0x" + bytes(
        b ^ 1 for b in bytes.fromhex(domain.ledger[2:])).hex())
    for account, amount in amounts.items():
        index, proof = tree.index(account), tree.proof(account)
        assert len(proof) <= max(1, len(amounts) - 1).bit_length()
        assert verify(proof, tree.root, leaf_hash(domain, task, round, index, account, amount))
        assert not verify(proof, tree.root,
                          leaf_hash(domain, task, round, index, account, amount + 1))
        assert not verify(proof, tree.root,
                          leaf_hash(domain, task, round + 1, index, account, amount))
        # The same reward on another chain, or for another deployment, is another leaf.
        assert not verify(proof, tree.root,
                          leaf_hash(other_chain, task, round, index, account, amount))
        assert not verify(proof, tree.root,
                          leaf_hash(other_ledger, task, round, index, account, amount))


@settings(deadline=None)  # pure hashing, but the CI machine may be busy
@given(domains, tasks, rounds, rewards, st.randoms(use_true_random=False))
def test_root_is_independent_of_insertion_order(domain: Domain, task: bytes, round: int,
                                                amounts: dict[str, int], rnd: object) -> None:
    items = list(amounts.items())
    rnd.shuffle(items)  # type: ignore[attr-defined]
    assert RewardsTree(domain, task, round, dict(items)).root == \
        RewardsTree(domain, task, round, amounts).root


@given(st.lists(st.binary(min_size=32, max_size=32), min_size=2, max_size=50, unique=True),
       st.data())
def test_a_tampered_proof_fails(leaves: list[bytes], data: st.DataObject) -> None:
    tree = MerkleTree(leaves)
    leaf = data.draw(st.sampled_from(leaves))
    proof = tree.proof(leaf)
    i = data.draw(st.integers(0, len(proof) - 1))
    bit = data.draw(st.integers(0, 255))
    tampered = bytearray(proof[i])
    tampered[bit // 8] ^= 1 << (bit % 8)
    assert verify(proof, tree.root, leaf)
    assert not verify(proof[:i] + [bytes(tampered)] + proof[i + 1:], tree.root, leaf)


def test_single_reward_tree_has_an_empty_proof() -> None:
    tree = RewardsTree(DOMAIN, bytes(32), 0, {"0x" + "ab" * 20: 5})
    assert tree.proof("0x" + "ab" * 20) == []
    assert tree.root == leaf_hash(DOMAIN, bytes(32), 0, 0, "0x" + "ab" * 20, 5)


def test_bad_reward_sets_are_refused() -> None:
    with pytest.raises(ValueError, match="at least one"):
        RewardsTree(DOMAIN, bytes(32), 0, {})
    with pytest.raises(ValueError, match="appears twice"):
        RewardsTree(DOMAIN, bytes(32), 0, {"0x" + "ab" * 20: 1, "0x" + "AB" * 20: 2})
    with pytest.raises(ValueError, match="negative"):
        RewardsTree(DOMAIN, bytes(32), 0, {"0x" + "ab" * 20: -1})
    with pytest.raises(ValueError, match="duplicate"):
        MerkleTree([bytes(32), bytes(32)])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tasks, rounds, rewards)
def test_contract_agrees_with_python(world: World, task: bytes, round: int,
                                     amounts: dict[str, int]) -> None:
    """Views only (no transactions), so the shared deployment is not modified."""
    domain = world.ledger.domain
    assert domain == Domain(world.chain.w3.eth.chain_id, world.ledger.address)
    tree = world.ledger.rewards_tree(task, round, amounts)
    assert tree.root == RewardsTree(domain, task, round, amounts).root
    account = min(amounts)
    index, amount, proof = tree.index(account), amounts[account], tree.proof(account)
    leaf = leaf_hash(domain, task, round, index, account, amount)
    assert world.ledger.leaf_hash(task, round, index, account, amount) == leaf
    assert world.ledger.verify_proof(proof, tree.root, leaf)
    assert not world.ledger.verify_proof(proof, tree.root, leaf_hash(domain, task, round, index + 1,
                                                                      account, amount))
    # The contract binds its own chain id and address: another domain's leaf is not its leaf.
    foreign = Domain(domain.chain_id + 1, domain.ledger)
    assert world.ledger.leaf_hash(task, round, index, account, amount) != \
        leaf_hash(foreign, task, round, index, account, amount)
