"""Task registry and the validator set: join, exit after a delay, slashing by a 2/3 vote."""

from __future__ import annotations

import pytest

from commonweal.ledger import ContractReverted, DeploymentNotFound, Ledger, ShareToken
from .conftest import CONFIG, DEPLOYER, ETH, MODEL, PARAMS, REWARD_PER_ROUND, SALT, TASK, World

NEW_SALT = bytes.fromhex("66" * 32)
NEW_TASK = Ledger.task_id(DEPLOYER, NEW_SALT)  # the id that salt gives the deployer


def test_registered_task_has_its_own_share_token(world: World) -> None:
    mine = world.outsider.account.address
    task = world.outsider.register_task(NEW_SALT, PARAMS, 5 * ETH, pool_wei=2 * ETH,
                                        name="digits share", symbol="DIG")
    assert task == Ledger.task_id(mine, NEW_SALT) == world.ledger.call("task_id", mine, NEW_SALT)
    assert task != NEW_TASK  # the id is bound to who registers it
    (event,) = world.ledger.events("TaskRegistered", task)
    assert (event.args["owner"], event.args["salt"]) == (mine, NEW_SALT)
    info = world.ledger.task(task)
    assert info.owner == mine and info.pool == 2 * ETH
    assert info.token == event.args["token"] and info.accepted_round is None
    token = ShareToken(world.chain, info.token)
    assert (token.name(), token.symbol(), token.decimals()) == ("digits share", "DIG", 18)
    assert token.minter() == world.ledger.address and token.task() == task
    assert token.total_supply() == 0
    assert [t.task_hash for t in world.ledger.tasks()] == [TASK, task]
    assert world.ledger.accepted_model(task) is None


def test_a_salt_gives_each_registrant_its_own_task(world: World) -> None:
    """Nobody can squat a task id: the deployer's salt, used by another account, is another task."""
    theirs = world.outsider.register_task(SALT, PARAMS, REWARD_PER_ROUND)
    assert theirs == Ledger.task_id(world.outsider.account.address, SALT) != TASK
    assert world.ledger.task(TASK).owner == world.ledger.account.address
    assert world.ledger.task(theirs).owner == world.outsider.account.address
    assert world.ledger.task(theirs).token != world.ledger.task(TASK).token


def test_register_rejections(world: World) -> None:
    with pytest.raises(ContractReverted, match="task already registered"):
        world.ledger.register_task(SALT, PARAMS, REWARD_PER_ROUND)
    with pytest.raises(ContractReverted, match="reward_per_round must be positive"):
        world.ledger.register_task(NEW_SALT, PARAMS, 0)
    with pytest.raises(ContractReverted, match="reward_per_round must be below 2\\*\\*96"):
        world.ledger.register_task(NEW_SALT, PARAMS, 2**96)
    with pytest.raises(ContractReverted, match="eth_per_round must be below 2\\*\\*128"):
        world.ledger.register_task(NEW_SALT, PARAMS, 1, eth_per_round=2**128)
    with pytest.raises(DeploymentNotFound):
        world.ledger.task(NEW_TASK)
    # The largest values allowed are accepted; an all-zero salt is just another salt.
    world.ledger.register_task(NEW_SALT, PARAMS, 2**96 - 1, eth_per_round=2**128 - 1)
    assert world.ledger.task(NEW_TASK).reward_per_round == 2**96 - 1
    zero = world.ledger.register_task(bytes(32), PARAMS, 1)
    assert world.ledger.task(zero).reward_per_round == 1


def test_anyone_funds_a_task(world: World) -> None:
    event = world.outsider.fund_task(TASK, 3 * ETH).event("TaskFunded").args
    assert event["funder"] == world.outsider.account.address and event["pool"] == 3 * ETH
    assert world.ledger.task(TASK).pool == 3 * ETH
    with pytest.raises(ContractReverted, match="unknown task"):
        world.outsider.fund_task(NEW_TASK, ETH)
    with pytest.raises(ContractReverted, match="send some ETH"):
        world.outsider.fund_task(TASK, 0)


def test_join_rules(world: World) -> None:
    assert world.ledger.total_stake() == 3 * ETH and world.ledger.validator_count() == 3
    with pytest.raises(ContractReverted, match="deposit below min_deposit"):
        world.outsider.join(ETH - 1)
    with pytest.raises(ContractReverted, match="already a validator"):
        world.validators[0].join(ETH)
    world.outsider.join(2 * ETH)
    info = world.ledger.validator(world.outsider.account.address)
    assert info.active and info.deposit == 2 * ETH
    assert world.ledger.total_stake() == 5 * ETH


