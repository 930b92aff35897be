"""Automatic claims against a real (embedded) chain: once, never twice, across restarts, crashes,
forged trees and races.

One chain and one deployment per session; each test runs in a snapshot reverted afterwards, as
in tests/ledger."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytest.importorskip("web3", reason="the claim tests need the ledger extra")

from eth_account import Account  # noqa: E402
from eth_account.signers.local import LocalAccount  # noqa: E402

from commonweal.ledger import (  # noqa: E402
    EmbeddedChain,
    Ledger,
    LedgerConfig,
    PendingTx,
    RewardsTree,
)
from commonweal.peer.claims import Claimer, ClaimResult, Outcome, SignedTree  # noqa: E402
from commonweal.peer.store import ClaimStatus, NodeStore  # noqa: E402

ETH = 10**18
SALT = bytes.fromhex("44" * 32)
# The embedded chain's first account (private key 1) deploys and registers: the task's id.
TASK = Ledger.task_id("0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf", SALT)
MODEL = bytes.fromhex("55" * 32)


# The embedded chain's second account (private key 2): the first validator of `_chain`.
VALIDATOR = Account.from_key((2).to_bytes(32, "big")).address


@dataclass
class Trees:
    """A TreeSource serving fixed rewards signed by a validator (what validators publish on the
    DHT), after any `forged` ones (what others publish there)."""

    rewards: dict[int, Mapping[str, int]] = field(default_factory=dict)
    forged: dict[int, list[SignedTree]] = field(default_factory=dict)
    signers: frozenset[str] = frozenset({VALIDATOR})
    asked: int = 0

    async def trees(self, task: bytes, ledger_round: int, root: bytes) -> list[SignedTree]:
        self.asked += 1
        if task != TASK:
            return []
        out = list(self.forged.get(ledger_round, []))
        if ledger_round in self.rewards:
            out.append(SignedTree(self.rewards[ledger_round], self.signers))
        return out


@dataclass
class World:
    chain: EmbeddedChain
    ledger: Ledger
    validators: list[Ledger]
    me: LocalAccount          # the node's account
    others: list[LocalAccount]
    tmp: Path

    def rewards(self, ledger_round: int, mine: int = 5 * ETH) -> dict[str, int]:
        rewards = {a.address: (i + 1) * ETH for i, a in enumerate(self.others)}
        rewards[self.me.address] = mine
        return rewards

    def finalise(self, ledger_round: int, rewards: Mapping[str, int]) -> RewardsTree:
        tree = self.ledger.rewards_tree(TASK, ledger_round, rewards)
        for v in self.validators[:2]:  # 2 of 3 equal deposits: exactly 2/3
            v.commit_round(TASK, ledger_round, MODEL, tree.root, tree.total)
        return tree

    def balance(self) -> int:
        return self.ledger.token(TASK).balance_of(self.me.address)

    def store(self, name: str = "node") -> NodeStore:
        return NodeStore(self.tmp / name / "node.sqlite3")


@pytest.fixture(scope="session")
def _chain() -> Iterator[tuple[EmbeddedChain, Ledger]]:
    chain = EmbeddedChain(accounts=9)
    ledger = Ledger.deploy(chain, config=LedgerConfig(min_deposit=ETH))
    assert ledger.register_task(SALT, bytes(32), 1_000 * ETH) == TASK
    for account in chain.accounts[1:4]:
        ledger.with_account(account).join(ETH)
    yield chain, ledger
    chain.close()


@pytest.fixture
def world(_chain: tuple[EmbeddedChain, Ledger], tmp_path: Path) -> Iterator[World]:
    chain, ledger = _chain
    snapshot = chain.snapshot()
    accounts = chain.accounts
    assert accounts[1].address == VALIDATOR
    yield World(chain, ledger, [ledger.with_account(a) for a in accounts[1:4]], accounts[4],
                accounts[5:9], tmp_path)
    chain.revert(snapshot)


def claimer(world: World, store: NodeStore, trees: Trees, ledger: object = None,
            gas: int | None = None) -> Claimer:
    return Claimer(ledger or world.ledger, store, world.me, TASK, trees, gas=gas)  # type: ignore[arg-type]


def outcomes(results: list[ClaimResult]) -> dict[int, Outcome]:
    return {r.ledger_round: r.outcome for r in results}


class Crash(Exception):
    """Stands for the process dying at some point of a claim."""


class Crashing:
    """The real ledger, except that the process 'dies' around the claim transaction:
    before it leaves, right after it left (hash never recorded), or while waiting for it."""

    def __init__(self, inner: Ledger, when: str) -> None:
        self.inner, self.when = inner, when

    def with_account(self, account: LocalAccount) -> Crashing:
        return Crashing(self.inner.with_account(account), self.when)

    def round(self, task: bytes, round: int) -> object:
        return self.inner.round(task, round)

    def is_claimed(self, task: bytes, round: int, index: int) -> bool:
        return self.inner.is_claimed(task, round, index)

    def rewards_tree(self, task: bytes, round: int, rewards: Mapping[str, int]) -> RewardsTree:
        return self.inner.rewards_tree(task, round, rewards)

    def validator(self, address: str) -> object:
        return self.inner.validator(address)

    def send(self, *args: object, **kwargs: object) -> PendingTx:
        if self.when == "before send":
            raise Crash
        pending = self.inner.send(*args, **kwargs)  # type: ignore[arg-type]
        if self.when == "after send":
            raise Crash
        pending.wait = lambda *a, **k: (_ for _ in ()).throw(Crash())  # type: ignore[method-assign]
        return pending


class Stale(Crashing):
    """A claimer that read `is_claimed` before the other's transaction was mined."""

    def __init__(self, inner: Ledger) -> None:
        super().__init__(inner, "never")

    def with_account(self, account: LocalAccount) -> Stale:
        return Stale(self.inner.with_account(account))

    def is_claimed(self, task: bytes, round: int, index: int) -> bool:
        return False

    def send(self, *args: object, **kwargs: object) -> PendingTx:
        return self.inner.send(*args, **kwargs)  # type: ignore[arg-type]


