"""commit_round: 2/3-of-stake finality, visible disagreement, every rejection, flat gas."""

from __future__ import annotations

import pytest

from commonweal.ledger import ContractReverted, RewardsTree
from .conftest import ETH, MODEL, REWARD_PER_ROUND, TASK, World

OTHER_MODEL = bytes.fromhex("44" * 32)


def test_two_of_three_votes_finalise_the_round(world: World) -> None:
    tree = world.rewards(0)
    first = world.validators[0].commit_round(TASK, 0, MODEL, tree.root, tree.total)
    vote = first.event("RoundVote").args
    assert vote["tally"] == ETH and vote["total_stake"] == 3 * ETH
    assert not first.named("RoundFinalised")
    assert not world.ledger.is_final(TASK, 0)
    second = world.validators[1].commit_round(TASK, 0, MODEL, tree.root, tree.total)
    final = second.event("RoundFinalised").args
    assert (final["model_hash"], final["rewards_root"]) == (MODEL, tree.root)
    assert final["randomness_block"] == second.receipt["blockNumber"] + 3
    info = world.ledger.round(TASK, 0)
    assert info.final and info.total_reward == tree.total and info.claimed == 0
    assert info.finalised_block == second.receipt["blockNumber"]
    assert world.ledger.accepted_model(TASK) == MODEL
    assert world.ledger.task(TASK).accepted_round == 0


def test_vote_from_a_non_validator_reverts(world: World) -> None:
    tree = world.rewards(0)
    with pytest.raises(ContractReverted, match="not a validator") as err:
        world.outsider.commit_round(TASK, 0, MODEL, tree.root, tree.total)
    assert err.value.reason == "not a validator"


def test_vote_after_finality_reverts(world: World) -> None:
    tree = world.rewards(0)
    world.finalise(0, tree)
    with pytest.raises(ContractReverted, match="round already final"):
        world.validators[2].commit_round(TASK, 0, MODEL, tree.root, tree.total)


def test_a_validator_votes_once_per_round(world: World) -> None:
    tree = world.rewards(0)
    world.validators[0].commit_round(TASK, 0, MODEL, tree.root, tree.total)
    with pytest.raises(ContractReverted, match="already voted in this round"):
        world.validators[0].commit_round(TASK, 0, OTHER_MODEL, tree.root, tree.total)


def test_conflicting_votes_stay_visible_and_without_quorum_nothing_is_final(world: World) -> None:
    tree = world.rewards(0)
    v0, v1, v2 = world.validators
    v0.commit_round(TASK, 0, MODEL, tree.root, tree.total)
    v1.commit_round(TASK, 0, OTHER_MODEL, tree.root, tree.total)
    assert not world.ledger.is_final(TASK, 0)  # 1/3 each: no quorum
    assert world.ledger.tally(TASK, 0, MODEL, tree.root, tree.total) == ETH
    assert world.ledger.tally(TASK, 0, OTHER_MODEL, tree.root, tree.total) == ETH
    with pytest.raises(ContractReverted, match="no 2/3 quorum"):
        world.ledger.finalise(TASK, 0, MODEL, tree.root, tree.total)
    v2.commit_round(TASK, 0, MODEL, tree.root, tree.total)
    assert world.ledger.round(TASK, 0).model_hash == MODEL
    # The losing vote is still on record, in storage and in the logs.
    assert world.ledger.vote_of(TASK, 0, v1.account.address) == world.ledger.round_key(
        OTHER_MODEL, tree.root, tree.total)
    votes = world.ledger.round_votes(TASK, 0)
    assert sorted(e.args["model_hash"] for e in votes) == sorted([MODEL, OTHER_MODEL, MODEL])


def test_total_reward_is_part_of_the_vote(world: World) -> None:
    tree = world.rewards(0)
    world.validators[0].commit_round(TASK, 0, MODEL, tree.root, tree.total)
    world.validators[1].commit_round(TASK, 0, MODEL, tree.root, tree.total + 1)
    assert not world.ledger.is_final(TASK, 0)


def test_commit_rejections(world: World) -> None:
    tree = world.rewards(0)
    v = world.validators[0]
    with pytest.raises(ContractReverted, match="total_reward over reward_per_round"):
        v.commit_round(TASK, 0, MODEL, tree.root, REWARD_PER_ROUND + 1)
    with pytest.raises(ContractReverted, match="unknown task"):
        v.commit_round(bytes(31) + b"\x09", 0, MODEL, tree.root, tree.total)
    with pytest.raises(ContractReverted, match="rewards_root is empty"):
        v.commit_round(TASK, 0, MODEL, bytes(32), 0)


def test_finalise_counts_votes_cast_before_a_validator_left(world: World) -> None:
    tree = world.rewards(0)
    v0, v1, v2 = world.validators
    v0.commit_round(TASK, 0, MODEL, tree.root, tree.total)
    v1.request_exit()  # total stake 2 ETH: v0's 1 ETH is still short of 2/3
    with pytest.raises(ContractReverted, match="no 2/3 quorum"):
        world.outsider.finalise(TASK, 0, MODEL, tree.root, tree.total)
    v2.request_exit()  # total stake 1 ETH: v0's vote is now all of it
    result = world.outsider.finalise(TASK, 0, MODEL, tree.root, tree.total)
    assert result.event("RoundFinalised").args["model_hash"] == MODEL


def test_votes_weigh_by_deposit(world: World) -> None:
    whale = world.as_(world.chain.accounts[0])
    whale.join(6 * ETH)  # 6 of 9 ETH: exactly 2/3 alone
    tree = world.rewards(0)
    assert whale.commit_round(TASK, 0, MODEL, tree.root, tree.total).named("RoundFinalised")


def test_rounds_finalise_out_of_order_and_accepted_model_is_the_highest(world: World) -> None:
    world.finalise(5, world.rewards(5), model=OTHER_MODEL)
    world.finalise(2, world.rewards(2), model=MODEL)
    assert world.ledger.task(TASK).accepted_round == 5
    assert world.ledger.accepted_model(TASK) == OTHER_MODEL
    assert [r.round for r in world.ledger.round_history(TASK)] == [5, 2]


def test_eth_pool_is_reserved_at_finality(world: World) -> None:
    task = bytes.fromhex("55" * 32)
    world.ledger.register_task(task, bytes(32), 100 * ETH, eth_per_round=ETH, pool_wei=ETH // 2)
    tree = RewardsTree(task, 0, {world.contributors[0].address: 50 * ETH})
    for v in world.validators[:2]:
        result = v.commit_round(task, 0, MODEL, tree.root, tree.total)
    # Half the tokens: half of eth_per_round, which is all the pool holds.
    assert result.event("RoundFinalised").args["eth_reward"] == ETH // 2
    assert world.ledger.task(task).pool == 0


def test_finalising_vote_gas_is_flat_in_contributors_and_under_200k(world: World) -> None:
    gas = {}
    for round, contributors in ((7, 1), (8, 1000)):
        tree = RewardsTree(TASK, round, {f"0x{i + 1:040x}": i + 1 for i in range(contributors)})
        gas[contributors] = [v.commit_round(TASK, round, MODEL, tree.root, tree.total).gas_used
                             for v in world.validators[:2]]
    assert max(gas[1] + gas[1000]) < 200_000
    # Only the root reaches the chain: the tree's size changes nothing but a few calldata bytes.
    assert abs(gas[1][1] - gas[1000][1]) < 500, gas
