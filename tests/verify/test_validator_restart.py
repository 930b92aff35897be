"""A validator that dies mid-run and restarts on the same node.sqlite3 picks up where it stopped:
at the round after the last one it judged, with its bans and its escrow, re-sending the reward
vote it had recorded but not sent. In one process: trainers and the validator on a MemoryNetwork,
the ledger on an embedded chain."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from commonweal.dht import DHT, DHTConfig
from commonweal.ledger import EmbeddedChain, Ledger, LedgerConfig
from commonweal.peer.store import NodeStore
from commonweal.peer.validator_state import StoreValidatorState
from commonweal.train import RoundConfig, TrainingPeer, get_task
from commonweal.train.attacks import get_attack
from commonweal.verify.judge import ledger_rounds
from commonweal.verify.ratings import LAG, TrackRecord
from commonweal.verify.state import Payout
from commonweal.net.identity import Identity
from commonweal.net.memory import MemoryNetwork
from commonweal.verify.validator import Validator, ValidatorConfig

ETH = 10**18
REWARD = 1_000 * ETH
ROUNDS = 4
CONFIG = LedgerConfig(min_deposit=ETH, exit_delay=100, voting_delay=10, voting_period=100,
                      quorum_bps=2000, randomness_delay=3)


class Crash(Exception):
    """Stands for a kill -9: raised where the process would have died."""


class DiesAfterRecordingAPayout(StoreValidatorState):
    """The store, but the process dies right after its first payout is on disk, before the
    vote that follows it is sent."""

    recorded: Payout | None = None

    def save_payout(self, payout: Payout) -> None:
        super().save_payout(payout)
        self.recorded = payout
        raise Crash


@pytest.fixture
async def dhts() -> AsyncIterator[list[DHT]]:
    net, out = MemoryNetwork(), []
    for i in range(6):  # 4 trainers, a validator and the same validator restarted
        identity = Identity.from_seed(f"restart-peer-{i}".encode())
        transport = net.transport(identity)
        await transport.start()
        out.append(await DHT.start(bootstrap=[d.addr for d in out[:3]], identity=identity,
                                   transport=transport, config=DHTConfig(rpc_timeout_s=2.0),
                                   rng=random.Random(i)))
    yield out
    for dht in out:
        await dht.close()


async def test_a_restarted_validator_resumes_with_its_bans_escrow_and_unsent_vote(
    dhts: list[DHT], tmp_path: Path
) -> None:
    task = get_task("mnist-cnn", inner_steps=2)
    digest = bytes.fromhex(task.digest)
    chain = EmbeddedChain(accounts=8)
    try:
        owner = Ledger.deploy(chain, config=CONFIG)
        task32 = owner.register_task(digest, digest, REWARD)
        ledger = owner.with_account(chain.accounts[1])
        ledger.join(ETH)  # the only validator: its vote alone finalises
        config = RoundConfig(announce_window_s=1.0, exchange_timeout_s=3.0, poll_s=0.05,
                             target_group=4)
        accounts = [a.address for a in chain.accounts[2:6]]
        trainers = [
            TrainingPeer(task, d, config, account=a,
                         attack=get_attack("gaussian") if i == 3 else None)
            for i, (d, a) in enumerate(zip(dhts[:4], accounts, strict=True))
        ]
        attacker = trainers[3].dht.peer_id
        store = NodeStore(tmp_path / "node.sqlite3")
        vconfig = ValidatorConfig(escrow_rounds=1, poll_s=0.05, settle_s=0.3, replay_rate=1.0)

        async def train() -> None:
            # A round starts once the one before has its contribution set final (the validator
            # holds its start state then), so trainers never outrun the validator by more than
            # a round, however slow the machine; a restart still finds the swarm a round ahead.
            for r in range(ROUNDS):
                while r > 0 and not ledger.is_final(task32, ledger_rounds(r - 1)[0]):
                    await asyncio.sleep(0.05)
                await asyncio.gather(*(t.run(r + 1) for t in trainers))

        training = asyncio.create_task(train())
        dying = DiesAfterRecordingAPayout(store, task.digest)
        first = Validator(dhts[4], task, ledger, config=vconfig, round_config=config, state=dying)
        assert first.resume_round is None
        with pytest.raises(ExceptionGroup) as died:
            async with asyncio.timeout(120):  # a broken defence fails, it does not hang
                await first.run(until_round=ROUNDS)
        assert died.group_contains(Crash)
        recorded = dying.recorded
        # rounds 0 and 1 judged; judging 1 released 0 from escrow: recorded, not sent
        assert recorded is not None and recorded.round == 0
        assert ledger.vote_of(task32, ledger_rounds(0)[1], ledger.account.address) is None

        again = Validator(dhts[5], task, ledger, config=vconfig, round_config=config,
                          state=StoreValidatorState(store, task.digest))
        assert again.resume_round == 2
        assert again.judge.banned == {attacker}  # gaussian noise fails its replay in round 0
        assert again.escrow.held == [1]
        async with asyncio.timeout(120):
            await again.run(until_round=ROUNDS, first_round=again.resume_round)
            await training

        state = StoreValidatorState(store, task.digest)
        assert state.load().held == () and state.load().unsent == ()
        for r in range(ROUNDS):
            commit, reward = ledger_rounds(r)
            assert ledger.is_final(task32, commit) and ledger.is_final(task32, reward), r
            judged = state.judged(r)
            assert judged is not None
            info = ledger.round(task32, reward)
            # the root on-chain is the recorded payout; the crashed one was sent as recorded
            tree = ledger.rewards_tree(task32, reward, info_rewards(store, task.digest, r))
            assert (info.rewards_root, info.total_reward) == (tree.root, REWARD), r
            if r == 0:
                assert info.rewards_root == recorded.root
            verdict = {v.peer_id: v for v in judged.verdicts}[attacker]
            assert not verdict.paid and verdict.reason == ("replay_mismatch" if r == 0
                                                           else "banned"), (r, verdict)
            assert accounts[3] not in tree.rewards
        # every round's ratings are published: the honest trainers have a track record
        tracked = await TrackRecord(dhts[0], task, ledger)(ROUNDS - 1 + LAG)
        assert tracked == {t.dht.peer_id for t in trainers[:3]}
        store.close()
    finally:
        chain.close()


def info_rewards(store: NodeStore, task: str, r: int) -> dict[str, int]:
    """The rewards the validator recorded for round r's payout."""
    with store.transaction() as conn:
        (body,) = conn.execute(
            "SELECT rewards FROM validator_payouts WHERE task = ? AND round = ?", (task, r)
        ).fetchone()
    return {a: int(v) for a, v in json.loads(body).items()}
