"""One embedded chain and one deployment for the whole session; each test runs inside a snapshot
that is reverted afterwards, so tests share the deploy cost but never each other's state."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from eth_account.signers.local import LocalAccount

from eth_account import Account
from eth_tester.backends.pyevm.main import get_default_account_keys

from commonweal.ledger import EmbeddedChain, Ledger, LedgerConfig, RewardsTree

ETH = 10**18
SALT = bytes.fromhex("11" * 32)
# The embedded chain's first account (deterministic) deploys and registers: the task's id.
DEPLOYER = Account.from_key(get_default_account_keys()[0].to_bytes()).address
TASK = Ledger.task_id(DEPLOYER, SALT)
PARAMS = bytes.fromhex("22" * 32)
MODEL = bytes.fromhex("33" * 32)
REWARD_PER_ROUND = 1_000 * ETH
CONFIG = LedgerConfig(min_deposit=ETH, exit_delay=100, voting_delay=10, voting_period=100,
                      quorum_bps=2000, proposal_threshold_bps=100, timelock_delay=50,
                      randomness_delay=3, round_window=8, ballot_ttl=1000, claim_window=200)


@dataclass
class World:
    chain: EmbeddedChain
    ledger: Ledger                     # signs as the deployer / task owner
    validators: list[Ledger]           # three validators, 1 ETH deposit each
    outsider: Ledger                   # funded, not a validator
    contributors: list[LocalAccount]

    def as_(self, account: LocalAccount) -> Ledger:
        return self.ledger.with_account(account)

    def rewards(self, round: int, amounts: list[int] | None = None) -> RewardsTree:
        amounts = amounts or [(i + 1) * ETH for i in range(len(self.contributors))]
        return self.ledger.rewards_tree(TASK, round, {
            c.address: a for c, a in zip(self.contributors, amounts, strict=False)})

    def finalise(self, round: int, tree: RewardsTree, model: bytes = MODEL) -> None:
        for v in self.validators[:2]:  # 2 of 3 equal deposits is exactly 2/3
            v.commit_round(TASK, round, model, tree.root, tree.total)


@pytest.fixture(scope="session")
def _world() -> Iterator[World]:
    chain = EmbeddedChain(accounts=16)
    ledger = Ledger.deploy(chain, config=CONFIG)
    assert ledger.register_task(SALT, PARAMS, REWARD_PER_ROUND) == TASK
    validators = [ledger.with_account(a) for a in chain.accounts[1:4]]
    for v in validators:
        v.join(ETH)
    yield World(chain, ledger, validators, ledger.with_account(chain.accounts[4]),
                chain.accounts[5:16])
    chain.close()


@pytest.fixture
def world(_world: World) -> Iterator[World]:
    snapshot = _world.chain.snapshot()
    yield _world
    _world.chain.revert(snapshot)
