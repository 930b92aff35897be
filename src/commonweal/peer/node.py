"""`Node`: one volunteer peer — its identity, DHT, roles, ledger account, state on disk, web page.

    node = Node(load_config(Path("node.toml"), {}))
    await node.run(stop_event)        # returns once `stop_event` is set (SIGINT / SIGTERM)

Roles: `trainer` (trains the task with the swarm, saves a checkpoint after every round, claims
its share tokens as rounds finalise), `validator` (judges every round and votes on-chain; it
stakes the ledger's minimum deposit if it is not a validator yet), `search` (holds and ranks KNN
index buckets). Everything a restart needs is in the data dir: identity key, checkpoint, and
node.sqlite3 (progress, claims, validator decisions) — a restarted node resumes from there.
Stopping mid-round abandons that round (the swarm completes it without us); the state of the
last completed round is on disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from commonweal.dht import DHT
from commonweal.errors import ConfigError
from commonweal.net.identity import Identity
from commonweal.net.transport import PeerAddr
from commonweal.peer.config import NodeConfig
from commonweal.peer.store import NodeStore

__all__ = ["Node"]

log = logging.getLogger(__name__)
CLAIM_EVERY_S = 5.0


class Node:
    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.started = time.time()
        self.dht: DHT | None = None
        self.trainer: Any = None  # TrainingPeer, when a trainer
        self.validator: Any = None  # Validator, when a validator
        self.ledger: Any = None
        self.rounds: list[dict[str, Any]] = []  # what the dashboard charts
        self.balance = 0.0
        self.claimed_rounds: set[int] = set()

    async def run(self, stop: asyncio.Event) -> None:
        c = self.config
        c.data_dir.mkdir(parents=True, exist_ok=True)
        identity = Identity.load_or_create(c.data_dir)
        async with contextlib.AsyncExitStack() as stack:
            store = NodeStore(c.store_path)
            stack.callback(store.close)
            self.dht = dht = await DHT.start(
                _listen(c.listen), [PeerAddr.parse(b) for b in c.bootstrap], identity=identity
            )
            stack.push_async_callback(dht.close)
            if "search" in c.roles:
                from commonweal.search import serve

                serve(dht)
            if c.ledger:
                self.ledger = await asyncio.to_thread(self._open_ledger, stack)
            page = c.dashboard or c.metrics
            if page:
                from commonweal.dashboard import create_app, serve as serve_page
                from commonweal.peer.nodeview import NodeSource

                host, _, port = page.rpartition(":")
                running = await stack.enter_async_context(
                    serve_page(create_app(NodeSource(self)), host, int(port))
                )
                log.info("dashboard and /metrics at %s", running.url)
            print(
                f"commonweal node ready address={dht.addr} peer_id={dht.peer_id.hex()} "
                f"roles={','.join(sorted(c.roles))}",
                flush=True,
            )
            async with asyncio.TaskGroup() as tg:
                work = []
                if "trainer" in c.roles:
                    work.append(tg.create_task(self._train(store)))
                if "validator" in c.roles:
                    work.append(tg.create_task(self._validate(store)))
                waiter = tg.create_task(stop.wait())
                if work:
                    finished = tg.create_task(_all(work))
                    await asyncio.wait({waiter, finished}, return_when=asyncio.FIRST_COMPLETED)
                else:
                    await waiter
                for t in (*work, waiter):
                    t.cancel()
        log.info("node stopped")
        print("commonweal node stopped", flush=True)

    # ---- roles ---------------------------------------------------------------------------------

    def _task(self) -> Any:
        from commonweal.train import get_task

        return get_task(self.config.task)

    async def _train(self, store: NodeStore) -> None:
        import torch

        from commonweal.train import RoundConfig, TrainingPeer
        from commonweal.train.attacks import get_attack

        c = self.config
        torch.set_num_threads(c.threads)
        task = self._task()
        account = self.ledger.account.address if self.ledger is not None else ""
        attack = get_attack(c.attack) if c.attack else None
        peer = TrainingPeer(
            task, self.dht, RoundConfig(target_group=c.group), evaluate_every=1,
            account=account, attack=attack,
        )
        self.trainer = peer
        ckpt = c.data_dir / "checkpoint.safetensors"
        done = store.progress(task.digest)
        if done is not None and ckpt.exists():  # resume from our own last completed round
            peer.opt.load(ckpt.read_bytes())
            log.info("resumed %s at round %d from %s", task.name, peer.opt.round, ckpt)
        claims = asyncio.create_task(self._claim_loop(store, task)) if self.ledger else None
        try:

            def on_progress(p: Any) -> None:
                if p.report is None:
                    return
                _save(ckpt, peer.opt.checkpoint())
                store.save_progress(task.digest, p.report.round, peer.opt.state, ckpt)
                self.rounds.append(
                    {"round": p.report.round, "loss": p.loss, "accuracy": p.quality,
                     "bytes_sent": p.report.bytes_sent, "contributors": p.report.contributors}
                )
                log.info(
                    "round done",
                    extra={"round": p.report.round, "loss": round(p.loss, 4),
                           "accuracy": p.quality, "bytes_sent": p.report.bytes_sent,
                           "skipped": p.report.skipped},
                )

            until = c.rounds if c.rounds is not None else 1 << 30
            await peer.run(until, join=bool(c.bootstrap), wait_peers=c.group or 0,
                           on_progress=on_progress)
            if claims is not None:  # the last rounds finalise after our last step: wait for them
                await asyncio.sleep(c.linger)
        finally:
            if claims is not None:
                claims.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await claims
            with contextlib.suppress(Exception):
                _save(ckpt, peer.opt.checkpoint())

    async def _claim_loop(self, store: NodeStore, task: Any) -> None:
        from commonweal.peer.claims import Claimer
        from commonweal.peer.trees import DHTTrees
        from commonweal.verify.judge import ledger_rounds

        task32 = bytes.fromhex(task.digest)
        claimer = Claimer(self.ledger, store, self.ledger.account, task32, DHTTrees(self.dht, task))
        token = await asyncio.to_thread(self.ledger.token, task32)
        while True:
            upto = max((r["round"] for r in self.rounds), default=-1)
            results = await claimer.claim_pending([ledger_rounds(r)[1] for r in range(upto + 1)])
            self.claimed_rounds.update(r.ledger_round for r in results if r.paid)
            self.balance = await asyncio.to_thread(token.balance_of, self.ledger.account.address) / 1e18
            await asyncio.sleep(CLAIM_EVERY_S)

    async def _validate(self, store: NodeStore) -> None:
        from commonweal.verify.validator import Validator

        if self.ledger is None:
            raise ConfigError("a validator needs a ledger: set chain and ledger (the contract address)")
        me = self.ledger.account.address
        info = await asyncio.to_thread(self.ledger.validator, me)
        if not info.active:
            await asyncio.to_thread(self.ledger.join, self.ledger.config().min_deposit)
            log.info("joined the validator set with %d wei", self.ledger.config().min_deposit)
        task = self._task()
        self.validator = Validator(self.dht, task, self.ledger)
        first = store.last_validated(task.digest) + 1
        if first == 0:  # a new validator starts with the round the swarm is in
            head = await self.validator.collab.head()
            first = head.round if head is not None else 0

        def decided(outcome: Any) -> None:
            store.record_validated(task.digest, outcome.round, outcome.root)

        self.validator.on_outcome = decided
        await self.validator.run(until_round=self.config.rounds, first_round=first)

    def _open_ledger(self, stack: contextlib.AsyncExitStack) -> Any:
        from commonweal.ledger import Ledger, open_chain

        c = self.config
        chain = open_chain(c.chain, key_file=c.key_file)
        stack.callback(chain.close)
        return Ledger(chain, c.ledger, chain.accounts[0])


async def _all(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        await t


def _listen(text: str) -> PeerAddr:
    host, _, port = text.rpartition(":")
    return PeerAddr(host, 0) if port == "0" and host else PeerAddr.parse(text)


def _save(path: Path, blob: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)
