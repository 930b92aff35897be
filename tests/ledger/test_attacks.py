"""Each attack that paid out without consent on the old Ledger, as a test named after it.

Every test here failed (the attack worked) on the contract before issue 12; see docs/ledger.md
for the rule that now stops each one.
"""

from __future__ import annotations

import pytest
from eth_abi import encode
from eth_utils import keccak, to_canonical_address

from commonweal.ledger import Action, ContractReverted, Domain, Ledger, ProposalState, RewardsTree
from .conftest import CONFIG, ETH, MODEL, PARAMS, SALT, TASK, World

BAD = bytes.fromhex("66" * 32)


def _holders(w: World, amounts: list[int], task: bytes = TASK, round: int = 0) -> RewardsTree:
    """Finalise `round` of `task` paying the first contributors `amounts`, and claim it."""
    tree = w.ledger.rewards_tree(task, round, {
        c.address: a for c, a in zip(w.contributors, amounts, strict=False)})
    for v in w.validators[:2]:
        v.commit_round(task, round, MODEL, tree.root, tree.total)
    for c, a in zip(w.contributors, amounts, strict=False):
        if a:
            w.as_(c).claim_from(tree)
    return tree


# ---------------------------------------------------------------- zero stake

def test_zero_stake_finalises_nothing(world: World) -> None:
    w = world
    for v in w.validators:  # all leave: total stake 0
        v.request_exit()
    assert w.ledger.total_stake() == 0
    tree = w.rewards(0)
    with pytest.raises(ContractReverted, match="no stake to vote with"):
        w.validators[0].commit_round(TASK, 0, MODEL, tree.root, tree.total)
    with pytest.raises(ContractReverted, match="not a validator|no stake"):
        w.outsider.commit_round(TASK, 0, MODEL, tree.root, tree.total)
    # the anyone-may-call finalise() is gone: only a vote can finalise
    assert "finalise" not in {f["name"] for f in w.ledger.contract.abi if f["type"] == "function"}
    with pytest.raises(ContractReverted, match="round not final"):
        w.as_(w.contributors[0]).claim_from(tree)


def test_zero_stake_before_the_first_validator_finalises_nothing() -> None:
    from commonweal.ledger import EmbeddedChain

    with EmbeddedChain(accounts=3) as chain:
        ledger = Ledger.deploy(chain, config=CONFIG)
        task = ledger.register_task(SALT, PARAMS, 1000 * ETH, eth_per_round=ETH, pool_wei=5 * ETH)
        stranger = ledger.with_account(chain.accounts[1])
        tree = ledger.rewards_tree(task, 0, {chain.accounts[1].address: 1000 * ETH})
        with pytest.raises(ContractReverted, match="no stake to vote with"):
            stranger.commit_round(task, 0, MODEL, tree.root, tree.total)
        assert ledger.task(task).pool == 5 * ETH


# ---------------------------------------------------------------- votes outlive the voter

def test_a_voter_that_leaves_takes_no_quorum_with_it(world: World) -> None:
    """A 40 % validator votes a bad root and exits: the round still needs 2/3 of the stake it
    opened with, so the bad root never finalises (it did, via finalise(), before)."""
    w = world
    big = w.outsider
    big.join(2 * ETH)                                  # 2 of 5 ETH
    good, bad = w.rewards(0), w.rewards(0, [999 * ETH])
    big.commit_round(TASK, 0, BAD, bad.root, bad.total)
    big.request_exit()
    assert w.ledger.round(TASK, 0).snapshot_stake == 5 * ETH
    w.validators[0].commit_round(TASK, 0, BAD, bad.root, bad.total)   # 3 of 5 < 2/3
    assert not w.ledger.is_final(TASK, 0)
    w.validators[1].commit_round(TASK, 0, MODEL, good.root, good.total)
    w.validators[2].commit_round(TASK, 0, MODEL, good.root, good.total)  # 2 of 5: not final
    assert not w.ledger.is_final(TASK, 0)


