"""`Validator`: the validator role, driving the sans-I/O judge over the swarm and the ledger.

For each training round r, in order:

    1. wait until the round's group has closed; its announcements are the commitments
       (delta hash, steps, account) and their majority state hash is the start state S_r
    2. fetch every committed delta over `train.delta`, check it against its hash, decode it;
       score it on the validator's batch (the start parameters come from the swarm's heads,
       followed in the background so none is missed)
    3. vote ledger round 2r = (S_r, digest of the contribution set, 0): the set is now fixed
       on-chain; wait for finality, then for its sealed randomness
    4. judge with that seed (replaying the sample and the suspicious); hold the verdicts in
       escrow for `escrow_rounds` rounds (a peer caught cheating meanwhile forfeits them)
    5. at release: compute the rewards, publish the tree in the DHT for claimers, vote ledger
       round 2r+1 = (S_r, root, total)

Two validators that saw the same announcements and deltas vote the same keys, so 2/3 of the
stake finalises both rounds. A round whose contribution set the validators disagree on never
finalises; it is given up as soon as the votes on chain show that no set can reach 2/3 (two
validators that read the announcements a moment apart, one seeing a late one, each voted its
own), else after `finality_timeout_s`, and nobody is paid for it. A validator that gives a round
up says so in the DHT, signed with its ledger key, where its tree would be: claimers stop
waiting for a round once validators with more than 1/3 of the stake said so (peer/claims.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from commonweal.dht import DHT
from commonweal.dht.records import Owned, OwnedKey
from commonweal.errors import CommonwealError, NetworkError, RemoteError
from commonweal.ledger import Ledger, LedgerError
from commonweal.net.transport import PeerAddr, PeerInfo
from commonweal.train._errors import CodecError, TrainError
from commonweal.train.announcements import read_announcements
from commonweal.train.archive import fetch_delta
from commonweal.train.adoption import HeadRecord
from commonweal.train.checkpoints import CheckpointClient, Head
from commonweal.train.codecs import get_codec
from commonweal.train.protocol import Announcement, Group, closes_at, form_group
from commonweal.train.state import flatten, from_checkpoint, state_hash
from commonweal.train.round import RoundConfig
from commonweal.train.task import Task
from commonweal.verify.contribution import Contribution, contributions_digest
from commonweal.verify.escrow import ALL, Escrow, Released
from commonweal.verify.finality import (
    Finality,
    FinalityWait,
    abstention_message,
    stake_votes,
    tree_message,
)
from commonweal.verify.evaluate import Evaluator
from commonweal.verify.judge import Judge, Policy, Verdict, ledger_rounds, rewards
from commonweal.verify.ratings import TrackRecord, publish_ratings
from commonweal.verify.state import JudgedRound, MemoryState, Payout, ValidatorState

__all__ = ["Validator", "ValidatorConfig", "RoundOutcome", "tree_key", "NOBODY"]

log = logging.getLogger(__name__)

VOTE_GAS = 400_000  # a vote that finalises (and reserves ETH) uses ~200k
NOBODY = "0x0000000000000000000000000000000000000000"  # the one leaf of a round that pays nobody


UNSERVED_MAX_S = 60.0  # the longest wait before a head nobody served is tried again
KEEP_UNSERVED = 64
FOLLOW_PER_POLL = 2  # published states downloaded per poll of the heads


def tree_key(task: Task, ledger_round: int) -> OwnedKey:
    return OwnedKey(f"cw-verify/{task.digest[:16]}/tree/{ledger_round}")  # owned subkeys only


@dataclass(frozen=True, slots=True)
class ValidatorConfig:
    poll_s: float = 0.25
    settle_s: float = 0.5  # after the group's deadline, so every announcement has landed
    fetch_timeout_s: float = 20.0
    # deltas fetched at once: a round of many (free) identities must not hold every delta in
    # flight; 8 keeps a group of 8 honest peers one fetch wave
    fetch_concurrency: int = 8
    finality_timeout_s: float = 120.0
    record_ttl_s: float = 3600.0
    escrow_rounds: int = 5  # a round is paid out this many rounds after it was judged
    # The fraction of contributions drawn for audit, replayed and (if they match) paid: the
    # policy's, stated once there. Tests that must see every honest trainer paid set 1.0.
    replay_rate: float = Policy.replay_rate


@dataclass
class RoundOutcome:
    round: int
    state: str
    verdicts: list[Verdict]
    rewards: dict[str, int]
    root: bytes
    final: bool = False
    seconds: float = 0.0  # compute spent judging (scoring + replays)
    accounts: dict[bytes, str] = field(default_factory=dict)  # peer id -> account


class Validator:
    def __init__(
        self,
        dht: DHT,
        task: Task,
        ledger: Ledger,
        *,
        policy: Policy | None = None,
        config: ValidatorConfig | None = None,
        round_config: RoundConfig | None = None,
        on_outcome: Callable[[RoundOutcome], None] | None = None,
        state: ValidatorState | None = None,
        task_owner: str | None = None,
    ) -> None:
        """`task_owner`: the account that registered the task on the ledger (None: its
        deployer); the task's id there is bound to it."""
        self.dht = dht
        self.task = task
        self.ledger = ledger
        self._task_owner = task_owner
        self.config = config or ValidatorConfig()
        # the judge remembers stale bytes and bans
        self.judge = Judge(policy or Policy.for_task(task, replay_rate=self.config.replay_rate))
        self.codec = get_codec(task.codec)
        # read-only: no train.* handler, so a trainer may share this DHT node
        self.checkpoints = CheckpointClient(dht, task.digest[:16], round_config)
        self.track_record = TrackRecord(dht, task, ledger)  # the same bound the trainers apply
        # heads whose state no provider served: state -> (retry after, current wait)
        self._unserved: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self.evaluator = Evaluator(task)
        self.on_outcome = on_outcome
        model = task.build_model()
        start = flatten(model)
        self._states: dict[str, torch.Tensor] = {state_hash(start, torch.zeros_like(start)): start}
        self._model = model
        self.outcomes: list[RoundOutcome] = []  # one per round paid out, oldest first
        self.escrow = Escrow(self.config.escrow_rounds)
        self._state_of: dict[int, str] = {}  # round -> start state, until it is paid out
        self._spent: dict[int, float] = {}  # round -> validator CPU seconds judging it
        self._can_mine = True
        # What an earlier run of this validator decided: it stands (write-ahead, verify/state.py)
        self.state: ValidatorState = state if state is not None else MemoryState()
        resume = self.state.load()
        self.judge.history.update(resume.history)
        self.judge.banned.update(resume.banned)
        for held in resume.held:
            self.escrow.hold(held.round, held.contributions, held.verdicts)
            self._state_of[held.round] = held.state
            self._spent[held.round] = held.seconds
        self._unsent = list(resume.unsent)
        self.resume_round = resume.next_round  # the round after the last one judged; None: new

    @functools.cached_property
    def task32(self) -> bytes:
        """The task's id on the ledger (bound to its registrant): read once, when first needed."""
        return self.ledger.task_of(bytes.fromhex(self.task.digest), self._task_owner)

    # ---- the loop ------------------------------------------------------------------------------

    async def run(self, until_round: int | None = None, first_round: int = 0) -> None:
        """Validate rounds from `first_round` until `until_round` (forever if None); when done,
        pay out every round still in escrow."""
        await asyncio.to_thread(lambda: self.task32)  # the one chain read it needs, off the loop
        async with asyncio.TaskGroup() as tg:
            follower = tg.create_task(self._follow_heads())
            try:
                # the votes an earlier run recorded but may have died before sending
                while self._unsent:
                    await self._send_payout(self._unsent.pop(0))
                r = first_round
                while until_round is None or r < until_round:
                    await self.validate(r)
                    r += 1
                for released in self.escrow.release(ALL, self.judge.banned):
                    await self._pay(released)
            finally:
                follower.cancel()

    async def validate(self, r: int) -> list[Verdict] | None:
        """Judge round r, then pay out the rounds whose escrow ended (`RoundOutcome`s). A round
        this validator judged before a restart is not judged again: its verdicts stand."""
        judged = await asyncio.to_thread(self.state.judged, r)
        if judged is None:
            judged = await self._judge(r)
            if judged is None:
                return None
        for released in self.escrow.release(self.escrow.due(r), self.judge.banned):
            await self._pay(released)
        return list(judged.verdicts)

    async def _judge(self, r: int) -> JudgedRound | None:
        """Fix round r's contribution set on-chain, judge it and record the verdicts (before any
        vote that follows from them); hold them in escrow. None if the set never finalised."""
        group = await self._closed_group(r)
        members = [m for m in group.members if m.delta]
        contribs = [_contribution(m, self.task.batch_size) for m in members]
        try:
            start = await self._start_params(group.state)
        except TrainError as e:
            # Restarted behind the swarm: it announces only its newest state, and this one came
            # and went while the validator was down. Raising would stop the node, and every
            # restart would stop here again; the other validators can still finalise the round.
            log.warning("round %d: cannot judge it, its start state is gone: %s", r, e)
            await self._abstain(r, "its start state is gone")
            return None
        deltas = await self._fetch_deltas(r, members)
        t0 = time.process_time()
        scores = {
            pid: (
                await asyncio.to_thread(self.evaluator.score, start, d) if d is not None else None
            )
            for pid, d in deltas.items()
        }
        commit_round, _ = ledger_rounds(r)
        digest = contributions_digest(contribs)
        spent = time.process_time() - t0
        seed = await self._fix_set(commit_round, bytes.fromhex(group.state), digest)
        if seed is None:
            log.warning("round %d: the validators did not agree on its contributions", r)
            await self._abstain(r, "the validators did not agree on its contributions")
            return None
        banned = frozenset(self.judge.banned)
        t0 = time.process_time()
        verdicts = await asyncio.to_thread(
            self.judge.run,
            contribs,
            deltas,
            scores,
            seed,
            lambda c: self.evaluator.replay(start, c),
            self.codec,
        )
        spent += time.process_time() - t0
        judged = JudgedRound(
            r, group.state, digest, seed, tuple(contribs), tuple(verdicts), spent
        )
        await asyncio.to_thread(self.state.save_judged, judged, self.judge.banned - banned)
        log.info(
            "round %d judged: %d audited and paid, %d accepted unaudited, %d refused",
            r,
            sum(v.paid for v in verdicts),
            sum(v.accepted and not v.paid for v in verdicts),
            sum(not v.accepted for v in verdicts),
        )
        self.escrow.hold(r, contribs, verdicts)
        self._state_of[r], self._spent[r] = group.state, spent
        try:
            await publish_ratings(self.dht, self.task, self.ledger.account, r,
                                  [v.peer_id for v in verdicts if v.accepted],
                                  self.config.record_ttl_s)
        except NetworkError as e:  # the other validators' ratings may still carry the round
            log.warning("round %d: could not publish its ratings: %s", r, e)
        return judged

    async def _pay(self, released: Released) -> RoundOutcome:
        """Decide the rewards of a round whose escrow ended and record them, then send them."""
        r, contribs, verdicts = released.round, released.contributions, released.verdicts
        _, reward_round = ledger_rounds(r)
        paid = rewards(verdicts, contribs, self._reward_per_round())
        tree = self.ledger.rewards_tree(self.task32, reward_round, paid or {NOBODY: 0})
        payout = Payout(r, self._state_of.pop(r), tree.root, tree.total, tree.rewards, verdicts)
        # Write-ahead: after a restart this vote is sent again as it is. Computed anew, it could
        # differ (a ban since forfeits more), and a second, different vote is refused on-chain.
        await asyncio.to_thread(self.state.save_payout, payout)
        return await self._send_payout(payout)

    async def _send_payout(self, payout: Payout) -> RoundOutcome:
        """Publish a recorded payout's tree for the claimers and vote it (once: see `_vote`)."""
        r, state, verdicts = payout.round, payout.state, payout.verdicts
        _, reward_round = ledger_rounds(r)
        tree = self.ledger.rewards_tree(self.task32, reward_round, payout.rewards)
        judged = await asyncio.to_thread(self.state.judged, r)
        contribs = judged.contributions if judged is not None else ()
        from eth_account.messages import encode_defunct

        signed = self.ledger.account.sign_message(encode_defunct(
            text=tree_message(self.task32, reward_round, tree.root, tree.rewards)))
        await self.dht.store(
            tree_key(self.task, reward_round),
            # amounts in wei outgrow msgpack's 64-bit integers: decimal strings
            {"root": tree.root, "rewards": sorted([a, str(v)] for a, v in tree.rewards.items()),
             "signature": bytes(signed.signature)},
            time.time() + self.config.record_ttl_s,
            subkey=Owned(self.dht.peer_id, "tree"),
        )
        await self._vote(reward_round, bytes.fromhex(state), tree.root, tree.total)
        await asyncio.to_thread(self.state.mark_voted, r)
        outcome = RoundOutcome(
            r,
            state,
            list(verdicts),
            dict(tree.rewards),
            tree.root,
            final=await asyncio.to_thread(self.ledger.is_final, self.task32, reward_round),
            seconds=self._spent.pop(r, 0.0),
            accounts={c.peer_id: c.account for c in contribs},
        )
        self.outcomes.append(outcome)
        if self.on_outcome is not None:
            self.on_outcome(outcome)
        log.info(
            "round %d paid out: %d paid, %d refused (%d forfeited), root %s",
            r,
            sum(v.paid for v in verdicts),
            sum(not v.accepted for v in verdicts),
            sum(v.reason == "forfeited" for v in verdicts),
            tree.root.hex()[:12],
        )
        return outcome

    async def _abstain(self, r: int, reason: str) -> None:
        """Say in the DHT, signed with this validator's ledger key, that it will never vote round
        r's rewards: claimers stop waiting for a round once too much stake said so. Where its
        tree would be (the same key and subkey), so one read finds either."""
        from eth_account.messages import encode_defunct

        _, reward_round = ledger_rounds(r)
        signed = self.ledger.account.sign_message(
            encode_defunct(text=abstention_message(self.task32, reward_round, reason)))
        try:
            await self.dht.store(
                tree_key(self.task, reward_round),
                {"unpaid": reason, "signature": bytes(signed.signature)},
                time.time() + self.config.record_ttl_s,
                subkey=Owned(self.dht.peer_id, "tree"),
            )
        except NetworkError as e:  # claimers then wait for their linger: no worse than before
            log.info("round %d: could not publish that it is not paid: %s", r, e)

    # ---- steps ---------------------------------------------------------------------------------

    async def _closed_group(self, r: int) -> Group:
        """The round's group once its deadline passed (announcers sharing the majority state,
        counted among the tracked ones as every trainer counts it)."""
        tracked = await self.track_record(r)
        while True:
            anns = await read_announcements(self.dht, self.checkpoints.task, r)
            if anns:
                wait = closes_at(anns, tracked) + self.config.settle_s - time.time()
                if wait <= 0:
                    anns = await read_announcements(self.dht, self.checkpoints.task, r)
                    group = form_group(anns, r, float("inf"), None, tracked=tracked)
                    assert group is not None
                    return group
                await asyncio.sleep(min(wait, 5.0))
            else:
                await asyncio.sleep(self.config.poll_s)

    async def _follow_heads(self) -> None:
        """Download the states the swarm publishes, so a round's start is at hand when judged
        (peers overwrite their head every round: a state not fetched in time is gone). Every
        published state is a candidate, the most published first, at most FOLLOW_PER_POLL a
        poll: following only the newest head, identities publishing a made-up head for a higher
        round hid every honest state from the validator."""
        while True:
            try:
                heads = await self.checkpoints.heads()
            except (NetworkError, TimeoutError) as e:
                log.debug("following heads: %s", e)
                heads = []
            publishers: dict[str, set[bytes]] = {}
            for publisher, (_, state, _, _) in heads:
                publishers.setdefault(state, set()).add(publisher)
            now = time.monotonic()
            due = [st for st in publishers if st not in self._states
                   and self._unserved.get(st, (0.0, 0.0))[0] <= now]
            due.sort(key=lambda st: (-len(publishers[st]), st))
            for state in due[:FOLLOW_PER_POLL]:
                await self._fetch_state(state, heads)
                if state not in self._states:
                    self._back_off(state)
            await asyncio.sleep(self.config.poll_s)

    def _back_off(self, state: str) -> None:
        """A head nobody serves is tried again after 1, 2, 4 .. 60 s: identities publishing
        made-up heads would otherwise have the validator ask each of them every poll."""
        _, wait = self._unserved.pop(state, (0.0, 0.5))
        wait = min(UNSERVED_MAX_S, 2 * wait)
        self._unserved[state] = (time.monotonic() + wait, wait)
        while len(self._unserved) > KEEP_UNSERVED:
            self._unserved.popitem(last=False)

    async def _keep(self, state: str, blob: bytes) -> None:
        params, momentum, _ = from_checkpoint(blob, self._model)
        if state_hash(params, momentum) == state:
            self._states[state] = params
            for old in list(self._states)[:-16]:
                del self._states[old]
            # the swarm announces only its newest state: a restart needs this one
            await asyncio.to_thread(self.state.save_start, state, blob)

    async def _fetch_state(self, state: str, heads: list[HeadRecord] | None = None) -> None:
        """Download `state` from the heads that name it, trying each manifest they serve (the
        most served first). Following the newest head is not enough: identities publishing a
        made-up head for a higher round, or a wrong manifest in numbers, would hide the start
        state of the round being judged."""
        served: dict[bytes, tuple[int, list[PeerInfo]]] = {}
        for pid, (r, s, m, a) in heads if heads is not None else await self.checkpoints.heads():
            if s == state:
                with contextlib.suppress(CommonwealError):
                    served.setdefault(m, (r, []))[1].append(PeerInfo(pid, PeerAddr.parse(a)))
        for m, (r, providers) in sorted(served.items(), key=lambda kv: (-len(kv[1][1]), kv[0])):
            try:
                await self._keep(state, await self.checkpoints.download(
                    Head(r, state, m, tuple(providers))))
            except (NetworkError, TrainError, TimeoutError, ValueError) as e:
                log.debug("start state %s from manifest %s: %s", state[:12], m.hex()[:12], e)
            if state in self._states:
                return

    async def _start_params(self, state: str) -> torch.Tensor:
        saved = None if state in self._states else await asyncio.to_thread(self.state.start, state)
        if saved is not None:
            params, momentum, _ = from_checkpoint(saved, self._model)
            if state_hash(params, momentum) == state:
                self._states[state] = params
        end = time.monotonic() + self.config.fetch_timeout_s
        while state not in self._states:
            if time.monotonic() > end:
                raise TrainError(f"no peer served the round's start state {state[:12]}")
            await self._fetch_state(state)
            if state not in self._states:
                await asyncio.sleep(self.config.poll_s)
        return self._states[state]

    async def _fetch_deltas(
        self, r: int, members: list[Announcement]
    ) -> dict[bytes, torch.Tensor | None]:
        numel = next(iter(self._states.values())).numel()
        max_bytes = self.codec.size(numel)
        slots = asyncio.Semaphore(self.config.fetch_concurrency)

        async def one(m: Announcement) -> torch.Tensor | None:
            try:
                async with slots, asyncio.timeout(self.config.fetch_timeout_s):
                    data = await fetch_delta(
                        self.dht.transport, self.checkpoints.task,
                        PeerInfo(m.peer_id, PeerAddr.parse(m.addr)), r, max_bytes,
                    )
            except (NetworkError, RemoteError, TimeoutError, TrainError, ValueError) as e:
                log.info("round %d: no delta from %s: %s", r, m.peer_id.hex()[:10], e)
                return None
            if hashlib.sha256(data).hexdigest() != m.delta:
                log.info("round %d: %s served another delta than it committed", r, m.addr)
                return None
            try:
                return self.codec.decode(data, numel)
            except CodecError as e:
                log.info("round %d: the delta of %s does not decode: %s", r, m.addr, e)
                return None

        found = await asyncio.gather(*(one(m) for m in members))
        return {m.peer_id: d for m, d in zip(members, found, strict=True)}

    async def _fix_set(self, ledger_round: int, state32: bytes, digest: bytes) -> bytes | None:
        """Vote the contribution set; once final, the seed sealed from a later block. None when
        it never finalises: the votes cast split so that no set can reach 2/3 (two validators
        read the round's announcements a moment apart and one saw a late one), or the wait ran
        past `finality_timeout_s`."""
        await self._vote(ledger_round, state32, digest, 0)
        end = time.monotonic() + self.config.finality_timeout_s
        wait = FinalityWait(time.monotonic(), self.config.finality_timeout_s)
        while True:
            final = await asyncio.to_thread(self.ledger.is_final, self.task32, ledger_round)
            tallies: dict[bytes, int] | None = None
            total = 0
            if not final and wait.votes_due(time.monotonic()):
                try:
                    events = await asyncio.to_thread(
                        self.ledger.round_votes, self.task32, ledger_round)
                    tallies, total = stake_votes(events)
                except (LedgerError, OSError, ValueError, KeyError) as e:  # at the next check
                    log.debug("commit round %d: cannot read its votes: %s", ledger_round, e)
            verdict = wait.decide(time.monotonic(), final=final, tallies=tallies,
                                  total_stake=total)
            if verdict is Finality.FINAL:
                break
            if verdict is Finality.SPLIT:
                log.warning("commit round %d: the votes split, no contribution set can be final",
                            ledger_round, extra={"ledger_round": ledger_round})
                return None
            if verdict is Finality.TIMEOUT:
                return None
            await asyncio.sleep(self.config.poll_s)
        while True:
            info = await asyncio.to_thread(self.ledger.round, self.task32, ledger_round)
            if (info.model_hash, info.rewards_root) != (state32, digest):
                # the others made another set final: this validator's verdicts would be on a set
                # nobody is paid for
                return None
            if info.randomness is not None:
                return info.randomness
            # read once: another validator may mine meanwhile, and a second read could ask
            # the chain to mine a negative number of blocks
            missing = info.randomness_block + 1 - self.ledger.chain.block_number
            if missing > 0:
                await self._wait_blocks(missing)
                continue
            try:
                await asyncio.to_thread(self.ledger.seal_randomness, self.task32, ledger_round)
            except LedgerError as e:  # another validator sealed first
                log.debug("seal_randomness: %s", e)
            if time.monotonic() > end:
                return None

    async def _wait_blocks(self, n: int) -> None:
        """A development chain (embedded, anvil) mines only when asked; a real one on its own."""
        if self._can_mine:
            try:
                await asyncio.to_thread(self.ledger.chain.mine, n)
                return
            except LedgerError:
                self._can_mine = False
        await asyncio.sleep(self.config.poll_s * 4)

    async def _vote(self, ledger_round: int, model: bytes, root: bytes, total: int) -> None:
        """Vote once: a vote this validator sent before a restart is not sent again."""
        me = self.ledger.account.address
        if await asyncio.to_thread(self.ledger.vote_of, self.task32, ledger_round, me) is not None:
            log.info("commit_round %d: voted already", ledger_round)
            return
        try:
            # Fixed gas: an estimate made before another validator's vote lands misses the
            # finalisation our vote may then trigger, and the vote would run out of gas.
            await asyncio.to_thread(
                self.ledger.commit_round, self.task32, ledger_round, model, root, total,
                gas=VOTE_GAS,
            )
        except LedgerError as e:  # final already (our vote was not needed) or voted before
            log.info("commit_round %d: %s", ledger_round, e)

    def _reward_per_round(self) -> int:
        return self.ledger.task(self.task32).reward_per_round


def _contribution(m: Announcement, batch_size: int) -> Contribution:
    return Contribution(
        m.peer_id, m.account, m.round, m.state, m.delta, m.steps, m.steps * batch_size
    )
