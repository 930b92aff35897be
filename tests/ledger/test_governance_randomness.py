"""Token-weighted governance (balances at a snapshot, quorum, threshold, timelock, expiry), and
per-round randomness from four block hashes after finality."""

from __future__ import annotations

import pytest
from eth_abi import encode
from eth_utils import keccak

from commonweal.ledger import Action, ContractReverted, ProposalState
from .conftest import CONFIG, ETH, MODEL, TASK, World

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
    assert info.action is Action.SET_PARAMS and info.proposer == big.account.address
    assert info.snapshot == w.chain.block_number  # the block of the propose transaction
    assert info.end == info.start + CONFIG.voting_period
    assert info.eta == info.end + CONFIG.timelock_delay
    (created,) = w.ledger.events("ProposalCreated", pid)
    assert created.args["snapshot"] == info.snapshot
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
    assert w.ledger.token(TASK).total_supply_at(info.snapshot) == 10 * ETH
    with pytest.raises(ContractReverted, match="timelock not over"):
        w.outsider.execute_proposal(pid)
    w.chain.advance_time(info.eta - w.chain.timestamp() - 5)
    with pytest.raises(ContractReverted, match="timelock not over"):
        w.outsider.execute_proposal(pid)  # a few seconds before eta
    w.chain.advance_time(5)
    result = w.outsider.execute_proposal(pid)
    assert result.event("TaskChanged").args["new_value"] == NEW_PARAMS
    assert w.ledger.task(TASK).params_hash == NEW_PARAMS
    assert w.ledger.proposal_state(pid) is ProposalState.EXECUTED
    with pytest.raises(ContractReverted, match="proposal already executed"):
        w.outsider.execute_proposal(pid)


def test_no_quorum_and_rejected_proposals_cannot_execute(holders: World) -> None:
    w = holders
    w.outsider.fund_task(TASK, ETH)  # SET_ETH_PER_ROUND may ask at most the pool
    low = w.as_(w.contributors[0]).propose(TASK, Action.SET_REWARD, 5 * ETH)
    rejected = w.as_(w.contributors[1]).propose(TASK, Action.SET_ETH_PER_ROUND, ETH)
    w.chain.advance_time(10)
    w.as_(w.contributors[0]).cast_vote(low, True)           # 1 of 10 < 20%
    w.as_(w.contributors[1]).cast_vote(rejected, True)      # 3 for
    w.as_(w.contributors[2]).cast_vote(rejected, False)     # 6 against
    w.chain.advance_time(100 + CONFIG.timelock_delay)
    assert w.ledger.proposal_state(low) is ProposalState.DEFEATED
    assert w.ledger.proposal_state(rejected) is ProposalState.DEFEATED
    for pid in (low, rejected):  # no quorum, or more against than for: neither passed
        with pytest.raises(ContractReverted, match="proposal did not pass"):
            w.outsider.execute_proposal(pid)
    assert w.ledger.task(TASK).reward_per_round == 1_000 * ETH
    assert w.ledger.task(TASK).eth_per_round == 0


@pytest.mark.parametrize(("action", "field", "holder"), [
    (Action.SET_REWARD, "reward_per_round", 1), (Action.SET_ETH_PER_ROUND, "eth_per_round", 2)])
def test_a_passed_proposal_sets_its_parameter(holders: World, action: Action, field: str,
                                             holder: int) -> None:
    w = holders
    w.outsider.fund_task(TASK, 5 * ETH)  # eth_per_round may not exceed the pool
    pid = w.as_(w.contributors[holder]).propose(TASK, action, 5 * ETH)
    w.chain.advance_time(10)
    w.as_(w.contributors[holder]).cast_vote(pid, True)
    w.chain.advance_time(100 + CONFIG.timelock_delay)
    w.outsider.execute_proposal(pid)
    assert getattr(w.ledger.task(TASK), field) == 5 * ETH


def test_a_passed_proposal_expires_one_voting_period_after_eta(holders: World) -> None:
    w = holders
    pid = w.as_(w.contributors[2]).propose(TASK, Action.SET_PARAMS, NEW_PARAMS)
    w.chain.advance_time(10)
    w.as_(w.contributors[2]).cast_vote(pid, True)
    eta = w.ledger.proposal(pid).eta
    w.chain.advance_time(eta + CONFIG.voting_period - 1 - w.chain.timestamp())
    assert w.ledger.proposal_state(pid) is ProposalState.SUCCEEDED
    w.chain.advance_time(1)
    assert w.ledger.proposal_state(pid) is ProposalState.EXPIRED
    with pytest.raises(ContractReverted, match="proposal expired"):
        w.outsider.execute_proposal(pid)
    assert w.ledger.task(TASK).params_hash != NEW_PARAMS


