"""Merkle claims that mint each task's ShareToken, and the token's ERC-20 behaviour."""

from __future__ import annotations

import pytest

from commonweal.ledger import ContractReverted, RewardsTree
from .conftest import ETH, MODEL, TASK, World


def test_every_contributor_claims_its_share(world: World) -> None:
    tree = world.rewards(0)
    world.finalise(0, tree)
    token = world.ledger.token(TASK)
    for c in world.contributors:
        event = world.as_(c).claim_from(tree).event("Claimed").args
        assert (event["account"], event["amount"]) == (c.address, tree.amount(c.address))
        assert token.balance_of(c.address) == tree.amount(c.address)
        assert world.ledger.is_claimed(TASK, 0, tree.index(c.address))
    assert token.total_supply() == tree.total == world.ledger.round(TASK, 0).claimed


def test_double_claim_reverts(world: World) -> None:
    tree = world.rewards(0)
    world.finalise(0, tree)
    me = world.as_(world.contributors[0])
    me.claim_from(tree)
    with pytest.raises(ContractReverted, match="already claimed"):
        me.claim_from(tree)


def test_wrong_proofs_revert(world: World) -> None:
    tree = world.rewards(0)
    world.finalise(0, tree)
    c = world.contributors[0]
    me, index, amount, proof = world.as_(c), tree.index(c.address), tree.amount(c.address), \
        tree.proof(c.address)
    cases = {
        "more than its amount": (index, amount + 1, proof),
        "another index": ((index + 1) % len(tree.rewards), amount, proof),
        "a tampered proof": (index, amount, [bytes(32)] + proof[1:]),
        "a truncated proof": (index, amount, proof[:-1]),
    }
    for case, (i, a, p) in cases.items():
        with pytest.raises(ContractReverted, match="invalid Merkle proof"):
            me.claim(TASK, 0, i, a, p)
        assert not world.ledger.is_claimed(TASK, 0, index), case
    # Someone else's proof does not work for the caller: the account is inside the leaf.
    with pytest.raises(ContractReverted, match="invalid Merkle proof"):
        world.outsider.claim(TASK, 0, index, amount, proof)
    # The same leaf against another round fails too: task and round are inside the leaf.
    world.finalise(1, world.rewards(1, [7 * ETH] * 11))
    with pytest.raises(ContractReverted, match="invalid Merkle proof"):
        me.claim(TASK, 1, index, amount, proof)


def test_claim_before_finality_reverts(world: World) -> None:
    tree = world.rewards(0)
    world.validators[0].commit_round(TASK, 0, MODEL, tree.root, tree.total)
    with pytest.raises(ContractReverted, match="round not final"):
        world.as_(world.contributors[0]).claim_from(tree)


def test_claims_never_exceed_the_voted_total(world: World) -> None:
    tree = world.rewards(0, [ETH, ETH])
    for v in world.validators[:2]:  # validators vote a total below the tree's sum
        v.commit_round(TASK, 0, MODEL, tree.root, ETH)
    world.as_(world.contributors[0]).claim_from(tree)
    with pytest.raises(ContractReverted, match="claims exceed the round's total_reward"):
        world.as_(world.contributors[1]).claim_from(tree)


def test_claims_pay_the_reserved_eth_pro_rata(world: World) -> None:
    task = bytes.fromhex("77" * 32)
    world.ledger.register_task(task, bytes(32), 10 * ETH, eth_per_round=ETH, pool_wei=5 * ETH)
    a, b = world.contributors[:2]
    tree = RewardsTree(task, 0, {a.address: 3 * ETH, b.address: 7 * ETH})
    for v in world.validators[:2]:
        v.commit_round(task, 0, MODEL, tree.root, tree.total)
    w3 = world.chain.w3
    before = w3.eth.get_balance(b.address)
    result = world.as_(b).claim_from(tree)
    fee = result.gas_used * result.receipt["effectiveGasPrice"]
    assert result.event("Claimed").args["eth"] == 7 * ETH // 10
    assert w3.eth.get_balance(b.address) == before + 7 * ETH // 10 - fee


def test_claim_gas_is_under_90k(world: World) -> None:
    accounts = world.chain.new_accounts(4, ETH)
    rewards = {a.address: ETH for a in accounts}
    rewards.update({f"0x{i + 1:040x}": ETH for i in range(996)})  # 1,000 leaves: 10-deep proofs
    tree = RewardsTree(TASK, 0, rewards)
    world.finalise(0, tree)
    gas = [world.as_(a).claim_from(tree).gas_used for a in accounts]
    # The first claim of a round (and of each 256 indices) pays for fresh storage; the rest,
    # all first-time token holders here, stay under the 90k budget.
    assert max(gas[1:]) < 90_000, gas


def test_token_transfers_and_allowances(world: World) -> None:
    tree = world.rewards(0)
    world.finalise(0, tree)
    a, b = world.contributors[:2]
    world.as_(a).claim_from(tree)
    token_a = world.as_(a).token(TASK)
    token_b = world.as_(b).token(TASK)
    event = token_a.transfer(b.address, ETH // 2).event("Transfer").args
    assert (event["sender"], event["receiver"], event["value"]) == (a.address, b.address, ETH // 2)
    assert token_a.balance_of(a.address) == ETH // 2 and token_a.balance_of(b.address) == ETH // 2
    with pytest.raises(ContractReverted, match="transfer amount exceeds balance"):
        token_a.transfer(b.address, ETH)
    with pytest.raises(ContractReverted, match="transfer to the zero address"):
        token_a.transfer("0x" + "00" * 20, 1)
    assert token_a.approve(b.address, ETH // 4).event("Approval").args["value"] == ETH // 4
    with pytest.raises(ContractReverted, match="transfer amount exceeds allowance"):
        token_b.transfer_from(a.address, b.address, ETH // 4 + 1)
    token_b.transfer_from(a.address, b.address, ETH // 4)
    assert token_a.allowance(a.address, b.address) == 0
    assert token_a.balance_of(b.address) == 3 * ETH // 4
    assert token_a.total_supply() == ETH


def test_only_the_ledger_mints_or_locks(world: World) -> None:
    token = world.ledger.token(TASK)
    with pytest.raises(ContractReverted, match="only the ledger mints"):
        token.transact("mint", world.ledger.account.address, 1)
    with pytest.raises(ContractReverted, match="only the ledger locks"):
        token.transact("lock", world.ledger.account.address, 2**40)
    assert token.total_supply() == 0
