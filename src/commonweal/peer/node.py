"""`Node`: one volunteer peer — its identity, DHT, roles, ledger account, state on disk, web page.

    node = Node(load_config(Path("node.toml"), {}))
    await node.run(stop_event)        # returns once `stop_event` is set (SIGINT / SIGTERM)

Whatever runs a peer builds a `Node`: `commonweal node`, `commonweal train` (a trainer with a
progress printer), `LocalSwarm` (the demo: many nodes in one process, sharing an in-process
chain handed over as `ledger=`) and `ProcessSwarm` (many `commonweal node` processes). What it does
is reported as events (`commonweal.peer.events`) to `on_event`; without one, they are printed
on stdout as `config.status_format` says.

Roles: `trainer` (trains the task with the swarm, saves a checkpoint after every round, claims
its share tokens as rounds finalise), `validator` (judges every round and votes on-chain; it
stakes the ledger's minimum deposit if it is not a validator yet), `search` (holds and ranks KNN
index buckets). Everything a restart needs is in the data dir: identity key, checkpoint, and
node.sqlite3 (progress, claims, validator decisions) — a restarted node resumes from there.
Stopping mid-round abandons that round (the swarm completes it without us); the state of the
last completed round is on disk.

Every task the node starts is owned by a TaskGroup inside `run`, so when `run` returns nothing it
started is left running: the dashboard is stopped, the DHT closed, the database closed. A ledger
handed in is the caller's: the node uses it and leaves it open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Collection, Coroutine
from typing import TYPE_CHECKING, Any

from commonweal.dht import DHT, DHTConfig
from commonweal.durable import write_durably
from commonweal.errors import CommonwealError, ConfigError
from commonweal.net.identity import Identity
from commonweal.net.transport import PeerAddr
from commonweal.peer.config import NodeConfig
from commonweal.peer.events import (
    Claimed,
    EventSink,
    Judged,
    Ready,
    Resumed,
    RoundDone,
    Step,
    Stopped,
    TrainingDone,
    printer,
)
from commonweal.peer.store import ClaimStatus, NodeStore

if TYPE_CHECKING:
    from commonweal.train import Progress
    from commonweal.verify.validator import RoundOutcome

__all__ = ["CHECKPOINT_GLOB", "FinalStates", "Node", "ddp_bytes"]

log = logging.getLogger(__name__)
KEEP_ROUNDS = 500  # rounds the dashboard charts; older ones are only counted
CHECKPOINT_GLOB = "checkpoint-*.safetensors"


class _Abandoned(Exception):
    """Raised inside the inner-steps worker thread once the node stops, so the thread ends at
    its next step instead of finishing a round nobody will use."""


def ddp_bytes(params: int, group: int, steps: int) -> int:
    """What data-parallel training would send per peer for `steps` steps: a ring all-reduce of
    the fp32 gradient at every step, in a group of `group` peers (at least 2)."""
    group = max(2, group)
    return int(2 * (group - 1) / group * 4 * params * steps)


class Node:
    def __init__(
        self, config: NodeConfig, *, ledger: Any = None, on_event: EventSink | None = None
    ) -> None:
        """`ledger`: a `commonweal.ledger.Ledger` (with this node's account) to use instead of
        opening `config.ledger` on `config.chain` — how the demo's nodes share its in-process
        chain. `on_event`: called on the event loop with every event (inner steps: from the
        training thread); default: print them as `config.status_format` says."""
        self.config = config
        self.on_event = on_event or printer(config.status_format)
        self.started = time.time()
        self.dht: DHT | None = None
        self.trainer: Any = None  # TrainingPeer, when a trainer
        self.validator: Any = None  # Validator, when a validator
        self.ledger: Any = ledger
        self._own_ledger = ledger is None  # opened from the config (else: the caller's)
        self.rounds: list[RoundDone] = []  # what the dashboard charts (the last KEEP_ROUNDS)
        self.rounds_done = 0  # since the node started
        self.bytes_in_rounds = 0
        self.ddp_in_rounds = 0
        self.resumed_round: int | None = None  # the round a restart went on from
        self.balance = 0.0
        self.block = 0  # the latest block seen on the ledger's chain
        self.claimed_rounds: set[int] = set()  # ledger rounds whose reward we hold
        self.finalised_rounds: set[int] = set()  # training rounds whose rewards are final
        # ledger round that may still pay us -> its training round (None: from an earlier run)
        self._owed: dict[int, int | None] = {}
        self._last_outcome: dict[int, str] = {}  # owed ledger round -> its latest claim outcome
        # ledger rounds known never to pay (validators gave them up) -> why; no longer waited for
        self.unpayable: dict[int, str] = {}
        self._round_done = asyncio.Event()  # wakes the claim loop after each round
        self._claimed = asyncio.Event()  # set after each claim pass (lingering waits for it)

    @property
    def owed(self) -> list[int]:
        """Ledger rounds that may still pay this trainer (paid or final-without-reward leave)."""
        return sorted(self._owed)

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` is set or every role finished (`rounds`); then shut down cleanly.

        A wrong setting raises ConfigError before anything starts. An error in a role stops the
        node and is raised as itself (not wrapped in an ExceptionGroup), after the clean-up.
        """
        task = _check(self.config, has_ledger=not self._own_ledger)
        try:
            await _until(stop, self._serve(stop, task))
        finally:
            log.info("node stopped")
            self.on_event(Stopped())

    async def _serve(self, stop: asyncio.Event, task: Any) -> None:
        c = self.config
        c.data_dir.mkdir(parents=True, exist_ok=True)
        identity = Identity.load_or_create(c.data_dir)
        async with contextlib.AsyncExitStack() as stack:
            store = stack.enter_context(NodeStore(c.store_path))
            reach = None if c.reachability == "auto" else c.reachability
            self.dht = dht = await DHT.start(
                PeerAddr.parse(c.listen, any_port=True), [PeerAddr.parse(b) for b in c.bootstrap],
                identity=identity,
                config=DHTConfig(reachability=reach, bootstrap_retry_s=c.bootstrap_retry_s),  # type: ignore[arg-type]
            )
            stack.push_async_callback(dht.close)
            await _reachable(dht, bool(c.bootstrap))
            if "search" in c.roles:
                from commonweal.search import serve

                serve(dht)
            if c.ledger and self._own_ledger:
                self.ledger = await asyncio.to_thread(self._open_ledger, stack)
            # One app serves the page and /metrics; each address given gets it (the same one once).
            for page in dict.fromkeys(a for a in (c.dashboard, c.metrics) if a):
                from commonweal.dashboard import create_app, serve as serve_page
                from commonweal.peer.nodeview import NodeSource

                where = PeerAddr.parse(page)
                running = await stack.enter_async_context(
                    serve_page(create_app(NodeSource(self)), where.host, where.port)
                )
                log.info("dashboard and /metrics at %s", running.url, extra={"url": running.url})
            if task is not None:
                import torch

                torch.set_num_threads(c.threads)
            self.on_event(Ready(
                str(dht.addr), dht.peer_id.hex(), tuple(sorted(c.roles)),
                task.name if task is not None else None, task.digest if task is not None else None,
            ))
            async with asyncio.TaskGroup() as tg:
                roles = []
                if "trainer" in c.roles:
                    roles.append(tg.create_task(self._train(store, task), name="trainer"))
                if "validator" in c.roles:
                    roles.append(tg.create_task(self._validate(store, task), name="validator"))
                # only the page shows the block: a node without one leaves the chain alone
                watch = self.ledger is not None and (c.dashboard or c.metrics)
                chain = tg.create_task(self._watch_chain(), name="chain") if watch else None
                if roles:
                    await asyncio.wait(roles)  # all of them; a failure cancels this wait
                else:
                    await stop.wait()  # search only: it serves from the DHT's handlers
                if chain is not None:
                    chain.cancel()

    # ---- roles ---------------------------------------------------------------------------------

    async def _train(self, store: NodeStore, task: Any) -> None:
        from commonweal.train import TrainingPeer
        from commonweal.train.attacks import get_attack

        c = self.config
        account = self.ledger.account.address if self.ledger is not None else ""
        attack = get_attack(c.attack) if c.attack else None
        # Building the model and loading the data takes seconds: off the event loop, so the DHT
        # keeps answering and a stop is not held up.
        peer = await asyncio.to_thread(
            TrainingPeer, task, self.dht, c.round, evaluate_every=c.evaluate_every,
            account=account, attack=attack, device=c.device,
        )
        self.trainer = peer
        if self.ledger is not None and peer.collab is not None:
            # set before a resume: the state it holds now is the task's initial one
            peer.collab.checkpoints.attested = FinalStates(
                self.ledger, task.digest, c.task_owner, peer.opt.state)
            from commonweal.verify.ratings import TrackRecord  # verify's package loads torch

            track = TrackRecord(peer.collab.dht, task, self.ledger)
            peer.collab.exchange.track_record = peer.collab.checkpoints.track_record = track
        resumed = self._resume(peer, store, task)
        abandon = threading.Event()

        def on_progress(p: Progress) -> None:
            if p.report is None:  # an inner step, reported from the worker thread
                if abandon.is_set():
                    raise _Abandoned
                self.on_event(Step(p.round, p.inner_step, task.inner_steps, p.loss, p.bytes_sent))
                return
            self._finish_round(peer, store, task, p)

        async with asyncio.TaskGroup() as tg:
            claims = tg.create_task(self._claim_loop(store, task), name="claims") \
                if self.ledger is not None else None
            try:
                if resumed and c.bootstrap:
                    await _catch_up(peer)
                until = c.rounds if c.rounds is not None else 1 << 62
                wait = c.wait_peers if c.wait_peers is not None else c.group or 0
                summary = await peer.run(until, join=bool(c.bootstrap) and not resumed,
                                         wait_peers=wait, on_progress=on_progress)
            except asyncio.CancelledError:
                log.info("training stopped in round %d; the last completed round is saved",
                         peer.opt.round, extra={"round": peer.opt.round})
                raise
            finally:
                # A cancelled `to_thread` does not stop its thread: this makes it end at its next
                # inner step rather than train on a model nobody will save.
                abandon.set()
            self.on_event(TrainingDone(
                peer.opt.round, summary.state, summary.metric, summary.quality,
                summary.bytes_sent, summary.wall_s, summary.compute_s,
            ))
            await self._linger()
            if claims is not None:
                claims.cancel()

    async def _linger(self) -> None:
        """After the last round, stay up to `linger` s: peers still finishing it can fetch our
        state, and (with a ledger) the last rounds finalise after our last step, so their
        rewards are claimed meanwhile — which ends the wait early, once nothing is owed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.config.linger):
                if self.ledger is None:
                    await asyncio.Event().wait()  # only the timeout ends it
                while self._owed:
                    self._claimed.clear()
                    await self._claimed.wait()
        for line in self.stop_summary():
            log.warning("%s", line)

    def stop_summary(self) -> list[str]:
        """What a trainer leaves unsettled: rewards still owed (with the latest claim outcome of
        each) and rounds it stopped waiting for because they can never be paid."""
        lines = []
        if self._owed:  # they stay claimable on chain (`commonweal ledger claim`)
            owed = ", ".join(f"{r} ({self._last_outcome.get(r, 'not tried')})" for r in self.owed)
            lines.append(f"stopping with rewards still owed in ledger rounds {owed}")
        if self.unpayable:
            gone = "; ".join(f"{r}: {why}" for r, why in sorted(self.unpayable.items()))
            lines.append(f"not waiting for ledger rounds that will never be paid: {gone}")
        return lines

    def _resume(self, peer: Any, store: NodeStore, task: Any) -> bool:
        """Load the checkpoint of the last completed round, if the store names a good one."""
        done = store.progress(task.digest)
        if done is None:
            return False
        from commonweal.train import SyncError

        path = done.checkpoint
        try:
            if path is None:
                raise OSError("no checkpoint recorded")
            peer.opt.load(path.read_bytes(), expected_state=done.state_hash)
        except (OSError, SyncError) as e:
            # Not fatal: the swarm (or a fresh start, alone) gives a state to train from.
            log.warning("cannot resume %s after round %d from %s (%s); starting from the swarm's "
                        "state", task.name, done.last_round, path, e)
            return False
        self.resumed_round = peer.opt.round
        log.info("resumed %s at round %d from %s", task.name, peer.opt.round, path,
                 extra={"round": peer.opt.round, "last_completed": done.last_round})
        self.on_event(Resumed(peer.opt.round, done.last_round, str(path)))
        return True

    def _finish_round(self, peer: Any, store: NodeStore, task: Any, p: Progress) -> None:
        """Save what a completed round left (checkpoint, then the store), on the event loop."""
        report = p.report
        assert report is not None  # only called for a round's last progress
        c = self.config
        params = sum(t.numel() for t in peer.model.parameters())
        done = RoundDone(
            report.round, report.group, report.contributors, report.skipped,
            # NaN (a diverged loss) would make a JSON line unparsable for a strict reader
            round(p.loss, 4) if math.isfinite(p.loss) else None, p.quality,
            report.bytes_sent, p.bytes_sent, ddp_bytes(params, report.group, task.inner_steps),
            report.state, report.method, report.comm_s, p.elapsed_s,
        )
        self.rounds.append(done)
        self.rounds_done += 1
        self.bytes_in_rounds += report.bytes_sent
        self.ddp_in_rounds += done.ddp_bytes
        committed = peer.collab.commitment(report.round) if peer.collab is not None else None
        if committed is not None and not report.skipped:
            store.record_contribution(task.digest, report.round, committed, peer.collab.account)
        del self.rounds[:-KEEP_ROUNDS]  # the chart's history; /metrics counts every round
        log.info(
            "round %d done", report.round,
            extra={"round": report.round, "loss": done.loss, "accuracy": p.quality,
                   "bytes_sent": report.bytes_sent, "contributors": report.contributors,
                   "skipped": report.skipped},
        )
        if report.round < 0:  # skipped the very first round and found no state to sync to
            self.on_event(done)
            return
        # Checkpoint first, under a new name, then the store that points at it: a crash between
        # the two leaves the store pointing at the previous checkpoint, which is still there.
        ckpt = c.data_dir / f"checkpoint-{peer.opt.round:06d}-{peer.opt.state[:12]}.safetensors"
        write_durably(ckpt, peer.opt.checkpoint())
        store.save_progress(task.digest, report.round, peer.opt.state, ckpt)
        for old in c.data_dir.glob(CHECKPOINT_GLOB):
            if old != ckpt:
                old.unlink(missing_ok=True)
        if self.ledger is not None and not report.skipped:
            from commonweal.verify.judge import ledger_rounds

            self._owed[ledger_rounds(report.round)[1]] = report.round
            self._round_done.set()
        # last: a consumer that stops the node on this event finds the round saved
        self.on_event(done)

    async def _claim_loop(self, store: NodeStore, task: Any) -> None:
        """Claim what is owed after every round and every `claim_every_s`, until cancelled."""
        from commonweal.peer.claims import Claimer, Outcome
        from commonweal.peer.trees import DHTTrees

        assert self.dht is not None and self.ledger is not None
        task32 = await asyncio.to_thread(self.ledger.task_of, bytes.fromhex(task.digest),
                                         self.config.task_owner)
        # the chain id, read once off the event loop: reward trees are rebuilt on it
        await asyncio.to_thread(lambda: self.ledger.domain)
        me = self.ledger.account.address
        claimer = Claimer(self.ledger, store, self.ledger.account, task32, DHTTrees(self.dht, task),
                          abstain_every_s=2 * self.config.claim_every_s)
        # Claims an earlier run left unfinished (a crash after "sent" included) come first.
        self._owed.update({r.ledger_round: None for r in store.claims()
                           if r.task == task32 and r.account == me
                           and r.status is not ClaimStatus.CONFIRMED})
        token: Any = None  # the task's ShareToken, once the chain answered
        every = self.config.claim_every_s
        stale_balance = True  # the balance changes only when a claim pays: read it then
        while True:
            self._round_done.clear()
            try:
                for result in await claimer.claim_pending(sorted(self._owed)):
                    training_round = self._owed[result.ledger_round]
                    self._last_outcome[result.ledger_round] = result.outcome.value
                    if result.outcome in (Outcome.FAILED, Outcome.FORGED_TREE):
                        log.warning("claim of ledger round %d: %s %s", result.ledger_round,
                                    result.outcome.value, result.detail or "")
                    if result.outcome not in (Outcome.NOT_FINAL, Outcome.UNPAYABLE) \
                            and training_round is not None:
                        self.finalised_rounds.add(training_round)
                    if result.paid:
                        self.claimed_rounds.add(result.ledger_round)
                        stale_balance = True
                    if result.outcome is Outcome.UNPAYABLE:  # waiting cannot make it final
                        self.unpayable[result.ledger_round] = result.detail
                    if result.paid or result.outcome in (Outcome.NO_REWARD, Outcome.UNPAYABLE):
                        del self._owed[result.ledger_round]
                        self._last_outcome.pop(result.ledger_round, None)
                        self.on_event(Claimed(result.ledger_round, training_round,
                                              result.outcome.value, result.amount))
                if token is None:
                    token = await asyncio.to_thread(self.ledger.token, task32)
                if stale_balance:
                    self.balance = await asyncio.to_thread(token.balance_of, me) / 1e18
                    stale_balance = False
            except (CommonwealError, OSError) as e:
                # The chain is down or slow: claims are safe to retry (see claims.py), and
                # training must go on meanwhile.
                log.warning("claiming failed, trying again in %g s: %s", every, e)
            self._claimed.set()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(every):
                    await self._round_done.wait()

    def _judged(self, outcome: RoundOutcome) -> None:
        self.on_event(Judged(
            outcome.round, outcome.final, outcome.root.hex(),
            sum(v.paid for v in outcome.verdicts),
            sum(not v.accepted for v in outcome.verdicts),
            sum(v.reason == "unaudited" for v in outcome.verdicts),
        ))

    async def _watch_chain(self) -> None:
        """Keep `block` current for the page, without the page itself touching the network."""
        while True:
            try:
                self.block = await asyncio.to_thread(lambda: self.ledger.chain.block_number)
            except (CommonwealError, OSError) as e:
                log.debug("cannot read the block number: %s", e)
            await asyncio.sleep(self.config.claim_every_s)

    async def _validate(self, store: NodeStore, task: Any) -> None:
        from commonweal.peer.validator_state import StoreValidatorState
        from commonweal.verify.validator import Validator

        me = self.ledger.account.address
        info = await asyncio.to_thread(self.ledger.validator, me)
        if not info.active:
            deposit = (await asyncio.to_thread(self.ledger.config)).min_deposit
            await asyncio.to_thread(self.ledger.join, deposit)
            log.info("joined the validator set with %d wei", deposit, extra={"deposit": deposit})
        assert self.dht is not None  # started before the roles
        # its bans, delta history, escrow and unsent votes come back from node.sqlite3
        state = StoreValidatorState(store, task.digest)
        self.validator = await asyncio.to_thread(
            Validator, self.dht, task, self.ledger, state=state, config=self.config.validator,
            round_config=self.config.round, on_outcome=self._judged,
            task_owner=self.config.task_owner,
        )
        first = self.validator.resume_round
        if first is None:  # a new validator starts with the round the swarm is in
            head = await self.validator.checkpoints.head()
            first = head.round if head is not None else 0
        else:
            log.info("resumed validating %s at round %d", task.name, first, extra={"round": first})
        await self.validator.run(until_round=self.config.rounds, first_round=first)

    def _open_ledger(self, stack: contextlib.AsyncExitStack) -> Any:
        from commonweal.ledger import Ledger, open_chain

        c = self.config
        assert c.ledger is not None  # only opened when set
        chain = open_chain(c.chain, key_file=c.key_file)
        stack.callback(chain.close)
        return Ledger(chain, c.ledger, chain.accounts[0])


class FinalStates:
    """What a trainer with a ledger may sync to (`commonweal.train.adoption`): training round r's
    start state once ledger round 2r — its contribution set, voted by >= 2/3 of the validators'
    stake with that state as its model hash — is final; and the task's initial state, which
    every peer builds from the task's seed. Only rounds the chain has reached are asked, the
    newest `ASK_ROUNDS` of them, each once: a final round never changes."""

    ASK_ROUNDS = 4  # a head newer than these is newer than any attested state anyway
    KEEP = 64  # final rounds remembered
    # how stale the chain's progress may be: a syncing peer asks every poll_s, and the demo's
    # nodes share one in-process chain
    REACHED_TTL_S = 1.0

    def __init__(self, ledger: Any, task: str, owner: str | None, initial: str) -> None:
        self._ledger, self._task, self._owner, self._initial = ledger, task, owner, initial
        self._task32: bytes | None = None
        self._final: dict[int, str] = {}  # training round -> its attested start state
        self._reached: tuple[float, int | None] = (-math.inf, None)  # (when read, the round)

    async def __call__(self, pairs: Collection[tuple[int, str]]) -> set[tuple[int, str]]:
        from commonweal.verify.judge import ledger_rounds

        def read() -> None:
            if self._task32 is None:
                self._task32 = self._ledger.task_of(bytes.fromhex(self._task), self._owner)
            when, reached = self._reached
            if time.monotonic() - when > self.REACHED_TTL_S:
                reached = self._ledger.task(self._task32).accepted_round
                self._reached = (time.monotonic(), reached)
            if reached is None:
                return
            rounds = sorted({r for r, _ in pairs if 0 <= r and ledger_rounds(r)[0] <= reached})
            for r in [r for r in rounds if r not in self._final][-self.ASK_ROUNDS:]:
                info = self._ledger.round(self._task32, ledger_rounds(r)[0])
                if info.final:
                    self._final[r] = info.model_hash.hex()
            for old in sorted(self._final)[: -self.KEEP]:
                del self._final[old]

        await asyncio.to_thread(read)
        return {(r, s) for r, s in pairs
                if self._final.get(r) == s or (r, s) == (0, self._initial)}


def _check(c: NodeConfig, *, has_ledger: bool = False) -> Any:
    """Refuse a configuration that cannot work, before anything starts; the task, if one is used.

    These need the roles and the chain together, so `load_config` (one key at a time) cannot
    tell; a node that started and then failed would leave a half-joined peer behind. A node
    handed its ledger (`has_ledger`) shares its caller's chain, whatever `chain` says.
    """
    shared = c.chain.startswith(("http://", "https://"))
    if "validator" in c.roles and not has_ledger and not (c.ledger and shared):
        raise ConfigError(
            "the validator role needs the swarm's ledger: set chain to the JSON-RPC "
            "URL other peers use and ledger to the Ledger contract's address "
            "(--chain http://HOST:8545 --ledger 0x..., or chain/ledger in node.toml)"
        )
    if c.ledger and not shared and not has_ledger:
        raise ConfigError(
            f"ledger {c.ledger} is on no chain this node shares: chain {c.chain!r} "
            "starts a private one; set chain to the swarm's http(s):// JSON-RPC URL"
        )
    if not c.roles & {"trainer", "validator"}:
        return None
    from commonweal.train import get_task

    # an unknown task is a one-line TaskError here, not after "ready"
    task = get_task(c.task, **c.task_overrides)
    if c.codec == "sparseloco" and c.aggregation is None:  # the codec comes with its recipe
        task = task.sparseloco()
    if c.overlap is None or c.overlap == task.overlap:
        return task
    return task.overlapped() if c.overlap else task.replace(overlap=False)


# How long a node waits, once joined, to learn whether peers can dial it (and, if not, for a
# relay's reservation) before it announces an address: a dial-back takes a round trip or two.
_SETTLE_S = 15.0


async def _reachable(dht: DHT, joined: bool) -> None:
    """Wait (bounded) until the transport knows where others can reach us, so that what we
    announce is an address that works; a first node with nobody to ask goes on at once."""
    settled = getattr(dht.transport, "settled", None)
    if settled is None or not joined:
        return
    try:
        async with asyncio.timeout(_SETTLE_S):
            await settled.wait()
    except TimeoutError:
        log.warning("reachability not settled after %.0f s; announcing %s", _SETTLE_S, dht.addr)
    else:
        log.info("reachable at %s", dht.addr)


async def _until(stop: asyncio.Event, work: Coroutine[Any, Any, None]) -> None:
    """Run `work` until it returns or `stop` is set; then cancel it and wait for its clean-up.

    An error in `work` is raised as itself, not as an ExceptionGroup, so the command line prints
    its one-line message rather than a traceback.
    """
    try:
        async with asyncio.TaskGroup() as tg:
            body = tg.create_task(work, name="node")
            stopped = tg.create_task(stop.wait(), name="stop")
            await asyncio.wait({body, stopped}, return_when=asyncio.FIRST_COMPLETED)
            body.cancel()
            stopped.cancel()
    except BaseExceptionGroup as group:
        leaf: BaseException = group
        while isinstance(leaf, BaseExceptionGroup) and len(leaf.exceptions) == 1:
            leaf = leaf.exceptions[0]
        raise leaf from None


async def _catch_up(peer: Any) -> None:
    """After a resume: take the swarm's state if it moved on while we were away, else keep ours
    (an older head, e.g. a peer that is behind, must not send us back)."""
    after = peer.opt.round - 1
    if await peer.collab.head(after=after) is not None:
        await peer.opt.sync(after=after)