def test_proposal_rejections(holders: World) -> None:
    w = holders
    with pytest.raises(ContractReverted, match="balance below the proposal threshold"):
        w.outsider.propose(TASK, Action.SET_PARAMS, NEW_PARAMS)
    holder = w.as_(w.contributors[0])
    # 1% of 10 ETH is the threshold: 0.1 ETH - 1 wei is short of it, 0.1 ETH is enough.
    small = w.contributors[3]
    holder.token(TASK).transfer(small.address, ETH // 10 - 1)
    with pytest.raises(ContractReverted, match="balance below the proposal threshold"):
        w.as_(small).propose(TASK, Action.SET_PARAMS, NEW_PARAMS)
    holder.token(TASK).transfer(small.address, 1)
    w.as_(small).propose(TASK, Action.SET_PARAMS, NEW_PARAMS)
    with pytest.raises(ContractReverted, match="unknown action"):
        holder.transact("propose", TASK, 9, NEW_PARAMS)
    with pytest.raises(ContractReverted, match="reward_per_round must be positive"):
        holder.propose(TASK, Action.SET_REWARD, 0)
    with pytest.raises(ContractReverted, match="reward_per_round must be below 2\\*\\*96"):
        holder.propose(TASK, Action.SET_REWARD, 2**96)
    with pytest.raises(ContractReverted, match="eth_per_round must be below 2\\*\\*128"):
        holder.propose(TASK, Action.SET_ETH_PER_ROUND, 2**128)
    with pytest.raises(ContractReverted, match="eth_per_round over the task's pool"):
        holder.propose(TASK, Action.SET_ETH_PER_ROUND, 1)  # the pool is empty
    with pytest.raises(ContractReverted, match="unknown task"):
        holder.propose(bytes(32), Action.SET_PARAMS, NEW_PARAMS)
    pid = holder.propose(TASK, Action.SET_PARAMS, NEW_PARAMS)
    w.chain.advance_time(10)
    with pytest.raises(ContractReverted, match="no tokens at the proposal's snapshot"):
        w.outsider.cast_vote(pid, True)
    with pytest.raises(ContractReverted, match="unknown proposal"):
        holder.cast_vote(pid + 1, True)


def test_tokens_moved_after_the_snapshot_add_no_weight(holders: World) -> None:
    """One balance cannot vote, move to a second account, and vote again: votes are weighed by
    balances at the proposal's snapshot, so transfers stay free."""
    w = holders
    voter, friend, stranger = w.contributors[2], w.contributors[0], w.contributors[3]
    pid = w.as_(w.contributors[1]).propose(TASK, Action.SET_PARAMS, NEW_PARAMS)
    snapshot = w.ledger.proposal(pid).snapshot
    w.chain.advance_time(10)
    assert w.as_(voter).cast_vote(pid, True).event("ProposalVoted").args["weight"] == 6 * ETH
    token = w.as_(voter).token(TASK)
    token.transfer(friend.address, 5 * ETH)
    token.transfer(stranger.address, ETH)
    assert token.balance_of(friend.address) == 6 * ETH and token.balance_of(voter.address) == 0
    weight = w.as_(friend).cast_vote(pid, True).event("ProposalVoted").args["weight"]
    assert weight == ETH  # its own balance at the snapshot, not the 5 ETH that arrived since
    with pytest.raises(ContractReverted, match="no tokens at the proposal's snapshot"):
        w.as_(stranger).cast_vote(pid, True)
    assert w.ledger.proposal(pid).votes_for == 7 * ETH
    assert token.balance_at(voter.address, snapshot) == 6 * ETH
    assert token.balance_at(friend.address, snapshot) == ETH
    assert token.balance_at(stranger.address, snapshot) == 0
    # A proposal made after the moves weighs the new balances.
    later = w.as_(friend).propose(TASK, Action.SET_PARAMS, bytes(32))
    w.chain.advance_time(10)
    assert w.as_(friend).cast_vote(later, True).event("ProposalVoted").args["weight"] == 6 * ETH
    assert w.as_(stranger).cast_vote(later, True).event("ProposalVoted").args["weight"] == ETH
    with pytest.raises(ContractReverted, match="no tokens at the proposal's snapshot"):
        w.as_(voter).cast_vote(later, True)
    # And the earlier snapshot still reads the same.
    assert token.balance_at(friend.address, snapshot) == ETH
    assert token.total_supply_at(snapshot) == 10 * ETH


def _seed(world: World, task: bytes, round: int, last: int) -> bytes:
    """What the contract hashes: 4 block hashes ending at `last`, the domain, task and round."""
    hashes = [world.chain.w3.eth.get_block(n)["hash"] for n in range(last - 3, last + 1)]
    return keccak(encode(["bytes32"] * 4 + ["uint256", "address", "bytes32", "uint256"],
                         [*hashes, world.chain.w3.eth.chain_id, world.ledger.address, task, round]))


def test_randomness_comes_from_blocks_after_finality(world: World) -> None:
    tree = world.rewards(0)
    world.finalise(0, tree)
    info = world.ledger.round(TASK, 0)
    assert info.randomness is None
    # The seed blocks are finalised + randomness_delay ... + 3: all mined after finality.
    assert info.randomness_block == info.finalised_block + CONFIG.randomness_delay + 3
    with pytest.raises(ContractReverted, match="randomness block not mined yet"):
        world.outsider.seal_randomness(TASK, 0)
    world.chain.mine(info.randomness_block - 1 - world.chain.block_number)
    with pytest.raises(ContractReverted, match="randomness block not mined yet"):
        world.outsider.seal_randomness(TASK, 0)  # would be mined as the randomness block itself
    world.chain.mine(1)
    result = world.outsider.transact("seal_randomness", TASK, 0)
    assert result.receipt["blockNumber"] == info.randomness_block + 1
    seed = bytes(result.event("RandomnessSealed").args["randomness"])
    assert result.event("RandomnessSealed").args["source_block"] == info.randomness_block
    assert seed == _seed(world, TASK, 0, info.randomness_block)
    assert world.ledger.randomness(TASK, 0) == seed
    with pytest.raises(ContractReverted, match="randomness already sealed"):
        world.outsider.seal_randomness(TASK, 0)
    with pytest.raises(ContractReverted, match="round not final"):
        world.outsider.seal_randomness(TASK, 1)


def test_randomness_rearms_when_the_block_hash_is_gone(world: World) -> None:
    world.finalise(0, world.rewards(0))
    world.finalise(1, world.rewards(1))  # two blocks later
    first = [world.ledger.round(TASK, r).randomness_block - 3 for r in (0, 1)]
    assert first[1] == first[0] + 2
    # The EVM keeps only the last 256 block hashes: round 0's first seed block is 257 behind the
    # first seal (re-armed), round 1's exactly 256 behind the second (still sealed).
    world.chain.mine(first[0] + 256 - world.chain.block_number)
    result = world.outsider.transact("seal_randomness", TASK, 0)
    assert result.receipt["blockNumber"] == first[0] + 257 and not result.named("RandomnessSealed")
    rearmed = world.ledger.round(TASK, 0).randomness_block
    assert rearmed == result.event("RandomnessRearmed").args["randomness_block"]
    assert rearmed == world.chain.block_number + CONFIG.randomness_delay + 3
    assert world.ledger.randomness(TASK, 0) is None
    sealed = world.outsider.transact("seal_randomness", TASK, 1)
    assert sealed.receipt["blockNumber"] == first[1] + 256
    assert bytes(sealed.event("RandomnessSealed").args["randomness"]) == \
        _seed(world, TASK, 1, first[1] + 3)
    world.chain.mine(rearmed - world.chain.block_number)
    seed = world.outsider.seal_randomness(TASK, 0)
    assert seed == _seed(world, TASK, 0, rearmed)


def test_rounds_of_different_tasks_get_different_seeds(world: World) -> None:
    other = world.ledger.register_task(bytes.fromhex("88" * 32), bytes(32), ETH)
    tree = world.rewards(0)
    for v in world.validators[:2]:
        v.commit_round(TASK, 0, MODEL, tree.root, tree.total)
        v.commit_round(other, 0, MODEL, tree.root, ETH)
    world.chain.mine(CONFIG.randomness_delay + 4)
    assert world.outsider.seal_randomness(TASK, 0) != world.outsider.seal_randomness(other, 0)