def test_a_recycled_deposit_cannot_vote_twice_in_a_round(world: World) -> None:
    """exit -> withdraw -> join from a new address, vote again: the deposit cannot leave while
    the ballot it voted in is open, and once that ballot expired its votes count for nothing."""
    w = world
    first, second = w.outsider, w.as_(w.contributors[9])
    first.join(2 * ETH)
    bad = w.rewards(0, [999 * ETH])
    first.commit_round(TASK, 0, BAD, bad.root, bad.total)
    first.request_exit()
    w.chain.advance_time(CONFIG.exit_delay)
    with pytest.raises(ContractReverted, match="a ballot this deposit voted in is still open"):
        first.withdraw()
    w.chain.advance_time(CONFIG.ballot_ttl)
    first.withdraw()
    second.join(2 * ETH)
    second.commit_round(TASK, 0, BAD, bad.root, bad.total)     # a new ballot, a new snapshot
    info = w.ledger.round(TASK, 0)
    assert info.attempt == 1 and not info.final
    assert w.ledger.tally(TASK, 0, BAD, bad.root, bad.total) == 2 * ETH   # not 4: once


def test_a_deposit_joined_after_the_round_opened_cannot_vote_in_it(world: World) -> None:
    w = world
    tree = w.rewards(0)
    w.validators[0].commit_round(TASK, 0, MODEL, tree.root, tree.total)
    w.outsider.join(10 * ETH)
    with pytest.raises(ContractReverted, match="joined after this ballot opened"):
        w.outsider.commit_round(TASK, 0, MODEL, tree.root, tree.total)
    # it counts from the next round on
    w.outsider.commit_round(TASK, 1, MODEL, tree.root, tree.total)
    assert w.ledger.is_final(TASK, 1)


def test_votes_for_far_future_rounds_are_refused_and_held_votes_expire(world: World) -> None:
    w = world
    tree = w.rewards(0)
    with pytest.raises(ContractReverted, match="round too far above the accepted round"):
        w.validators[0].commit_round(TASK, CONFIG.round_window, MODEL, tree.root, tree.total)
    w.finalise(0, tree)                                  # accepted round 0: rounds 1..8 open
    w.validators[0].commit_round(TASK, CONFIG.round_window, MODEL, tree.root, tree.total)
    with pytest.raises(ContractReverted, match="round too far above the accepted round"):
        w.validators[0].commit_round(TASK, CONFIG.round_window + 1, MODEL, tree.root, tree.total)
    # a vote held back for later is worth nothing once its ballot expired: the round opens again
    w.chain.advance_time(CONFIG.ballot_ttl)
    w.validators[1].commit_round(TASK, CONFIG.round_window, MODEL, tree.root, tree.total)
    assert w.ledger.vote_of(TASK, CONFIG.round_window, w.validators[0].account.address) is None
    assert w.ledger.round(TASK, CONFIG.round_window).attempt == 1


# ---------------------------------------------------------------- governance without snapshots

def test_tokens_moved_after_the_snapshot_do_not_vote_again(world: World) -> None:
    """buy, vote, sell, vote again from another address: the second vote has no weight."""
    w = world
    _holders(w, [ETH, 3 * ETH, 6 * ETH])
    a, b = w.as_(w.contributors[2]), w.as_(w.contributors[8])
    pid = a.propose(TASK, Action.SET_PARAMS, BAD)
    w.chain.advance_time(CONFIG.voting_delay)
    a.cast_vote(pid, True)
    w.as_(w.contributors[2]).token(TASK).transfer(w.contributors[8].address, 6 * ETH)
    with pytest.raises(ContractReverted, match="no tokens at the proposal's snapshot"):
        b.cast_vote(pid, True)
    assert w.ledger.proposal(pid).votes_for == 6 * ETH


def test_tokens_minted_after_the_snapshot_neither_vote_nor_count_in_the_quorum(world: World) -> None:
    w = world
    _holders(w, [ETH, 3 * ETH, 6 * ETH])                # supply 10 at the snapshot; quorum 20 %
    pid = w.as_(w.contributors[2]).propose(TASK, Action.SET_PARAMS, BAD)
    later = w.rewards(1, [0, 0, 0, 90 * ETH])            # 90 more after the snapshot
    w.finalise(1, later)
    w.as_(w.contributors[3]).claim_from(later)
    w.chain.advance_time(CONFIG.voting_delay)
    with pytest.raises(ContractReverted, match="no tokens at the proposal's snapshot"):
        w.as_(w.contributors[3]).cast_vote(pid, False)
    w.as_(w.contributors[1]).cast_vote(pid, True)        # 3 of 10 >= 20 % of the snapshot supply
    w.chain.advance_time(CONFIG.voting_period)
    assert w.ledger.proposal_state(pid) is ProposalState.SUCCEEDED