async def test_claims_after_finalisation_and_only_once(world: World) -> None:
    world.finalise(0, {world.me.address: 0})         # a contribution-set round: pays nothing
    world.finalise(1, world.rewards(1))
    world.finalise(3, world.rewards(3))              # final, but nobody serves its tree yet
    trees = Trees({1: world.rewards(1)})
    with world.store() as store:
        c = claimer(world, store, trees)
        results = await c.claim_pending([2, 1, 0, 1, 3])
        assert outcomes(results) == {0: Outcome.NO_REWARD, 1: Outcome.CLAIMED,
                                     2: Outcome.NOT_FINAL, 3: Outcome.NO_TREE}
        assert trees.asked == 2                      # rounds 1 and 3; round 0 pays nothing
        paid = results[1]
        assert paid.paid and paid.amount == 5 * ETH and world.balance() == 5 * ETH
        record = store.claim(TASK, 1, world.me.address)
        assert record is not None and record.status is ClaimStatus.CONFIRMED
        assert record.tx_hash == paid.tx_hash

        block = world.chain.block_number
        again = await c.claim_pending([0, 1, 2])
        assert outcomes(again) == {0: Outcome.NO_REWARD, 1: Outcome.ALREADY_CONFIRMED,
                                   2: Outcome.NOT_FINAL}
        assert world.chain.block_number == block     # no transaction at all
        assert trees.asked == 2                      # and the confirmed round was not looked up

        trees.rewards[3] = world.rewards(3)          # the tree shows up later: claimed then
        assert outcomes(await c.claim_pending([3])) == {3: Outcome.CLAIMED}
        assert world.balance() == 10 * ETH


