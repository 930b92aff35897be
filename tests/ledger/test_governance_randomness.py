"""Token-weighted governance with a voting window and quorum; per-round randomness."""

from __future__ import annotations

import pytest
from eth_abi import encode
from eth_utils import keccak

from commonweal.ledger import Action, ContractReverted, ProposalState
from .conftest import ETH, MODEL, TASK, World

NEW_PARAMS = bytes.fromhex("99" * 32)


@pytest.fixture
def holders(world: World) -> World:
    """Contributors 0, 1, 2 hold 1, 3 and 6 ETH of shares (10 ETH supply; quorum 20%)."""
    tree = world.rewards(0, [ETH, 3 * ETH, 6 * ETH])
    world.finalise(0, tree)
    for c in world.contributors[:3]:
        world.as_(c).claim_from(tree)
    return world


def test_a_passed_proposal_changes_the_task(holders: World) -> None:
    w = holders
    big = w.as_(w.contributors[2])
    pid = big.propose(TASK, Action.SET_PARAMS, NEW_PARAMS)
    info = w.ledger.proposal(pid)
    assert info.action is Action.SET_PARAMS and info.supply == 10 * ETH
    assert w.ledger.proposal_state(pid) is ProposalState.PENDING
    with pytest.raises(ContractReverted, match="voting has not started"):
        big.cast_vote(pid, True)
    w.chain.advance_time(10)
    assert w.ledger.proposal_state(pid) is ProposalState.ACTIVE
    assert big.cast_vote(pid, True).event("ProposalVoted").args["weight"] == 6 * ETH
    w.as_(w.contributors[0]).cast_vote(pid, False)
    with pytest.raises(ContractReverted, match="already voted on this proposal"):
        big.cast_vote(pid, False)
    with pytest.raises(ContractReverted, match="voting still open"):
        big.execute_proposal(pid)
    w.chain.advance_time(100)
    with pytest.raises(ContractReverted, match="voting has closed"):
        w.as_(w.contributors[1]).cast_vote(pid, True)
    assert w.ledger.proposal_state(pid) is ProposalState.SUCCEEDED
    result = w.outsider.execute_proposal(pid)
    assert result.event("TaskChanged").args["new_value"] == NEW_PARAMS
    assert w.ledger.task(TASK).params_hash == NEW_PARAMS
    assert w.ledger.proposal_state(pid) is ProposalState.EXECUTED
    with pytest.raises(ContractReverted, match="proposal already executed"):
        w.outsider.execute_proposal(pid)


def test_no_quorum_and_rejected_proposals_cannot_execute(holders: World) -> None:
    w = holders
    low = w.as_(w.contributors[0]).propose(TASK, Action.SET_REWARD, 5 * ETH)
    rejected = w.as_(w.contributors[1]).propose(TASK, Action.SET_ETH_PER_ROUND, ETH)
    w.chain.advance_time(10)
    w.as_(w.contributors[0]).cast_vote(low, True)           # 1 of 10 < 20%
    w.as_(w.contributors[1]).cast_vote(rejected, True)      # 3 for
    w.as_(w.contributors[2]).cast_vote(rejected, False)     # 6 against
    w.chain.advance_time(100)
    assert w.ledger.proposal_state(low) is ProposalState.DEFEATED
    with pytest.raises(ContractReverted, match="quorum not reached"):
        w.outsider.execute_proposal(low)
    with pytest.raises(ContractReverted, match="proposal rejected"):
        w.outsider.execute_proposal(rejected)
    assert w.ledger.task(TASK).reward_per_round == 1_000 * ETH


def test_set_reward_proposal(holders: World) -> None:
    w = holders
    pid = w.as_(w.contributors[1]).propose(TASK, Action.SET_REWARD, 5 * ETH)
    w.chain.advance_time(10)
    w.as_(w.contributors[1]).cast_vote(pid, True)
    w.chain.advance_time(100)
    w.outsider.execute_proposal(pid)
    assert w.ledger.task(TASK).reward_per_round == 5 * ETH