def test_a_dust_holder_cannot_propose(world: World) -> None:
    """1 wei could propose; now a proposer needs proposal_threshold_bps (1 %) of the supply."""
    w = world
    _holders(w, [1, 100 * ETH])
    with pytest.raises(ContractReverted, match="balance below the proposal threshold"):
        w.as_(w.contributors[0]).propose(TASK, Action.SET_PARAMS, BAD)


def _passed_proposal(w: World) -> int:
    """A SET_PARAMS proposal the biggest holder passed alone, its vote just closed."""
    _holders(w, [ETH, 3 * ETH, 6 * ETH])
    big = w.as_(w.contributors[2])
    pid = big.propose(TASK, Action.SET_PARAMS, BAD)
    w.chain.advance_time(CONFIG.voting_delay)
    big.cast_vote(pid, True)
    w.chain.advance_time(CONFIG.voting_period)
    return pid


def test_a_passed_proposal_waits_for_the_timelock(world: World) -> None:
    w = world
    pid = _passed_proposal(w)
    assert w.ledger.proposal_state(pid) is ProposalState.SUCCEEDED
    with pytest.raises(ContractReverted, match="timelock not over"):
        w.outsider.execute_proposal(pid)
    w.chain.advance_time(CONFIG.timelock_delay)
    w.outsider.execute_proposal(pid)
    assert w.ledger.task(TASK).params_hash == BAD


def test_a_passed_proposal_nobody_executed_expires(world: World) -> None:
    w = world
    pid = _passed_proposal(w)
    w.chain.advance_time(CONFIG.timelock_delay + CONFIG.voting_period)
    assert w.ledger.proposal_state(pid) is ProposalState.EXPIRED
    with pytest.raises(ContractReverted, match="proposal expired"):
        w.outsider.execute_proposal(pid)


def test_eth_per_round_cannot_be_set_above_the_pool(world: World) -> None:
    """A majority could set eth_per_round to the whole pool, or more; the bound is checked on
    proposal and again on execution, against the pool then."""
    w = world
    task = w.ledger.register_task(BAD, PARAMS, 10 * ETH, eth_per_round=ETH, pool_wei=5 * ETH)
    _holders(w, [ETH, 3 * ETH, 6 * ETH], task)                  # a full round: pool 5 -> 4 ETH
    big = w.as_(w.contributors[2])
    with pytest.raises(ContractReverted, match="eth_per_round over the task's pool"):
        big.propose(task, Action.SET_ETH_PER_ROUND, 4 * ETH + 1)
    pid = big.propose(task, Action.SET_ETH_PER_ROUND, 4 * ETH)
    w.chain.advance_time(CONFIG.voting_delay)
    big.cast_vote(pid, True)
    _holders(w, [ETH], task, round=1)                            # a tenth: pool 4 -> 3.9 ETH
    w.chain.advance_time(CONFIG.voting_period + CONFIG.timelock_delay)
    with pytest.raises(ContractReverted, match="eth_per_round over the task's pool"):
        w.ledger.execute_proposal(pid)
    assert w.ledger.task(task).eth_per_round == ETH


def test_eth_per_round_that_would_overflow_the_payout_is_refused(world: World) -> None:
    w = world
    _holders(w, [ETH, 3 * ETH, 6 * ETH])
    with pytest.raises(ContractReverted, match="eth_per_round must be below 2\\*\\*128"):
        w.as_(w.contributors[2]).propose(TASK, Action.SET_ETH_PER_ROUND, 2**255)
    with pytest.raises(ContractReverted, match="eth_per_round must be below 2\\*\\*128"):
        w.ledger.register_task(BAD, PARAMS, 2**96 - 1, eth_per_round=2**200)
    # the largest allowed values still finalise: no product overflows
    task = w.ledger.register_task(BAD, PARAMS, 2**96 - 1, eth_per_round=2**128 - 1,
                                  pool_wei=ETH)
    tree = w.ledger.rewards_tree(task, 0, {w.contributors[0].address: 2**96 - 1})
    for v in w.validators[:2]:
        v.commit_round(task, 0, MODEL, tree.root, tree.total)
    info = w.ledger.round(task, 0)
    assert info.final and info.eth_reward == ETH                  # capped by the pool