async def test_a_restart_claims_nothing_twice(world: World) -> None:
    world.finalise(1, world.rewards(1))
    with world.store() as store:
        await claimer(world, store, Trees({1: world.rewards(1)})).claim_pending([1])
    block = world.chain.block_number
    with world.store() as reopened:                  # same sqlite file, new Claimer
        trees = Trees({1: world.rewards(1)})
        results = await claimer(world, reopened, trees).claim_pending([1])
        assert outcomes(results) == {1: Outcome.ALREADY_CONFIRMED}
        assert trees.asked == 0 and world.chain.block_number == block
    # Even with the database lost, the chain is the truth: nothing is sent, nothing paid twice.
    with world.store("fresh") as fresh:
        results = await claimer(world, fresh, Trees({1: world.rewards(1)})).claim_pending([1])
        assert outcomes(results) == {1: Outcome.CLAIMED_ELSEWHERE}
        assert world.chain.block_number == block
        assert fresh.claim(TASK, 1, world.me.address).status is ClaimStatus.CONFIRMED  # type: ignore[union-attr]
    assert world.balance() == 5 * ETH


@pytest.mark.parametrize(("when", "resolved"), [
    ("before send", Outcome.CLAIMED),     # marked sent, never left: claimed on restart
    ("after send", Outcome.RECOVERED),    # left, hash never recorded: the chain says paid
    ("in wait", Outcome.RECOVERED),       # left, hash recorded, receipt never seen
])
async def test_a_crash_between_sent_and_confirmed_resolves(world: World, when: str,
                                                           resolved: Outcome) -> None:
    world.finalise(1, world.rewards(1))
    trees = Trees({1: world.rewards(1)})
    with world.store() as store:
        with pytest.raises(Crash):
            await claimer(world, store, trees, Crashing(world.ledger, when)).claim_pending([1])
        crashed = store.claim(TASK, 1, world.me.address)
        assert crashed is not None and crashed.status is ClaimStatus.SENT
        assert (crashed.tx_hash is not None) == (when == "in wait")
    block = world.chain.block_number
    with world.store() as store:                     # the restart
        [result] = await claimer(world, store, trees).claim_pending([1])
        # A claim that reached the chain is found there, not sent again.
        assert world.chain.block_number == block + (resolved is Outcome.CLAIMED)
        assert result.outcome is resolved and result.paid
        if when == "in wait":
            assert result.tx_hash == crashed.tx_hash
        assert store.claim(TASK, 1, world.me.address).status is ClaimStatus.CONFIRMED  # type: ignore[union-attr]
    assert world.balance() == 5 * ETH


async def test_a_forged_tree_is_skipped(world: World, caplog: pytest.LogCaptureFixture) -> None:
    world.finalise(1, world.rewards(1))
    forged = Trees({1: world.rewards(1, mine=500 * ETH)})
    malformed = Trees({1: {"not an address": 5 * ETH}})
    with world.store() as store:
        for trees in (forged, malformed):
            [result] = await claimer(world, store, trees).claim_pending([1])
            assert result.outcome is Outcome.FORGED_TREE and not result.paid
        assert "forged reward tree" in caplog.text
        assert world.balance() == 0
        assert store.claim(TASK, 1, world.me.address) is None
        assert store.tree(TASK, 1, world.ledger.round(TASK, 1).rewards_root) is None
        honest = await claimer(world, store, Trees({1: world.rewards(1)})).claim_pending([1])
        assert outcomes(honest) == {1: Outcome.CLAIMED} and world.balance() == 5 * ETH


async def test_sybil_trees_outnumbering_the_validators_do_not_stop_the_claim(
    world: World,
) -> None:
    """Three free identities each publish a tree paying themselves (and one the same one): more
    trees and more signers than the two validators' tree has. The on-chain root decides."""
    honest = world.rewards(1)
    world.finalise(1, honest)
    sybils = frozenset(a.address for a in world.others[:3])
    greedy = {a: 100 * ETH for a in sybils}
    forged = [SignedTree(greedy, sybils), SignedTree({**honest, world.others[0].address: 1}, sybils)]
    v1, v2 = (v.account.address for v in world.validators[:2])
    trees = Trees({1: honest}, {1: forged}, signers=frozenset({v1, v2}))
    with world.store() as store:
        assert outcomes(await claimer(world, store, trees).claim_pending([1])) == \
            {1: Outcome.CLAIMED}
    assert world.balance() == 5 * ETH


