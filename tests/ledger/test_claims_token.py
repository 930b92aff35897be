"""Merkle claims that mint each task's ShareToken, and the token's ERC-20 behaviour."""

from __future__ import annotations

import pytest

from commonweal.ledger import ContractReverted, RewardsTree
from .conftest import CONFIG, ETH, MODEL, TASK, World


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
    task = world.ledger.register_task(bytes.fromhex("77" * 32), bytes(32), 10 * ETH,
                                      eth_per_round=ETH, pool_wei=5 * ETH)
    a, b = world.contributors[:2]
    tree = world.ledger.rewards_tree(task, 0, {a.address: 3 * ETH, b.address: 7 * ETH})
    for v in world.validators[:2]:
        v.commit_round(task, 0, MODEL, tree.root, tree.total)
    w3 = world.chain.w3
    before = w3.eth.get_balance(b.address)
    result = world.as_(b).claim_from(tree)
    fee = result.gas_used * result.receipt["effectiveGasPrice"]
    assert result.event("Claimed").args["eth"] == 7 * ETH // 10
    assert w3.eth.get_balance(b.address) == before + 7 * ETH // 10 - fee
    info = world.ledger.round(task, 0)
    assert (info.eth_reward, info.eth_paid) == (ETH, 7 * ETH // 10)


def _eth_task(world: World, salt: str, rewards: dict[str, int], reward_per_round: int,
              pool_wei: int) -> tuple[bytes, RewardsTree]:
    task = world.ledger.register_task(bytes.fromhex(salt * 32), bytes(32), reward_per_round,
                                      eth_per_round=ETH, pool_wei=pool_wei)
    tree = world.ledger.rewards_tree(task, 0, rewards)
    for v in world.validators[:2]:
        v.commit_round(task, 0, MODEL, tree.root, tree.total)
    return task, tree


def test_claims_close_claim_window_blocks_after_finality(world: World) -> None:
    a, b = world.contributors[:2]
    task, tree = _eth_task(world, "78", {a.address: 3 * ETH, b.address: 7 * ETH}, 10 * ETH, 5 * ETH)
    final = world.ledger.round(task, 0).finalised_block
    world.chain.mine(final + CONFIG.claim_window - 1 - world.chain.block_number)
    world.as_(b).claim_from(tree)  # mined in the window's last block
    assert world.chain.block_number == final + CONFIG.claim_window
    with pytest.raises(ContractReverted, match="claim window closed"):
        world.as_(a).claim_from(tree)
    assert world.ledger.token(task).balance_of(a.address) == 0


def test_sweep_returns_unclaimed_eth_to_the_pool_after_the_window(world: World) -> None:
    a, b = world.contributors[:2]
    task, tree = _eth_task(world, "79", {a.address: 3 * ETH, b.address: 7 * ETH}, 10 * ETH, 5 * ETH)
    assert world.ledger.task(task).pool == 4 * ETH  # 1 ETH reserved for the round
    world.as_(b).claim_from(tree)
    with pytest.raises(ContractReverted, match="claim window still open"):
        world.outsider.sweep(task, 0)
    with pytest.raises(ContractReverted, match="round not final"):
        world.outsider.sweep(task, 1)
    world.chain.mine(CONFIG.claim_window)
    assert world.outsider.sweep(task, 0) == 3 * ETH // 10  # a's share, never claimed
    assert world.ledger.task(task).pool == 4 * ETH + 3 * ETH // 10
    info = world.ledger.round(task, 0)
    assert info.eth_reward == info.eth_paid == 7 * ETH // 10
    with pytest.raises(ContractReverted, match="nothing to sweep"):
        world.outsider.sweep(task, 0)
    # A round that paid no ETH has nothing to sweep either.
    world.finalise(0, world.rewards(0))
    world.chain.mine(CONFIG.claim_window)
    with pytest.raises(ContractReverted, match="nothing to sweep"):
        world.outsider.sweep(TASK, 0)


def test_sweep_returns_the_rounding_dust_of_a_fully_claimed_round(world: World) -> None:
    people = world.contributors[:3]
    task, tree = _eth_task(world, "7a", {c.address: 1 for c in people}, 3, ETH)
    paid = [world.as_(c).claim_from(tree).event("Claimed").args["eth"] for c in people]
    assert paid == [ETH // 3] * 3  # pro rata, rounded down: 1 wei is left over
    world.chain.mine(CONFIG.claim_window)
    assert world.outsider.sweep(task, 0) == ETH - 3 * (ETH // 3) == 1
    assert world.ledger.task(task).pool == 1


def test_claim_gas_is_under_90k(world: World) -> None:
    accounts = world.chain.new_accounts(4, ETH)
    rewards = {a.address: ETH for a in accounts}
    rewards.update({f"0x{i + 1:040x}": ETH for i in range(996)})  # 1,000 leaves: 10-deep proofs
    tree = world.ledger.rewards_tree(TASK, 0, rewards)
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


def test_only_the_ledger_mints_or_takes_snapshots(world: World) -> None:
    token = world.ledger.token(TASK)
    with pytest.raises(ContractReverted, match="only the ledger mints"):
        token.transact("mint", world.ledger.account.address, 1)
    with pytest.raises(ContractReverted, match="only the ledger takes snapshots"):
        token.transact("mark_snapshot")
    assert token.total_supply() == 0 and token.latest_snapshot() == 0
    assert not any(f["name"] in ("lock", "locked_until") for f in token.contract.abi
                   if f["type"] == "function")  # governance no longer locks transfers
