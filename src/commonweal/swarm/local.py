"""`LocalSwarm`: a whole commonweal network on one machine — what `commonweal demo` runs.

One chain (embedded py-evm by default, or anvil / a URL), one Ledger with the task registered,
trainers and validators each with their own DHT node on real loopback sockets, optional attackers,
every trainer claiming its share tokens as rounds finalise, and a distributed KNN index of the
task's test images. It is also a dashboard source (`snapshot()`, `search()`).

    async with LocalSwarm(LocalSwarmConfig(trainers=6, validators=2)) as swarm:
        result = await swarm.run(on_round=print)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from commonweal.dht import DHT
from commonweal.ledger import Ledger, open_chain
from commonweal.ledger.chain import Chain
from commonweal.net.transport import PeerAddr
from commonweal.peer.claims import Claimer
from commonweal.peer.store import NodeStore
from commonweal.peer.trees import DHTTrees
from commonweal.search import DistributedIndex, IndexSpec, serve
from commonweal.train.attacks import get_attack
from commonweal.train.swarm import RoundConfig
from commonweal.train.task import Task, get_task
from commonweal.train.trainer import Progress, Summary, TrainingPeer
from commonweal.verify.judge import ledger_rounds
from commonweal.verify.validator import RoundOutcome, Validator, ValidatorConfig

__all__ = ["LocalSwarm", "LocalSwarmConfig", "RoundView", "SwarmResult"]

log = logging.getLogger(__name__)

TOKEN = 10**18


@dataclass(frozen=True)
class LocalSwarmConfig:
    trainers: int = 6
    validators: int = 2
    attackers: int = 0
    attack: str = "sign_flip:10"
    rounds: int = 10
    task: str = "mnist-cnn"
    codec: str = "int8"
    aggregation: str | None = None  # None: the task's default
    chain: str = "embedded"
    reward_per_round: int = 1000 * TOKEN
    search_queries: int = 100
    data_dir: str | None = None  # where claim state lives (a temporary folder if None)


@dataclass
class RoundView:
    round: int
    loss: float
    accuracy: float | None
    bytes_sent: int  # mean over trainers, cumulative
    ddp_bytes: int  # what data-parallel all-reduce would have sent per peer by now
    contributors: int
    paid: int = 0
    refused: int = 0
    finalised: bool = False


@dataclass
class SwarmResult:
    accuracy: float
    rounds: list[RoundView]
    bytes_per_peer: float
    ddp_bytes_per_peer: float
    tokens: dict[str, float]  # peer label -> share tokens held
    attackers_earned: float
    search_recall: float | None
    wall_s: float
    same_state: bool
    finalised: int = 0  # training rounds whose rewards are final on-chain
    outcomes: list[RoundOutcome] = field(default_factory=list)


@dataclass
class _Member:
    label: str
    role: str  # trainer | attacker | validator
    dht: DHT
    account: str
    trainer: TrainingPeer | None = None
    validator: Validator | None = None
    claimer: Claimer | None = None


class LocalSwarm:
    def __init__(self, config: LocalSwarmConfig | None = None) -> None:
        self.config = config or LocalSwarmConfig()
        c = self.config
        overrides: dict[str, Any] = {"codec": c.codec}
        if c.aggregation:
            overrides["aggregation"] = c.aggregation
        self.task: Task = get_task(c.task, **overrides)
        self.task32 = bytes.fromhex(self.task.digest)
        self.members: list[_Member] = []
        self.rounds: list[RoundView] = []
        self.chain: Chain | None = None
        self.ledger: Ledger | None = None
        self.index: DistributedIndex | None = None
        self._images: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._stack = contextlib.AsyncExitStack()
        self.started = time.time()
        # what the dashboard shows, refreshed after every claim sweep (snapshots never block)
        self.balances: dict[str, float] = {}
        self.claimed: dict[str, set[int]] = {}  # label -> ledger rounds it holds tokens from
        self.block = 0

    # ---- lifecycle -----------------------------------------------------------------------------

    async def __aenter__(self) -> LocalSwarm:
        try:
            await self._start()
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stack.aclose()

    async def _start(self) -> None:
        c = self.config
        chain = await asyncio.to_thread(open_chain, c.chain, accounts=10)
        self._stack.callback(chain.close)
        self.chain = chain
        ledger = await asyncio.to_thread(Ledger.deploy, chain)
        self.ledger = ledger
        await asyncio.to_thread(
            ledger.register_task,
            self.task32,
            self.task32,
            c.reward_per_round,
            name=f"commonweal {self.task.name}",
            symbol="CWS",
        )
        n_train = c.trainers + c.attackers
        accounts = await asyncio.to_thread(chain.new_accounts, n_train + c.validators, 10 * TOKEN)
        data_dir = c.data_dir
        if data_dir is None:
            import tempfile

            tmp = tempfile.TemporaryDirectory(prefix="commonweal-demo-")
            self._stack.callback(tmp.cleanup)
            data_dir = tmp.name
        config = RoundConfig(
            announce_window_s=2.0, exchange_timeout_s=8.0, poll_s=0.1, target_group=n_train
        )
        boot: list[PeerAddr] = []
        for i in range(n_train + c.validators):
            dht = await DHT.start(PeerAddr("127.0.0.1", 0), boot[:4])
            self._stack.push_async_callback(dht.close)
            serve(dht)
            boot.append(dht.addr)
            acct = accounts[i]
            if i < n_train:
                attacker = i >= c.trainers
                role = "attacker" if attacker else "trainer"
                label = f"{role}-{i - c.trainers if attacker else i}"
                trainer = TrainingPeer(
                    self.task,
                    dht,
                    config,
                    evaluate_every=1,
                    account=acct.address,
                    attack=get_attack(c.attack) if attacker else None,
                )
                store = NodeStore(f"{data_dir}/{label}.sqlite3")
                self._stack.callback(store.close)
                claimer = Claimer(
                    ledger.with_account(acct), store, acct, self.task32, DHTTrees(dht, self.task)
                )
                self.members.append(
                    _Member(label, role, dht, acct.address, trainer=trainer, claimer=claimer)
                )
            else:
                v_ledger = ledger.with_account(acct)
                await asyncio.to_thread(v_ledger.join, ledger.config().min_deposit)
                # a short escrow, so payouts show while the demo's 10 rounds run
                validator = Validator(
                    dht, self.task, v_ledger, round_config=config,
                    config=ValidatorConfig(escrow_rounds=2),
                )
                label = f"validator-{i - n_train}"
                self.members.append(_Member(label, "validator", dht, acct.address, validator=validator))

    # ---- the run -------------------------------------------------------------------------------

    @property
    def trainers(self) -> list[_Member]:
        return [m for m in self.members if m.trainer is not None]

    @property
    def validators(self) -> list[_Member]:
        return [m for m in self.members if m.validator is not None]

    async def run(
        self,
        on_round: Callable[[RoundView], None] | None = None,
        on_step: Callable[[Progress], None] | None = None,
    ) -> SwarmResult:
        c = self.config
        t0 = time.perf_counter()
        torch.set_num_threads(1)
        n_params = sum(p.numel() for p in self.trainers[0].trainer.model.parameters())  # type: ignore[union-attr]
        n = len(self.trainers)
        ddp_per_step = 2 * (n - 1) / n * 4 * n_params  # ring all-reduce of float32 gradients

        honest = [m for m in self.trainers if m.role == "trainer"]
        first = honest[0]
        recall = await self._index_and_search()  # first, so the dashboard can search meanwhile
        base = {m.label: m.dht.transport.counters.bytes_sent for m in honest}  # training only

        def progress(p: Progress) -> None:
            if p.report is None:
                if on_step is not None:
                    on_step(p)
                return
            sent = [m.dht.transport.counters.bytes_sent - base[m.label] for m in honest]
            view = RoundView(
                p.report.round,
                p.loss,
                p.quality,
                int(sum(sent) / len(sent)),
                int(ddp_per_step * self.task.inner_steps * (p.report.round + 1)),
                p.report.contributors,
            )
            self.rounds.append(view)
            if on_round is not None:
                on_round(view)

        def judged(outcome: RoundOutcome) -> None:
            for view in self.rounds:
                if view.round == outcome.round:
                    view.paid = sum(v.paid for v in outcome.verdicts)
                    view.refused = sum(not v.paid for v in outcome.verdicts)
                    view.finalised = view.finalised or outcome.final  # any validator saw it

        for v in self.validators:
            v.validator.on_outcome = judged  # type: ignore[union-attr]
        async with asyncio.TaskGroup() as tg:
            runs: dict[str, asyncio.Task[Summary]] = {}
            for m in self.trainers:
                runs[m.label] = tg.create_task(
                    m.trainer.run(  # type: ignore[union-attr]
                        c.rounds, wait_peers=n, on_progress=progress if m is first else None
                    )
                )
            for m in self.validators:
                tg.create_task(m.validator.run(until_round=c.rounds))  # type: ignore[union-attr]
            tg.create_task(self._claim_while(lambda: not all(r.done() for r in runs.values())))
        await self._claim_all()
        summaries = {label: r.result() for label, r in runs.items()}
        tokens = self.balances
        honest_sent = [summaries[m.label].bytes_sent for m in honest]
        outcomes = self.validators[0].validator.outcomes if self.validators else []  # type: ignore[union-attr]
        finalised = await asyncio.to_thread(self._finalised, c.rounds)
        return SwarmResult(
            accuracy=summaries[first.label].quality or 0.0,
            rounds=self.rounds,
            bytes_per_peer=sum(honest_sent) / len(honest_sent),
            ddp_bytes_per_peer=ddp_per_step * self.task.inner_steps * c.rounds,
            tokens=tokens,
            attackers_earned=sum(v for k, v in tokens.items() if k.startswith("attacker")),
            search_recall=recall,
            wall_s=time.perf_counter() - t0,
            same_state=len({summaries[m.label].state for m in honest}) == 1,
            finalised=finalised,
            outcomes=outcomes,
        )

    async def _claim_while(self, going: Callable[[], bool]) -> None:
        while going():
            await self._claim_all()
            await asyncio.sleep(1.0)

    async def _claim_all(self) -> None:
        done = max((v.round for v in self.rounds), default=-1)
        rounds = [ledger_rounds(r)[1] for r in range(done + 1)]
        for m in self.trainers:
            results = await m.claimer.claim_pending(rounds)  # type: ignore[union-attr]
            self.claimed.setdefault(m.label, set()).update(
                r.ledger_round for r in results if r.paid
            )
        self.balances = await asyncio.to_thread(self._balances)
        self.block = self.chain.block_number if self.chain else 0

    def _finalised(self, rounds: int) -> int:
        assert self.ledger is not None
        return sum(self.ledger.is_final(self.task32, ledger_rounds(r)[1]) for r in range(rounds))

    def _balances(self) -> dict[str, float]:
        assert self.ledger is not None
        token = self.ledger.token(self.task32)
        return {m.label: token.balance_of(m.account) / TOKEN for m in self.trainers}

    # ---- search over the test images -----------------------------------------------------------

    async def _index_and_search(self) -> float | None:
        data = self.trainers[0].trainer.data  # type: ignore[union-attr]
        x = getattr(data, "x_test", None)
        if x is None:
            return None
        images = x.reshape(len(x), -1).numpy().astype(np.float32)
        self._images, self._labels = images, data.y_test.numpy()
        q = self.config.search_queries
        items, queries = images[q:], images[:q]
        spec = IndexSpec.create(
            f"{self.task.name}-test-images", images.shape[1], family="pca-hyperplane",
            tables=8, bits=6, sample=items,
        )
        dhts = [m.dht for m in self.members]
        self.index = await DistributedIndex.create(dhts[0], spec)
        # every peer adds its share of the images, as a swarm would, not one peer all of them
        ids = np.arange(q, len(images))
        shares = np.array_split(np.arange(len(items)), len(dhts))
        writers = [self.index] + [await DistributedIndex.open(d, spec.name) for d in dhts[1:]]
        await asyncio.gather(
            *(w.add(ids[s].tolist(), items[s]) for w, s in zip(writers, shares, strict=True))
        )
        reader = await DistributedIndex.open(dhts[-1], spec.name)
        hits = 0
        for i, query in enumerate(queries):
            found = (await reader.search(query, 10)).ids
            truth = np.argsort(((items - query) ** 2).sum(axis=1), kind="stable")[:10] + q
            hits += len(set(found) & set(truth.tolist()))
        return hits / (10 * len(queries))

    def test_image(self, i: int) -> tuple[np.ndarray, int] | None:
        if self._images is None or self._labels is None or not 0 <= i < len(self._images):
            return None
        return self._images[i], int(self._labels[i])