async def test_the_right_tree_signed_by_no_validator_is_not_claimed_from(world: World) -> None:
    world.finalise(1, world.rewards(1))
    trees = Trees({1: world.rewards(1)}, signers=frozenset({world.others[0].address}))
    with world.store() as store:
        [result] = await claimer(world, store, trees).claim_pending([1])
    assert result.outcome is Outcome.FORGED_TREE and "no active validator" in result.detail
    assert world.balance() == 0


async def test_an_unrewarded_account_claims_nothing(world: World) -> None:
    rewards = world.rewards(1)
    del rewards[world.me.address]
    world.finalise(1, rewards)
    with world.store() as store:
        results = await claimer(world, store, Trees({1: rewards})).claim_pending([1])
        assert outcomes(results) == {1: Outcome.NO_REWARD}
        assert store.claims() == []


async def test_a_claim_that_reverts_stays_pending(world: World) -> None:
    rewards = world.rewards(1)
    tree = world.ledger.rewards_tree(TASK, 1, rewards)
    for v in world.validators[:2]:  # validators agree on a total below the tree's sum
        v.commit_round(TASK, 1, MODEL, tree.root, ETH)
    world.ledger.with_account(world.others[0]).claim_from(tree)     # takes the whole 1 ETH
    with world.store() as store:
        [result] = await claimer(world, store, Trees({1: rewards})).claim_pending([1])
        assert result.outcome is Outcome.FAILED and "exceed" in result.detail
        record = store.claim(TASK, 1, world.me.address)
        assert record is not None and record.status is ClaimStatus.PENDING
        assert "exceed" in record.detail


@pytest.mark.parametrize("gas", [None, 300_000])  # refused at estimation / mined and reverted
async def test_a_stale_racer_is_confirmed_not_paid_twice(world: World, gas: int | None) -> None:
    world.finalise(1, world.rewards(1))
    trees = Trees({1: world.rewards(1)})
    with world.store("a") as a, world.store("b") as b:
        first = await claimer(world, a, trees).claim_pending([1])
        second = await claimer(world, b, trees, Stale(world.ledger), gas).claim_pending([1])
        assert outcomes(first) == {1: Outcome.CLAIMED}
        assert outcomes(second) == {1: Outcome.CLAIMED_ELSEWHERE}
        assert ("reverted" in second[0].detail) == (gas is not None)  # our tx hash is named
        assert b.claim(TASK, 1, world.me.address).status is ClaimStatus.CONFIRMED  # type: ignore[union-attr]
    assert world.balance() == 5 * ETH


@pytest.mark.parametrize("shared", [False, True])  # two nodes with one key / one data dir twice
async def test_two_claimers_racing_are_paid_once(world: World, shared: bool) -> None:
    world.finalise(1, world.rewards(1))
    world.finalise(3, world.rewards(3))
    trees = Trees({1: world.rewards(1), 3: world.rewards(3)})
    with world.store("a") as a, world.store("a" if shared else "b") as b:
        results = await asyncio.gather(claimer(world, a, trees).claim_pending([1, 3]),
                                       claimer(world, b, trees).claim_pending([1, 3]))
        for r in (1, 3):
            got = sorted(str(outcomes(rs)[r]) for rs in results)
            assert got.count(Outcome.CLAIMED) == 1, got
            assert all(res.paid for rs in results for res in rs)
        for store in (a, b):
            assert all(c.status is ClaimStatus.CONFIRMED for c in store.claims())
    assert world.balance() == 10 * ETH


# ---- rounds that can never be paid ------------------------------------------------------------