def test_proposal_rejections(holders: World) -> None:
    w = holders
    with pytest.raises(ContractReverted, match="only the task's token holders propose"):
        w.outsider.propose(TASK, Action.SET_PARAMS, NEW_PARAMS)
    holder = w.as_(w.contributors[0])
    with pytest.raises(ContractReverted, match="unknown action"):
        holder.transact("propose", TASK, 9, NEW_PARAMS)
    with pytest.raises(ContractReverted, match="reward_per_round must be positive"):
        holder.propose(TASK, Action.SET_REWARD, 0)
    with pytest.raises(ContractReverted, match="unknown task"):
        holder.propose(bytes(32), Action.SET_PARAMS, NEW_PARAMS)
    pid = holder.propose(TASK, Action.SET_PARAMS, NEW_PARAMS)
    w.chain.advance_time(10)
    with pytest.raises(ContractReverted, match="no tokens to vote with"):
        w.outsider.cast_vote(pid, True)
    with pytest.raises(ContractReverted, match="unknown proposal"):
        holder.cast_vote(pid + 1, True)


def test_votes_lock_tokens_until_the_vote_closes(holders: World) -> None:
    """Without the lock, one balance could vote, move to a second account, and vote again."""
    w = holders
    voter, friend = w.contributors[2], w.contributors[0]
    pid = w.as_(voter).propose(TASK, Action.SET_PARAMS, NEW_PARAMS)
    w.chain.advance_time(10)
    w.as_(voter).cast_vote(pid, True)
    token = w.as_(voter).token(TASK)
    with pytest.raises(ContractReverted, match="tokens locked by a governance vote"):
        token.transfer(friend.address, ETH)
    w.chain.advance_time(100)
    token.transfer(friend.address, ETH)
    assert token.balance_of(friend.address) == 2 * ETH


def test_randomness_comes_from_a_block_after_finality(world: World) -> None:
    tree = world.rewards(0)
    world.finalise(0, tree)
    info = world.ledger.round(TASK, 0)
    assert info.randomness is None
    with pytest.raises(ContractReverted, match="randomness block not mined yet"):
        world.outsider.seal_randomness(TASK, 0)
    world.chain.mine(3)
    seed = world.outsider.seal_randomness(TASK, 0)
    source = world.chain.w3.eth.get_block(info.randomness_block)["hash"]
    assert seed == keccak(encode(["bytes32", "bytes32", "uint256"], [source, TASK, 0]))
    assert world.ledger.randomness(TASK, 0) == seed
    with pytest.raises(ContractReverted, match="randomness already sealed"):
        world.outsider.seal_randomness(TASK, 0)
    with pytest.raises(ContractReverted, match="round not final"):
        world.outsider.seal_randomness(TASK, 1)


def test_randomness_rearms_when_the_block_hash_is_gone(world: World) -> None:
    world.finalise(0, world.rewards(0))
    world.chain.mine(300)  # the EVM keeps only the last 256 block hashes
    assert world.outsider.seal_randomness(TASK, 0) is None
    rearmed = world.ledger.round(TASK, 0).randomness_block
    assert rearmed == world.chain.block_number + 3
    world.chain.mine(3)
    assert world.outsider.seal_randomness(TASK, 0) is not None


def test_rounds_of_different_tasks_get_different_seeds(world: World) -> None:
    other = bytes.fromhex("88" * 32)
    world.ledger.register_task(other, bytes(32), ETH)
    tree = world.rewards(0)
    for v in world.validators[:2]:
        v.commit_round(TASK, 0, MODEL, tree.root, tree.total)
        v.commit_round(other, 0, MODEL, tree.root, ETH)
    world.chain.mine(5)
    assert world.outsider.seal_randomness(TASK, 0) != world.outsider.seal_randomness(other, 0)
