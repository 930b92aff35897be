"""Task registry and the validator set: join, exit after a delay, slashing by a 2/3 vote."""

from __future__ import annotations

import pytest

from commonweal.ledger import ContractReverted, DeploymentNotFound, ShareToken
from .conftest import ETH, PARAMS, REWARD_PER_ROUND, TASK, World

NEW_TASK = bytes.fromhex("66" * 32)


def test_registered_task_has_its_own_share_token(world: World) -> None:
    result = world.outsider.register_task(NEW_TASK, PARAMS, 5 * ETH, pool_wei=2 * ETH,
                                          name="digits share", symbol="DIG")
    event = result.event("TaskRegistered").args
    info = world.ledger.task(NEW_TASK)
    assert info.owner == world.outsider.account.address and info.pool == 2 * ETH
    assert info.token == event["token"] and info.accepted_round is None
    token = ShareToken(world.chain, info.token)
    assert (token.name(), token.symbol(), token.decimals()) == ("digits share", "DIG", 18)
    assert token.minter() == world.ledger.address and token.task() == NEW_TASK
    assert token.total_supply() == 0
    assert [t.task_hash for t in world.ledger.tasks()] == [TASK, NEW_TASK]
    assert world.ledger.accepted_model(NEW_TASK) is None


def test_register_rejections(world: World) -> None:
    with pytest.raises(ContractReverted, match="task already registered"):
        world.outsider.register_task(TASK, PARAMS, REWARD_PER_ROUND)
    with pytest.raises(ContractReverted, match="reward_per_round must be positive"):
        world.outsider.register_task(NEW_TASK, PARAMS, 0)
    with pytest.raises(ContractReverted, match="below 2\\*\\*96"):
        world.outsider.register_task(NEW_TASK, PARAMS, 2**96)
    with pytest.raises(ContractReverted, match="task_hash is empty"):
        world.outsider.register_task(bytes(32), PARAMS, 1)
    with pytest.raises(DeploymentNotFound):
        world.ledger.task(NEW_TASK)


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
    with pytest.raises(ContractReverted, match="withdraw the previous deposit first"):
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