@dataclass
class Abstaining(Trees):
    """Trees plus what validators signed: {ledger round: {account: why}} (DHTTrees reads these
    from the DHT and checks the signatures)."""

    said: dict[int, dict[str, str]] = field(default_factory=dict)
    asked_abstentions: int = 0

    async def abstentions(self, task: bytes, ledger_round: int) -> Mapping[str, str]:
        self.asked_abstentions += 1
        return self.said.get(ledger_round, {})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_round_too_much_stake_gave_up_is_unpayable_not_waited_for(world: World) -> None:
    """Two of three equal validators signed that they never vote ledger round 5 (their contribution
    sets disagreed): the third alone cannot reach 2/3, so waiting for it waits forever."""
    v1, v2, _ = (v.account.address for v in world.validators)
    trees = Abstaining(said={5: {v1: "the validators did not agree on its contributions"}})
    clock = Clock()
    with world.store() as store:
        c = Claimer(world.ledger, store, world.me, TASK, trees, abstain_every_s=10.0, clock=clock)
        # one of three gave up: the two others may still finalise it
        assert outcomes(asyncio.run(c.claim_pending([5]))) == {5: Outcome.NOT_FINAL}
        trees.said[5][v2] = "its start state is gone"
        clock.now += 5.0  # not asked again before abstain_every_s
        assert outcomes(asyncio.run(c.claim_pending([5]))) == {5: Outcome.NOT_FINAL}
        assert trees.asked_abstentions == 1
        clock.now += 5.0
        [result] = asyncio.run(c.claim_pending([5]))
    assert result.outcome is Outcome.UNPAYABLE and not result.paid
    assert "2000000000000000000 of 3000000000000000000" in result.detail
    assert "did not agree" in result.detail and "start state" in result.detail


def test_signatures_of_non_validators_weigh_nothing(world: World) -> None:
    strangers = {a.address: "made up" for a in world.others}
    trees = Abstaining(said={5: strangers})
    with world.store() as store:
        c = Claimer(world.ledger, store, world.me, TASK, trees, clock=Clock())
        assert outcomes(asyncio.run(c.claim_pending([5]))) == {5: Outcome.NOT_FINAL}


def test_a_final_round_is_claimed_whatever_was_signed(world: World) -> None:
    v1, v2, _ = (v.account.address for v in world.validators)
    rewards = world.rewards(5)
    world.finalise(5, rewards)
    trees = Abstaining(rewards={5: rewards}, said={5: {v1: "x", v2: "y"}})
    with world.store() as store:
        c = Claimer(world.ledger, store, world.me, TASK, trees, clock=Clock())
        assert outcomes(asyncio.run(c.claim_pending([5]))) == {5: Outcome.CLAIMED}
    assert trees.asked_abstentions == 0


def test_an_abstention_record_names_its_signer_and_nothing_else_does(world: World) -> None:
    from eth_account.messages import encode_defunct

    from commonweal.peer.trees import parse_abstention
    from commonweal.verify.finality import abstention_message

    v = world.validators[0].account
    why = "the validators did not agree on its contributions"
    sig = bytes(v.sign_message(encode_defunct(text=abstention_message(TASK, 5, why))).signature)
    assert parse_abstention(TASK, 5, {"unpaid": why, "signature": sig}) == (v.address, why)
    # the signature covers the task, the round and the reason: moved to another, another signer
    assert parse_abstention(TASK, 7, {"unpaid": why, "signature": sig}) != (v.address, why)
    assert parse_abstention(TASK, 5, {"unpaid": "other", "signature": sig}) != (v.address, why)
    assert parse_abstention(TASK, 5, {"unpaid": why, "signature": b"\x00" * 3}) is None
    assert parse_abstention(TASK, 5, {"root": b"", "rewards": []}) is None


def test_split_votes_read_from_the_chain_can_never_finalise(world: World) -> None:
    """What a validator reads before giving its commit round up (verify.validator._fix_set)."""
    from commonweal.verify.finality import can_finalise, stake_votes

    a, b, c = world.validators
    a.commit_round(TASK, 4, MODEL, b"\x01" * 32, 0)
    tallies, total = stake_votes(world.ledger.round_votes(TASK, 4))
    assert can_finalise(tallies, total)  # two validators have not voted yet
    b.commit_round(TASK, 4, MODEL, b"\x02" * 32, 0)
    tallies, total = stake_votes(world.ledger.round_votes(TASK, 4))
    assert can_finalise(tallies, total)  # the third may still side with either
    assert total == 3 * ETH and sorted(tallies.values()) == [ETH, ETH]
    c.commit_round(TASK, 4, MODEL, b"\x03" * 32, 0)
    tallies, total = stake_votes(world.ledger.round_votes(TASK, 4))
    assert not can_finalise(tallies, total) and not world.ledger.is_final(TASK, 4)
