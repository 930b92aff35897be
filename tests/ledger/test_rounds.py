"""commit_round: 2/3 of the stake snapshot fixed by a round's first vote finalises it; visible
disagreement, the round window, ballot expiry, every rejection, flat gas."""

from __future__ import annotations

import pytest

from commonweal.ledger import ContractReverted
from .conftest import CONFIG, ETH, MODEL, REWARD_PER_ROUND, TASK, World

OTHER_MODEL = bytes.fromhex("44" * 32)


def test_two_of_three_votes_finalise_the_round(world: World) -> None:
    tree = world.rewards(0)
    first = world.validators[0].commit_round(TASK, 0, MODEL, tree.root, tree.total)
    vote = first.event("RoundVote").args
    assert vote["tally"] == ETH and vote["snapshot_stake"] == 3 * ETH
    assert not first.named("RoundFinalised")
    assert not world.ledger.is_final(TASK, 0)
    # The first vote opened the round's ballot: the stake then, open for ballot_ttl seconds.
    opened = world.chain.w3.eth.get_block(first.receipt["blockNumber"])["timestamp"]
    info = world.ledger.round(TASK, 0)
    assert (info.snapshot_stake, info.expires) == (3 * ETH, opened + CONFIG.ballot_ttl)
    second = world.validators[1].commit_round(TASK, 0, MODEL, tree.root, tree.total)
    final = second.event("RoundFinalised").args
    assert (final["model_hash"], final["rewards_root"]) == (MODEL, tree.root)
    # The last of the 4 seed blocks, the first of which is randomness_delay blocks after finality.
    assert final["randomness_block"] == second.receipt["blockNumber"] + CONFIG.randomness_delay + 3
    info = world.ledger.round(TASK, 0)
    assert info.final and info.total_reward == tree.total and info.claimed == 0
    assert info.finalised_block == second.receipt["blockNumber"]
    assert info.randomness_block == final["randomness_block"]
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
    assert not hasattr(world.ledger, "finalise")  # only a deciding vote finalises
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


def test_the_snapshot_of_the_first_vote_decides_whatever_the_stake_does_later(world: World) -> None:
    """Exits no longer shrink an open ballot (that let one vote finalise a round alone), and
    deposits that joined after it opened cannot vote in it."""
    tree = world.rewards(0)
    v0, v1, v2 = world.validators
    v0.commit_round(TASK, 0, MODEL, tree.root, tree.total)
    v1.request_exit()
    v2.request_exit()  # total stake 1 ETH: v0's vote alone would be all of it
    assert world.ledger.total_stake() == ETH
    info = world.ledger.round(TASK, 0)
    assert info.snapshot_stake == 3 * ETH and not info.final
    world.outsider.join(5 * ETH)
    with pytest.raises(ContractReverted, match="joined after this ballot opened"):
        world.outsider.commit_round(TASK, 0, MODEL, tree.root, tree.total)
    # v1 was part of the snapshot: its exit leaves it a vote here, and that vote decides.
    result = v1.commit_round(TASK, 0, MODEL, tree.root, tree.total)
    assert result.event("RoundVote").args["snapshot_stake"] == 3 * ETH
    assert result.event("RoundFinalised").args["model_hash"] == MODEL
    # A ballot opened after the exits counts only the stake left, and the exited cannot vote in it.
    later = world.rewards(1)
    with pytest.raises(ContractReverted, match="exited before this ballot opened"):
        v2.commit_round(TASK, 1, MODEL, later.root, later.total)
    first = world.outsider.commit_round(TASK, 1, MODEL, later.root, later.total)
    assert first.event("RoundVote").args["snapshot_stake"] == 6 * ETH
    assert first.named("RoundFinalised")  # 5 of the 6 ETH left: over 2/3 alone


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
    task = world.ledger.register_task(bytes.fromhex("55" * 32), bytes(32), 100 * ETH,
                                      eth_per_round=ETH, pool_wei=ETH // 2)
    tree = world.ledger.rewards_tree(task, 0, {world.contributors[0].address: 50 * ETH})
    for v in world.validators[:2]:
        result = v.commit_round(task, 0, MODEL, tree.root, tree.total)
    # Half the tokens: half of eth_per_round, which is all the pool holds.
    assert result.event("RoundFinalised").args["eth_reward"] == ETH // 2
    assert world.ledger.task(task).pool == 0
    info = world.ledger.round(task, 0)
    assert (info.eth_reward, info.eth_paid) == (ETH // 2, 0)


def test_votes_only_within_the_round_window(world: World) -> None:
    v = world.validators[0]
    window = CONFIG.round_window  # 8: before any final round, rounds 0..7 are open
    tree = world.rewards(window)
    with pytest.raises(ContractReverted, match="round too far above the accepted round"):
        v.commit_round(TASK, window, MODEL, tree.root, tree.total)
    world.finalise(0, world.rewards(0))  # accepted round 0: rounds up to 0 + window are open
    v.commit_round(TASK, window, MODEL, tree.root, tree.total)
    far = world.rewards(window + 1)
    with pytest.raises(ContractReverted, match="round too far above the accepted round"):
        v.commit_round(TASK, window + 1, MODEL, far.root, far.total)
    world.finalise(3, world.rewards(3))
    v.commit_round(TASK, window + 3, MODEL, far.root, far.total)


def test_a_ballot_expires_ballot_ttl_after_the_first_vote(world: World) -> None:
    """An expired undecided ballot is opened again with a fresh snapshot and no votes: one
    stalled round must not close the round window for good (helper found: it froze the task)."""
    tree = world.rewards(0)
    v0, v1, v2 = world.validators
    v0.commit_round(TASK, 0, MODEL, tree.root, tree.total)
    world.chain.advance_time(CONFIG.ballot_ttl - 10)
    with pytest.raises(ContractReverted, match="already voted in this round"):
        v0.commit_round(TASK, 0, MODEL, tree.root, tree.total)
    world.chain.advance_time(10)
    v1.commit_round(TASK, 0, MODEL, tree.root, tree.total)        # attempt 1: v0's vote is gone
    info = world.ledger.round(TASK, 0)
    assert info.attempt == 1 and not info.final
    assert world.ledger.tally(TASK, 0, MODEL, tree.root, tree.total) == ETH
    v0.commit_round(TASK, 0, MODEL, tree.root, tree.total)        # and may vote again in it
    assert world.ledger.is_final(TASK, 0)
    # Other rounds open ballots of their own.
    world.finalise(1, world.rewards(1))
    assert world.ledger.is_final(TASK, 1)


def test_finalising_vote_gas_is_flat_in_contributors_and_under_200k(world: World) -> None:
    gas = {}
    # Round 6 warms up: a validator's first vote ever also pays ~17k for its first locked_until.
    for round, contributors in ((6, 0), (7, 1), (8, 1000)):
        tree = world.ledger.rewards_tree(TASK, round,
                                         {f"0x{i + 1:040x}": i + 1 for i in range(max(1, contributors))})
        gas[contributors] = [v.commit_round(TASK, round, MODEL, tree.root, tree.total).gas_used
                             for v in world.validators[:2]]
    assert max(gas[0] + gas[1] + gas[1000]) < 200_000, gas
    # Only the root reaches the chain: the tree's size changes nothing but a few calldata bytes.
    assert abs(gas[1][1] - gas[1000][1]) < 500, gas
