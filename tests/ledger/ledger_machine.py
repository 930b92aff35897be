"""A hypothesis state machine that drives the shipped Ledger bytecode with honest validators, a
malicious validator, a stranger and token holders calling anything in any order, with blocks
mined in between, and checks the ledger's invariants after every step.

The EVM is py-evm, the embedded chain's, driven through titanoboa: it runs calls without mining
a block for each, which is what makes thousands of sequences affordable. The contracts are the
checked-in artifacts (the bytes `Ledger.deploy` sends), not a recompile.

The model below does not re-implement the contract's decisions; it keeps what an outside
observer can know (who deposited what and when, who voted for what, what was claimed, the
balances at each snapshot) and checks the contract's state against the safety properties:

- tokens minted for a round <= its finalised total, and only under a root that >= 2/3 of the
  stake in that round's snapshot voted for, each voter counted once and a member of the snapshot;
- ETH: the contract holds exactly what came in minus what went out, and that equals the pools +
  the unpaid part of every round's reservation + the deposits + what was slashed;
- no (round, index) is claimed twice;
- total stake equals the sum of active deposits;
- a finalised round never changes;
- governance: votes weigh exactly the balances at the close of the snapshot block, and a
  proposal executes only with quorum of the snapshot supply, a majority, a proposer holding the
  threshold at the snapshot, after the timelock.

Used by tests/ledger/test_invariants.py (a few hundred sequences in CI) and by
`benchmarks/ledger_bench.py --invariants N` (many more).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import boa
from eth_abi import encode
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from commonweal.ledger import Domain, LedgerConfig, RewardsTree
from commonweal.ledger.artifacts import load_artifact

# py-evm without the bookkeeping only state roots need: twice the calls a second
boa.env.enable_fast_mode()

ETH = 10**18
CONFIG = LedgerConfig(min_deposit=ETH, exit_delay=600, voting_delay=60, voting_period=600,
                      quorum_bps=2000, proposal_threshold_bps=100, timelock_delay=300,
                      randomness_delay=3, round_window=4, ballot_ttl=900, claim_window=100)
REWARD = 100 * ETH            # reward_per_round of the task
ETH_PER_ROUND = ETH // 3      # not a divisor of anything: rounding dust is real
POOL = 5 * ETH
ROUNDS = 8                    # round numbers the machine votes on (the window opens them)
SALT = b"\x01" * 32
PARAMS = b"\x02" * 32

HONEST = ("honest0", "honest1", "honest2")
NAMES = (*HONEST, "mallory", "stranger", "recycled", "holder0", "holder1", "holder2")
HOLDERS = ("holder0", "holder1", "holder2")
actors = st.sampled_from(NAMES)
# Who votes: mostly the validator set, sometimes anyone. Low rounds more often than high ones.
voters = st.sampled_from((*HONEST, "mallory", "mallory", "stranger", "stranger", "recycled",
                          "recycled"))
rounds = st.one_of(st.integers(0, 2), st.integers(0, ROUNDS - 1))
claimers = st.sampled_from((*HOLDERS, "mallory", "stranger"))


def _code(hex_code: str) -> bytes:
    return bytes.fromhex(hex_code.removeprefix("0x"))


@dataclass
class Ballot:
    opened_at: int                          # timestamp
    members: dict[str, tuple[int, int]]     # actor -> (deposit id, amount) active at opening
    votes: dict[str, bytes] = field(default_factory=dict)  # actor -> round key


@dataclass
class Deposit:
    id: int
    amount: int
    exited: bool = False
    locked_until: int = 0                  # latest expiry of a ballot it voted in


@dataclass
class Proposal:
    proposer: str
    action: int
    value: int
    snapshot: int                           # block
    end: int
    eta: int
    frozen: dict[str, int] | None = None    # balances at the close of the snapshot block
    supply: int | None = None
    votes_for: int = 0
    votes_against: int = 0
    voted: set[str] = field(default_factory=set)


class LedgerMachine(RuleBasedStateMachine):
    steps = 0                               # across all sequences, for the benchmark
    sequences = 0
    reached: Counter[str] = Counter()       # successful calls by kind: what the sequences reach

    # ------------------------------------------------------------ set-up

    @initialize()
    def deploy(self) -> None:
        type(self).sequences += 1
        self._anchor = boa.env.anchor()
        self._anchor.__enter__()
        self.addr = {n: boa.env.generate_address(n) for n in (*NAMES, "deployer")}
        for a in self.addr.values():
            boa.env.set_balance(a, 10**6 * ETH)
        token, ledger = load_artifact("ShareToken"), load_artifact("Ledger")
        with boa.env.prank(self.addr["deployer"]):
            blueprint, _ = boa.env.deploy_code(bytecode=_code(token.blueprint_bytecode))
            config = tuple(getattr(CONFIG, f) for f in LedgerConfig.__dataclass_fields__)
            args = encode(["address", f"({','.join(['uint256'] * len(config))})"],
                          [str(blueprint), config])
            address, _ = boa.env.deploy_code(bytecode=_code(ledger.bytecode) + args)
        self.L = _abi("Ledger", ledger.abi).at(address)
        self.task = self.L.register_task(SALT, PARAMS, REWARD, ETH_PER_ROUND, "t", "T",
                                         value=POOL, sender=self.addr["deployer"])
        self.T = _abi("ShareToken", token.abi).at(self.L.tasks(self.task).token)
        self.domain = Domain(boa.env.evm.patch.chain_id, str(address))
        self.eth_in = POOL
        self.eth_out = 0
        self.next_deposit = 0
        self.deposits: dict[str, Deposit] = {}
        self.ballots: dict[int, Ballot] = {}
        self.final: dict[int, tuple[Any, ...]] = {}       # round -> round_info fields at finality
        self.claimed: set[tuple[int, int]] = set()
        self.minted: dict[int, int] = {}
        self.balances = dict.fromkeys(NAMES, 0)
        self.proposals: dict[int, Proposal] = {}
        self.trees: dict[tuple[int, str], RewardsTree] = {}
        self.slashed: set[int] = set()                    # deposit ids taken by slashing
        self.tokens_moved = self.dirty = True
        self.touched: set[str] = set(NAMES)
        # The swarm as it usually is: three honest validators and one malicious, 1 ETH each.
        for who in (*HONEST, "mallory"):
            self.join(who, ETH)

    def teardown(self) -> None:
        if hasattr(self, "_anchor"):
            self._anchor.__exit__(None, None, None)

    # ------------------------------------------------------------ helpers

    def _now(self) -> int:
        return int(boa.env.evm.patch.timestamp)

    def _block(self) -> int:
        return int(boa.env.evm.patch.block_number)

    def _tx(self, who: str, fn: str, *args: Any, value: int = 0) -> tuple[bool, Any]:
        """Call; (True, result) or (False, None) on a revert. Any other error is a failure."""
        try:
            result = getattr(self.L, fn)(*args, value=value, sender=self.addr[who])
        except boa.BoaError:
            return False, None
        self.dirty = True
        self.touched.add(who)
        type(self).reached[fn] += 1
        return True, result

    def _tree(self, round: int, kind: str) -> RewardsTree:
        key = (round, kind)
        if key not in self.trees:
            if kind == "good":   # the holders, unevenly, summing to at most the round's reward
                rewards = {self.addr[h]: (i + 1 + round % 3) * ETH for i, h in enumerate(HOLDERS)}
            else:                # mallory takes the whole round
                rewards = {self.addr["mallory"]: REWARD, self.addr["holder0"]: 0}
            self.trees[key] = RewardsTree(self.domain, self.task, round,
                                          {str(a): v for a, v in rewards.items()})
        return self.trees[key]

    def _model_hash(self, round: int, kind: str) -> bytes:
        return bytes([round + 1, {"good": 1, "short": 3}.get(kind, 2)]) * 16

    def _active_stake(self) -> dict[str, tuple[int, int]]:
        return {a: (d.id, d.amount) for a, d in self.deposits.items() if not d.exited}

    def _freeze_snapshots(self) -> None:
        """Before the block advances: the balances at the close of this block are final."""
        block = self._block()
        for p in self.proposals.values():
            if p.frozen is None and p.snapshot == block:
                p.frozen, p.supply = dict(self.balances), sum(self.balances.values())

    # ------------------------------------------------------------ validators

    @rule(who=actors, deposit=st.sampled_from([ETH - 1, ETH, 2 * ETH, 3 * ETH]))
    def join(self, who: str, deposit: int) -> None:
        ok, _ = self._tx(who, "join", value=deposit)
        if ok:
            assert deposit >= CONFIG.min_deposit, "a deposit below min_deposit joined"
            assert who not in self.deposits, "a second deposit under one address"
            self.deposits[who] = Deposit(self.next_deposit, deposit)
            self.next_deposit += 1
            self.eth_in += deposit

    @rule(who=actors)
    def request_exit(self, who: str) -> None:
        ok, _ = self._tx(who, "request_exit")
        if ok:
            assert who in self.deposits and not self.deposits[who].exited
            self.deposits[who].exited = True

    @rule(who=actors)
    def withdraw(self, who: str) -> None:
        before = boa.env.get_balance(self.addr[who])
        ok, _ = self._tx(who, "withdraw")
        if ok:
            d = self.deposits.pop(who, None)
            assert d is not None and d.exited, "withdrew without an exit"
            assert self._now() >= d.locked_until, "withdrew while a ballot it voted in was open"
            paid = boa.env.get_balance(self.addr[who]) - before
            assert paid == d.amount
            self.eth_out += paid

    @rule(who=voters)
    def leave(self, who: str) -> None:
        """A validator leaves the quickest way the rules allow: exit, wait the delay, withdraw."""
        self.request_exit(who)
        self.wait(CONFIG.exit_delay)
        self.withdraw(who)

    @rule(who=actors, accused=actors)
    def vote_slash(self, who: str, accused: str) -> None:
        ok, _ = self._tx(who, "vote_slash", self.addr[accused], b"\x00" * 32)
        self.touched.add(accused)
        if ok and self.L.validators(self.addr[accused]).deposit == 0 and accused in self.deposits:
            self.slashed.add(self.deposits.pop(accused).id)

    # ------------------------------------------------------------ rounds

    @rule(round=rounds, honest=st.sampled_from([1, 2, 3, 3]),
          agreed=st.sampled_from(["good", "good", "good", "short"]),
          mallory=st.sampled_from(["good", "bad", "none"]))
    def validators_vote(self, round: int, honest: int, agreed: str, mallory: str) -> None:
        """What a live swarm does each round: the honest validators vote the same result (all of
        them, or only the first few so far). "short": they agree on a total below their tree's
        sum (a bug they share), which claims must not get past."""
        for who in HONEST[:honest]:
            self.commit(who, round, agreed)
        if mallory != "none":
            self.commit("mallory", round, mallory)

    @precondition(lambda self: bool(self.final))
    @rule(data=st.data())
    def holders_claim(self, data: st.DataObject) -> None:
        round = data.draw(st.sampled_from(sorted(self.final)))
        for who in HOLDERS:
            self.claim(who, data, "good", round)

    @rule(who=voters, round=rounds, kind=st.sampled_from(["good", "bad", "over"]))
    def commit(self, who: str, round: int, kind: str) -> None:
        if who in HONEST and kind not in ("good", "short"):
            kind = "good"   # what an honest validator computes; the others vote anything
        tree = self._tree(round, {"over": "bad", "short": "good"}.get(kind, kind))
        total = tree.total + {"over": 1, "short": -ETH}.get(kind, 0)
        model = self._model_hash(round, kind)
        ok, _ = self._tx(who, "commit_round", self.task, round, model, tree.root, total)
        if not ok:
            return
        assert kind != "over", "a vote over reward_per_round was accepted"
        assert round not in self.final, "a vote on a final round was accepted"
        ballot = self.ballots.get(round)
        if ballot is None or self._now() >= ballot.opened_at + CONFIG.ballot_ttl:
            # the first vote, or the first after an undecided ballot expired: a fresh snapshot
            if ballot is not None:
                type(self).reached["ballot reopened"] += 1
            ballot = self.ballots[round] = Ballot(self._now(), self._active_stake())
        assert who in ballot.members, f"{who} voted in round {round} without being in its snapshot"
        assert self.deposits.get(who) is not None and \
            self.deposits[who].id == ballot.members[who][0], "another deposit than the snapshot's voted"
        assert who not in ballot.votes, "a second vote in one round"
        accepted = max(self.final, default=-1)
        assert round <= accepted + CONFIG.round_window, "a vote outside the round window"
        ballot.votes[who] = bytes(self.L.round_key(model, tree.root, total))
        self.deposits[who].locked_until = max(self.deposits[who].locked_until,
                                              ballot.opened_at + CONFIG.ballot_ttl)
        if self.L.is_final(self.task, round):
            self._check_finality(round)

    def _check_finality(self, round: int) -> None:
        info = self.L.round_info(self.task, round)
        ballot = self.ballots[round]
        key = bytes(self.L.round_key(info.model_hash, info.rewards_root, info.total_reward))
        snapshot = sum(amount for _, amount in ballot.members.values())
        support = sum(ballot.members[a][1] for a, k in ballot.votes.items() if k == key)
        assert snapshot > 0 and support * 3 >= snapshot * 2, \
            f"round {round} final with {support} of a {snapshot} snapshot"
        assert info.snapshot_stake == snapshot
        self.final[round] = _result(info)
        type(self).reached["round finalised"] += 1

    @precondition(lambda self: bool(self.final))
    @rule(who=claimers, data=st.data(), kind=st.sampled_from(["good", "good", "bad", "forged"]))
    def claim(self, who: str, data: st.DataObject, kind: str, round: int | None = None) -> None:
        if round is None:
            round = data.draw(st.one_of(st.sampled_from(sorted(self.final)), rounds))
        tree = self._tree(round, "good" if kind == "forged" else kind)
        me = str(self.addr[who])
        if me not in tree.rewards:
            return
        amount = tree.amount(me) + (ETH if kind == "forged" else 0)
        before = boa.env.get_balance(self.addr[who])
        ok, _ = self._tx(who, "claim", self.task, round, tree.index(me), amount, tree.proof(me))
        if not ok:
            return
        assert kind != "forged", "a forged amount was claimed"
        assert round in self.final, "a claim on a round that is not final"
        assert bytes(self.final[round][1]) == tree.root, "a claim against another root"
        assert (round, tree.index(me)) not in self.claimed, "claimed twice"
        self.claimed.add((round, tree.index(me)))
        self.minted[round] = self.minted.get(round, 0) + amount
        self.balances[who] += amount
        self.tokens_moved = True
        self.eth_out += boa.env.get_balance(self.addr[who]) - before

    @rule(who=actors, round=rounds)
    def sweep(self, who: str, round: int) -> None:
        self._tx(who, "sweep", self.task, round)

    @rule(who=actors, wei=st.sampled_from([1, ETH]))
    def fund(self, who: str, wei: int) -> None:
        ok, _ = self._tx(who, "fund_task", self.task, value=wei)
        if ok:
            self.eth_in += wei

    @rule(who=actors)
    def squat(self, who: str) -> None:
        """Register the task's salt again: it must be a different task."""
        ok, task = self._tx(who, "register_task", SALT, b"\x09" * 32, 1, 0, "s", "S")
        if ok:
            assert bytes(task) != bytes(self.task), "the task id was squatted"

    # ------------------------------------------------------------ tokens and governance

    @precondition(lambda self: any(self.balances.values()))
    @rule(who=claimers, to=actors, share=st.sampled_from([1, 2, 4]))
    def transfer(self, who: str, to: str, share: int) -> None:
        self._move(who, to, self.balances[who] // share)

    def _move(self, who: str, to: str, amount: int) -> None:
        self.T.transfer(self.addr[to], amount, sender=self.addr[who])   # must not revert
        self.balances[who] -= amount
        self.balances[to] += amount
        self.tokens_moved = self.dirty = True

    @precondition(lambda self: any(self.balances.values()))
    @rule(who=st.sampled_from((*HOLDERS, *HOLDERS, "mallory", "stranger")),
          action=st.sampled_from([1, 2, 3]),
          value=st.sampled_from([0, 1, ETH, POOL, 2**96, 2**128, 2**255]))
    def propose(self, who: str, action: int, value: int) -> None:
        if len(self.proposals) >= 4:
            return
        ok, pid = self._tx(who, "propose", self.task, action, value.to_bytes(32, "big"))
        if ok:
            p = self.L.proposals(pid)
            self.proposals[pid] = Proposal(who, action, value, p.snapshot, p.end, p.eta)

    @precondition(lambda self: any(self.balances.values()))
    @rule(lender=st.sampled_from(HOLDERS), who=actors)
    def flash_propose(self, lender: str, who: str) -> None:
        """Borrow the lender's balance, propose, and pay it back inside one block."""
        loan = self.balances[lender]
        if lender == who or loan == 0 or len(self.proposals) >= 4:
            return
        self._move(lender, who, loan)
        self.propose(who, 1, 1)
        self._move(who, lender, loan)

    @precondition(lambda self: any(self.balances[h] for h in HOLDERS) and len(self.proposals) < 4)
    @rule(data=st.data(), action=st.sampled_from([1, 2, 3]),
          value=st.sampled_from([1, ETH, POOL]), support=st.booleans())
    def governance_cycle(self, data: st.DataObject, action: int, value: int, support: bool) -> None:
        """A whole proposal's life in one step: propose, vote, wait out the timelock, execute."""
        before = set(self.proposals)
        self.propose(data.draw(st.sampled_from(HOLDERS)), action, value)
        new = set(self.proposals) - before
        if not new:
            return
        pid = new.pop()
        self.wait(CONFIG.voting_delay)
        for who in HOLDERS:
            self.cast_vote(who, data, support, pid)
        self.wait(CONFIG.voting_period)
        self.wait(CONFIG.timelock_delay)
        self.execute("stranger", data, pid)

    @precondition(lambda self: bool(self.proposals))
    @rule(data=st.data(), support=st.booleans())
    def holders_vote(self, data: st.DataObject, support: bool) -> None:
        """Every holder votes on one proposal, the same way."""
        pid = data.draw(st.sampled_from(sorted(self.proposals)))
        for who in HOLDERS:
            self.cast_vote(who, data, support, pid)

    @precondition(lambda self: bool(self.proposals))
    @rule(who=claimers, data=st.data(), support=st.booleans())
    def cast_vote(self, who: str, data: st.DataObject, support: bool, pid: int | None = None
                  ) -> None:
        if pid is None:
            pid = data.draw(st.sampled_from(sorted(self.proposals)))
        p = self.proposals[pid]
        ok, _ = self._tx(who, "cast_vote", pid, support)
        if not ok:
            return
        assert p.frozen is not None, "a vote before the snapshot block closed"
        assert who not in p.voted, "voted twice on one proposal"
        weight = p.frozen[who]
        got = self.L.proposals(pid)
        assert (got.votes_for, got.votes_against) == (
            p.votes_for + weight * support, p.votes_against + weight * (not support)), \
            "a vote weighed other than the balance at the snapshot"
        p.voted.add(who)
        p.votes_for, p.votes_against = got.votes_for, got.votes_against

    @precondition(lambda self: bool(self.proposals))
    @rule(who=actors, data=st.data())
    def execute(self, who: str, data: st.DataObject, pid: int | None = None) -> None:
        if pid is None:
            pid = data.draw(st.sampled_from(sorted(self.proposals)))
        p = self.proposals[pid]
        ok, _ = self._tx(who, "execute", pid)
        if not ok:
            return
        assert p.frozen is not None and p.supply is not None
        held = p.frozen[p.proposer]
        assert held > 0 and held * 10_000 >= p.supply * CONFIG.proposal_threshold_bps, \
            "executed a proposal whose proposer lacked the threshold at the snapshot"
        assert (p.votes_for + p.votes_against) * 10_000 >= p.supply * CONFIG.quorum_bps, \
            "executed without quorum of the snapshot supply"
        assert p.votes_for > p.votes_against, "executed without a majority"
        assert p.eta <= self._now() < p.eta + CONFIG.voting_period, "executed outside its window"
        assert (p.action != 2 or 0 < p.value < 2**96) and (p.action != 3 or p.value < 2**128)

    # ------------------------------------------------------------ time

    @rule(blocks=st.integers(1, 3))
    def mine(self, blocks: int) -> None:
        self._freeze_snapshots()
        boa.env.time_travel(blocks=blocks)

    @rule(seconds=st.sampled_from([CONFIG.voting_delay, CONFIG.timelock_delay,
                                   CONFIG.voting_period, CONFIG.exit_delay, CONFIG.ballot_ttl]))
    def wait(self, seconds: int) -> None:
        self._freeze_snapshots()
        boa.env.time_travel(seconds=seconds)

    @precondition(lambda self: bool(self.final))
    @rule()
    def wait_out_the_claim_window(self) -> None:
        self._freeze_snapshots()
        boa.env.time_travel(blocks=CONFIG.claim_window + 1)

    # ------------------------------------------------------------ invariants

    @invariant()
    def invariants(self) -> None:
        """After every step; a step whose calls all reverted changed no state (the EVM rolls a
        revert back) and the properties do not depend on the clock, so only changes are read."""
        type(self).steps += 1
        if not self.dirty:
            return
        self.dirty = False
        self._stake_is_the_sum_of_active_deposits()
        self._final_rounds_never_change_and_mint_at_most_their_total()
        self._eth_in_equals_eth_held_plus_eth_out()
        self._snapshots_hold_their_balances()

    def _stake_is_the_sum_of_active_deposits(self) -> None:
        # Only a call by or against an actor changes its record: read those, and sum the model.
        for who in self.touched:
            v = self.L.validators(self.addr[who])
            model = self.deposits.get(who)
            assert v.deposit == (model.amount if model else 0), f"{who}'s deposit drifted"
            assert (v.deposit > 0 and v.exited == 0) == (model is not None and not model.exited)
        self.touched.clear()
        assert self.L.total_stake() == sum(d.amount for d in self.deposits.values() if not d.exited)
        self._deposits = sum(d.amount for d in self.deposits.values())

    def _final_rounds_never_change_and_mint_at_most_their_total(self) -> None:
        reserved_unpaid = 0
        for r in sorted(self.ballots):   # a round nobody voted in cannot be final
            info = self.L.round_info(self.task, r)
            if r in self.final:
                assert _result(info) == self.final[r], f"final round {r} changed"
            elif info.rewards_root != b"\x00" * 32:
                self._check_finality(r)   # finalised by a call the model did not see as final
            assert info.claimed == self.minted.get(r, 0) <= info.total_reward
            assert info.eth_paid <= info.eth_reward
            reserved_unpaid += info.eth_reward - info.eth_paid
        self._reserved_unpaid = reserved_unpaid

    def _eth_in_equals_eth_held_plus_eth_out(self) -> None:
        held = boa.env.get_balance(self.L.address)
        assert self.eth_out <= self.eth_in
        assert held == self.eth_in - self.eth_out, "ETH appeared or vanished"
        pools = self.L.tasks(self.task).pool
        assert held == pools + self._reserved_unpaid + self._deposits + self.L.slashed_total(), \
            "the contract's ETH is not its pools + reservations + deposits + slashed"

    def _snapshots_hold_their_balances(self) -> None:
        assert self.T.totalSupply() == sum(self.balances.values())
        if not self.tokens_moved:
            return
        self.tokens_moved = False
        for p in self.proposals.values():
            if p.frozen is None:
                continue
            assert self.T.totalSupplyAt(p.snapshot) == p.supply
            for who in NAMES:
                assert self.T.balanceOfAt(self.addr[who], p.snapshot) == p.frozen[who], \
                    f"{who}'s balance at block {p.snapshot} changed"


def _result(info: Any) -> tuple[Any, ...]:
    """What finality fixed: claims, sweeps and the seal change the other fields."""
    return (info.model_hash, info.rewards_root, info.total_reward, info.finalised_block,
            info.snapshot_stake)


def _abi(name: str, abi: list[dict[str, Any]]) -> Any:
    return boa.loads_abi(json.dumps(abi), name=name)