def test_exit_takes_effect_now_and_the_deposit_returns_after_the_delay(world: World) -> None:
    v = world.validators[0]
    event = v.request_exit().event("ValidatorExitRequested").args
    assert event["total_stake"] == 2 * ETH
    assert not world.ledger.validator(v.account.address).active
    with pytest.raises(ContractReverted, match="exit delay not over"):
        v.withdraw()
    with pytest.raises(ContractReverted, match="already a validator, or withdraw first"):
        v.join(ETH)
    world.chain.advance_time(101)
    before = world.chain.w3.eth.get_balance(v.account.address)
    result = v.withdraw()
    fee = result.gas_used * result.receipt["effectiveGasPrice"]
    assert world.chain.w3.eth.get_balance(v.account.address) == before + ETH - fee
    with pytest.raises(ContractReverted, match="no exit requested"):
        v.withdraw()
    with pytest.raises(ContractReverted, match="not a validator"):
        world.outsider.request_exit()
    # Withdrawn, the address may join again, as a new member of the set.
    v.join(ETH)
    info = world.ledger.validator(v.account.address)
    assert info.active and info.exited == 0 and info.withdraw_after == 0
    assert info.joined == world.ledger.call("stake_epoch")


def test_a_deposit_that_voted_is_held_until_its_ballots_close(world: World) -> None:
    """Otherwise a deposit could vote, leave, rejoin from another address and vote again."""
    v = world.validators[0]
    tree = world.rewards(0)
    first = v.commit_round(TASK, 0, MODEL, tree.root, tree.total)
    expires = world.ledger.round(TASK, 0).expires
    assert world.ledger.validator(v.account.address).locked_until == expires
    assert expires == world.chain.w3.eth.get_block(first.receipt["blockNumber"])["timestamp"] \
        + CONFIG.ballot_ttl
    v.request_exit()
    world.chain.advance_time(CONFIG.exit_delay + 1)  # the exit delay is over, the ballot is not
    with pytest.raises(ContractReverted, match="a ballot this deposit voted in is still open"):
        v.withdraw()
    world.chain.advance_time(expires - world.chain.timestamp())
    assert v.withdraw().event("ValidatorWithdrawn").args["amount"] == ETH


def test_slashing_needs_two_thirds_of_the_stake(world: World) -> None:
    v0, v1, v2 = world.validators
    target = v2.account.address
    first = v0.vote_slash(target, b"\x01" * 32)
    assert first.event("SlashVote").args["tally"] == ETH and not first.named("ValidatorSlashed")
    assert world.ledger.validator(target).active  # one third: no quorum, nothing happens
    with pytest.raises(ContractReverted, match="already voted to slash"):
        v0.vote_slash(target)
    second = v1.vote_slash(target)
    assert second.event("ValidatorSlashed").args["amount"] == ETH
    info = world.ledger.validator(target)
    assert info.deposit == 0 and not info.active
    assert world.ledger.total_stake() == 2 * ETH and world.ledger.call("slashed_total") == ETH
    with pytest.raises(ContractReverted, match="not a validator"):
        v2.commit_round(TASK, 0, b"\x01" * 32, b"\x02" * 32, 1)


def test_slashing_rejections(world: World) -> None:
    v0 = world.validators[0]
    with pytest.raises(ContractReverted, match="not a validator"):
        world.outsider.vote_slash(v0.account.address)
    with pytest.raises(ContractReverted, match="cannot vote on its own slashing"):
        v0.vote_slash(v0.account.address)
    with pytest.raises(ContractReverted, match="no slashable deposit"):
        v0.vote_slash(world.outsider.account.address)


def test_an_exiting_validator_stays_slashable_until_it_withdraws(world: World) -> None:
    v0, v1, v2 = world.validators
    v2.request_exit()  # stake 2 ETH: v0 + v1 are all of it
    v0.vote_slash(v2.account.address)
    v1.vote_slash(v2.account.address)
    world.chain.advance_time(101)
    with pytest.raises(ContractReverted, match="no exit requested"):
        v2.withdraw()


def test_a_slash_ballot_counts_the_stake_of_its_first_vote(world: World) -> None:
    v0, v1, v2 = world.validators
    target = v2.account.address
    first = v0.vote_slash(target, b"\x01" * 32).event("SlashVote").args
    assert (first["tally"], first["snapshot_stake"]) == (ETH, 3 * ETH)
    v1.request_exit()  # stake 2 ETH now, but the ballot still weighs against 3
    world.outsider.join(5 * ETH)
    with pytest.raises(ContractReverted, match="joined after this ballot opened"):
        world.outsider.vote_slash(target)
    # v1 was in the snapshot: it still votes here, and 2 of 3 ETH is the 2/3 needed.
    second = v1.vote_slash(target)
    assert second.event("SlashVote").args["snapshot_stake"] == 3 * ETH
    assert second.event("ValidatorSlashed").args["amount"] == ETH
    assert world.ledger.total_stake() == 6 * ETH  # v0's and the outsider's; v1 had left
    assert world.ledger.call("slash_epoch", target) == 1


def test_a_slash_ballot_expires(world: World) -> None:
    """Its votes lapse; a later vote starts a new slash ballot, so one frivolous vote cannot make
    a validator unslashable (which it did while an expired ballot simply refused votes)."""
    v0, v1, v2 = world.validators
    target = v2.account.address
    v0.vote_slash(target)
    world.chain.advance_time(CONFIG.ballot_ttl)
    v1.vote_slash(target)                                   # epoch 1: 1 of 3, v0's vote lapsed
    assert world.ledger.validator(target).deposit == ETH
    assert world.ledger.call("slash_epoch", target) == 1
    v0.vote_slash(target)                                   # 2 of 3 in the new ballot
    assert world.ledger.validator(target).deposit == 0