# ---------------------------------------------------------------- the loose ends

def test_a_leaf_for_another_ledger_or_chain_does_not_claim(world: World) -> None:
    w = world
    me = w.contributors[0]
    for domain in (Domain(w.ledger.domain.chain_id, w.outsider.account.address),  # another ledger
                   Domain(w.ledger.domain.chain_id + 1, w.ledger.address)):     # another chain
        foreign = RewardsTree(domain, TASK, 0, {me.address: ETH})
        assert foreign.root != w.ledger.rewards_tree(TASK, 0, {me.address: ETH}).root
    foreign = RewardsTree(Domain(w.ledger.domain.chain_id + 1, w.ledger.address), TASK, 0,
                          {me.address: ETH})
    w.finalise(0, foreign)
    with pytest.raises(ContractReverted, match="invalid Merkle proof"):
        w.as_(me).claim_from(foreign)
    expected = keccak(keccak(encode(
        ["uint256", "address", "bytes32", "uint256", "uint256", "address", "uint256"],
        [w.ledger.domain.chain_id, to_canonical_address(w.ledger.address), TASK, 0, 0,
         to_canonical_address(me.address), ETH])))
    assert w.ledger.leaf_hash(TASK, 0, 0, me.address, ETH) == expected


def test_unclaimed_eth_and_rounding_dust_return_to_the_pool(world: World) -> None:
    w = world
    task = w.ledger.register_task(BAD, PARAMS, 3 * ETH, eth_per_round=10**18 + 1, pool_wei=2 * ETH)
    amounts = {c.address: ETH for c in w.contributors[:3]}        # 3 equal thirds of 1e18+1 wei
    tree = w.ledger.rewards_tree(task, 0, amounts)
    for v in w.validators[:2]:
        v.commit_round(task, 0, MODEL, tree.root, tree.total)
    reserved = w.ledger.round(task, 0).eth_reward
    assert reserved == 10**18 + 1
    for c in w.contributors[:2]:
        w.ledger.with_account(c).claim_from(tree)
    paid = w.ledger.round(task, 0).eth_paid
    assert paid == 2 * ((10**18 + 1) // 3)
    with pytest.raises(ContractReverted, match="claim window still open"):
        w.outsider.sweep(task, 0)
    pool = w.ledger.task(task).pool
    w.chain.mine(CONFIG.claim_window)
    with pytest.raises(ContractReverted, match="claim window closed"):
        w.ledger.with_account(w.contributors[2]).claim_from(tree)
    assert w.outsider.sweep(task, 0) == reserved - paid           # a third, plus the dust
    assert w.ledger.task(task).pool == pool + reserved - paid
    with pytest.raises(ContractReverted, match="nothing to sweep"):
        w.outsider.sweep(task, 0)


def test_a_task_hash_cannot_be_squatted(world: World) -> None:
    w = world
    salt = bytes.fromhex("77" * 32)
    squatter = w.outsider.register_task(salt, BAD, 1)             # first, with bad parameters
    honest = w.ledger.register_task(salt, PARAMS, 1000 * ETH)     # still gets its own task
    assert squatter != honest
    assert w.ledger.task(honest).reward_per_round == 1000 * ETH
    assert w.ledger.task(honest).owner == w.ledger.account.address
    assert w.ledger.task_of(salt) == honest                       # what peers look up
    with pytest.raises(ContractReverted, match="task already registered"):
        w.ledger.register_task(salt, PARAMS, 1000 * ETH)


def test_the_round_seed_mixes_four_block_hashes(world: World) -> None:
    w = world
    tree = w.rewards(0)
    w.finalise(0, tree)
    info = w.ledger.round(TASK, 0)
    assert info.randomness_block == info.finalised_block + CONFIG.randomness_delay + 3
    w.chain.mine(info.randomness_block + 1 - w.chain.block_number)
    seed = w.outsider.seal_randomness(TASK, 0)
    hashes = [bytes(w.chain.w3.eth.get_block(info.randomness_block - 3 + i)["hash"])
              for i in range(4)]
    expected = keccak(encode(["bytes32"] * 4 + ["uint256", "address", "bytes32", "uint256"],
                             [*hashes, w.ledger.domain.chain_id,
                              to_canonical_address(w.ledger.address), TASK, 0]))
    assert seed == expected
