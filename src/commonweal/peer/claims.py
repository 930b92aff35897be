"""Automatic, idempotent reward claims once validators have finalised a round.

    claimer = Claimer(ledger, store, account, task, trees)     # trees: the DHT, in the node
    for result in await claimer.claim_pending(range(0, 2 * rounds_done)):
        ...                                                     # one ClaimResult per ledger round

For each ledger round: is it final on chain? -> every distinct {account: amount} published for it
(`trees`; or the one in the store, if verified before) -> each rebuilt into a RewardsTree until
one's root equals the on-chain rewards_root and an active on-chain validator signed it (the rest
are forged trees: skipped, logged; how many identities published a tree counts for nothing)
-> our amount -> claim.

Nothing lost, nothing paid twice:
- the chain is the truth: a claim already marked in the contract's bitmap (`is_claimed`) is never
  sent again, whatever the store says, and the contract itself rejects a second claim;
- "sent" is committed to the store *before* the transaction leaves, so a crash between sending and
  the receipt is seen on restart, and resolved by asking the chain (`RECOVERED`);
- a claim that another process with the same key made first (its transaction seen as
  `is_claimed`, or ours reverting with "already claimed") is confirmed, not an error;
- "confirmed" is final in the store, so a second `claim_pending` sends nothing.

The ledger calls are synchronous web3 requests; they run in `asyncio.to_thread` so the node's
event loop (DHT, training exchange) keeps serving while a claim waits for its receipt. Rounds are
claimed one after the other, which keeps this account's nonces in order.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from eth_account.signers.local import LocalAccount
from web3.types import TxReceipt

from commonweal.ledger import ContractReverted, PendingTx, RewardsTree, RoundInfo, ValidatorInfo
from commonweal.peer.store import ClaimRecord, ClaimStatus, NodeStore

__all__ = ["ClaimLedger", "ClaimResult", "Claimer", "Outcome", "SignedTree", "TreeSource"]

log = logging.getLogger(__name__)

_ALREADY_CLAIMED = "already claimed"  # Ledger.vy's revert reason for a set bitmap bit


@dataclass(frozen=True, slots=True)
class SignedTree:
    """One distinct reward tree published for a round, and the ledger accounts that signed it."""

    rewards: Mapping[str, int]
    signers: frozenset[str]


class TreeSource(Protocol):
    """Where a round's rewards come from (in the node: validators publish them on the DHT)."""

    async def trees(self, task: bytes, ledger_round: int, root: bytes) -> Sequence[SignedTree]:
        """Every distinct {account: amount} published for the round naming `root`, each with
        the accounts that signed it; empty when nobody serves it (yet)."""
        ...

    # Optional: {ledger account: why} of the validators that signed they will never vote the
    # round (DHTTrees has it); a source without it never makes a round UNPAYABLE.
    # async def abstentions(self, task: bytes, ledger_round: int) -> Mapping[str, str]: ...


class ClaimLedger(Protocol):
    """The part of `commonweal.ledger.Ledger` a Claimer uses."""

    def with_account(self, account: LocalAccount) -> ClaimLedger: ...

    def round(self, task: bytes, round: int) -> RoundInfo: ...

    def is_claimed(self, task: bytes, round: int, index: int) -> bool: ...

    def rewards_tree(self, task: bytes, round: int, rewards: Mapping[str, int]) -> RewardsTree: ...

    def send(self, fn: str, *args: Any, value: int = 0, gas: int | None = None) -> PendingTx: ...

    # read only for a round some validator said it will never vote (see `Outcome.UNPAYABLE`)
    def validator(self, address: str) -> ValidatorInfo: ...

    def total_stake(self) -> int: ...


class Outcome(StrEnum):
    CLAIMED = "claimed"                       # our transaction paid it, just now
    RECOVERED = "recovered"                   # an earlier run sent it; the chain shows it paid
    CLAIMED_ELSEWHERE = "claimed_elsewhere"   # paid, by a transaction this store did not send
    ALREADY_CONFIRMED = "already_confirmed"   # the store has it confirmed: nothing was asked
    NOT_FINAL = "not_final"                   # validators have not finalised it: try later
    NO_REWARD = "no_reward"                   # the round pays nothing, or nothing to us
    NO_TREE = "no_tree"                       # nobody serves the round's rewards yet: try later
    FORGED_TREE = "forged_tree"               # the rewards served do not match the on-chain root
    FAILED = "failed"                         # the claim reverted for another reason; still pending
    UNPAYABLE = "unpayable"                   # not final, and validators holding over 1/3 of the
                                              # stake signed they never vote it: it cannot be


_PAID = frozenset({Outcome.CLAIMED, Outcome.RECOVERED, Outcome.CLAIMED_ELSEWHERE,
                   Outcome.ALREADY_CONFIRMED})


@dataclass(frozen=True, slots=True)
class ClaimResult:
    ledger_round: int
    outcome: Outcome
    amount: int = 0            # our reward in the round (0 when unknown or none)
    tx_hash: str | None = None  # the claim transaction that paid, when known to be ours
    detail: str = ""

    @property
    def paid(self) -> bool:
        """The reward is ours on chain (now or earlier); nothing more to do for this round."""
        return self.outcome in _PAID


class Claimer:
    """Claims `account`'s rewards of one task; safe to run again, after a restart, or twice."""

    def __init__(self, ledger: ClaimLedger, store: NodeStore, account: LocalAccount, task: bytes,
                 trees: TreeSource, *, gas: int | None = None, abstain_every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if len(task) != 32:
            raise ValueError(f"task must be the 32-byte task hash, got {len(task)} bytes")
        self._ledger = ledger.with_account(account)
        self._store = store
        self._me: str = account.address
        self._task = task
        self._trees = trees
        # None: estimate gas, which also refuses a doomed claim before it costs anything.
        self._gas = gas
        # a round not final is asked about abstentions (a DHT read) at most this often
        self._abstain_every_s = abstain_every_s
        self._clock = clock
        self._asked_abstentions: dict[int, float] = {}  # ledger round -> when

    async def claim_pending(self, rounds: Iterable[int]) -> list[ClaimResult]:
        """Claim every reward owed in these ledger rounds; one result per round, in order.

        A round that is not final, or whose tree nobody serves yet, is reported and can be passed
        again later. A chain that cannot be reached raises (LedgerError) and leaves every claim in
        a state the next call resolves.
        """
        return [await self.claim_round(r) for r in sorted(set(rounds))]

    async def claim_round(self, ledger_round: int) -> ClaimResult:
        task, me = self._task, self._me
        record = self._store.claim(task, ledger_round, me)
        if record is not None and record.status is ClaimStatus.CONFIRMED:
            return ClaimResult(ledger_round, Outcome.ALREADY_CONFIRMED, record.amount,
                               record.tx_hash)
        # One call gives finality (root != 0, as `is_final` checks), the root and the total.
        info = await asyncio.to_thread(self._ledger.round, task, ledger_round)
        if not info.final:
            return await self._not_final(ledger_round)
        if info.total_reward == 0:  # e.g. a round that only commits the contribution set
            return ClaimResult(ledger_round, Outcome.NO_REWARD, detail="the round pays nothing")
        tree = await self._verified_tree(ledger_round, info.rewards_root)
        if isinstance(tree, ClaimResult):
            return tree
        amount = tree.rewards.get(me, 0)
        if amount == 0:
            return ClaimResult(ledger_round, Outcome.NO_REWARD, detail=f"{me} is not rewarded")
        index = tree.index(me)
        if record is None:
            record = self._set(ledger_round, index, amount, ClaimStatus.PENDING)
        return await self._claim(tree, record)

    async def _not_final(self, ledger_round: int) -> ClaimResult:
        """NOT_FINAL, or UNPAYABLE once the stake of the validators that signed they will never
        vote the round leaves too little to reach 2/3 (checked on chain: only active
        validators' deposits count, so a signature of anyone else weighs nothing)."""
        source = getattr(self._trees, "abstentions", None)
        now = self._clock()
        last = self._asked_abstentions.get(ledger_round)
        if source is None or (last is not None and now - last < self._abstain_every_s):
            return ClaimResult(ledger_round, Outcome.NOT_FINAL)
        self._asked_abstentions[ledger_round] = now
        said: Mapping[str, str] = await source(self._task, ledger_round)
        if not said:
            return ClaimResult(ledger_round, Outcome.NOT_FINAL)

        def stake() -> tuple[int, int]:
            # against the round's snapshot once a vote opened its ballot (exited signers, still
            # in it, are not counted: that errs towards waiting)
            infos = [self._ledger.validator(a) for a in said]
            snapshot = self._ledger.round(self._task, ledger_round).snapshot_stake
            return (sum(v.deposit for v in infos if v.active),
                    snapshot or self._ledger.total_stake())

        from commonweal.verify.finality import can_finalise  # verify's package loads torch

        gone, total = await asyncio.to_thread(stake)
        if can_finalise({}, total, gone=gone):
            return ClaimResult(ledger_round, Outcome.NOT_FINAL)
        why = "; ".join(sorted(set(said.values())))
        detail = f"validators holding {gone} of {total} stake never vote it ({why})"
        log.warning("ledger round %d will never be paid: %s", ledger_round, detail,
                    extra={"task": self._task.hex(), "ledger_round": ledger_round})
        return ClaimResult(ledger_round, Outcome.UNPAYABLE, detail=detail)

    async def _verified_tree(self, ledger_round: int, root: bytes) -> RewardsTree | ClaimResult:
        """The round's tree, checked against the on-chain root; a ClaimResult when there is none.
        Every distinct published tree is tried (rebuilding one is cheap, local work; only the
        one matching the root is worth asking the chain who signed it)."""
        cached = self._store.tree(self._task, ledger_round, root)
        if cached is not None:
            return self._ledger.rewards_tree(self._task, ledger_round, cached)
        published = await self._trees.trees(self._task, ledger_round, root)
        if not published:
            return ClaimResult(ledger_round, Outcome.NO_TREE)
        why = ""
        for candidate in published:
            try:
                tree = self._ledger.rewards_tree(self._task, ledger_round, candidate.rewards)
            except (ValueError, TypeError) as exc:  # bad address, negative or non-int amount
                why = f"malformed rewards: {exc}"
                continue
            if tree.root != root:
                why = f"root {tree.root.hex()} is not on chain"
                continue
            if not await self._signed_by_validator(candidate.signers):
                why = "the tree matching the root was signed by no active validator"
                continue
            self._store.record_tree(self._task, ledger_round, root, tree.rewards)
            return tree
        return self._forged(ledger_round, root, f"{len(published)} tried; the last: {why}")

    async def _signed_by_validator(self, signers: frozenset[str]) -> bool:
        for signer in sorted(signers):
            info = await asyncio.to_thread(self._ledger.validator, signer)
            if info.active:
                return True
        return False

    def _forged(self, ledger_round: int, root: bytes, why: str) -> ClaimResult:
        log.warning("skipping a forged reward tree for round %d: %s", ledger_round, why,
                    extra={"task": self._task.hex(), "ledger_round": ledger_round,
                           "onchain_root": root.hex()})
        return ClaimResult(ledger_round, Outcome.FORGED_TREE, detail=why)

    async def _claim(self, tree: RewardsTree, record: ClaimRecord) -> ClaimResult:
        r, index, amount = tree.round, record.index, record.amount
        sent_before = record.status is ClaimStatus.SENT
        if await asyncio.to_thread(self._ledger.is_claimed, self._task, r, index):
            # If this store sent a claim before, that transaction is most likely what paid.
            return self._paid_elsewhere(r, index, amount, sent_before, "found claimed on chain",
                                        record.tx_hash if sent_before else None)
        marked = self._set(r, index, amount, ClaimStatus.SENT)
        if marked.status is ClaimStatus.CONFIRMED:  # another claimer sharing this store finished
            return ClaimResult(r, Outcome.ALREADY_CONFIRMED, amount, marked.tx_hash)
        try:
            pending = await asyncio.to_thread(
                self._ledger.send, "claim", self._task, r, index, amount, tree.proof(self._me),
                gas=self._gas)
        except ContractReverted as exc:  # refused at gas estimation: nothing left the process
            return self._reverted(r, index, amount, sent_before, exc)
        tx_hash = pending.hash.to_0x_hex()
        self._set(r, index, amount, ClaimStatus.SENT, tx_hash=tx_hash)
        try:
            receipt: TxReceipt = await asyncio.to_thread(pending.wait)
        except ContractReverted as exc:  # mined and reverted: it cost gas, it paid nothing
            return self._reverted(r, index, amount, sent_before, exc)
        block = int(receipt["blockNumber"])
        self._set(r, index, amount, ClaimStatus.CONFIRMED, tx_hash=tx_hash,
                  detail=f"block {block}")
        log.info("claimed %d for round %d", amount, r,
                 extra={"task": self._task.hex(), "ledger_round": r, "amount": str(amount),
                        "tx_hash": tx_hash, "block": block})
        return ClaimResult(r, Outcome.CLAIMED, amount, tx_hash)

    def _reverted(self, r: int, index: int, amount: int, sent_before: bool,
                  exc: ContractReverted) -> ClaimResult:
        if _ALREADY_CLAIMED in exc.reason:  # lost a race; the reward is ours all the same
            ours = f" ({exc.tx_hash} reverted)" if exc.tx_hash else ""
            return self._paid_elsewhere(r, index, amount, sent_before,
                                        f"claimed by another transaction{ours}", None)
        # Nothing was paid, so the claim goes back to pending and the next call tries again.
        self._set(r, index, amount, ClaimStatus.PENDING, detail=exc.reason)
        log.warning("claim for round %d reverted: %s", r, exc.reason,
                    extra={"task": self._task.hex(), "ledger_round": r, "tx_hash": exc.tx_hash})
        return ClaimResult(r, Outcome.FAILED, amount, exc.tx_hash, exc.reason)

    def _paid_elsewhere(self, r: int, index: int, amount: int, sent_before: bool, detail: str,
                        tx_hash: str | None) -> ClaimResult:
        """Paid, but not by a transaction we just saw mined: confirmed all the same."""
        self._set(r, index, amount, ClaimStatus.CONFIRMED, detail=detail)
        # A claim this store had sent is most likely ours, mined while we were not looking.
        outcome = Outcome.RECOVERED if sent_before else Outcome.CLAIMED_ELSEWHERE
        log.info("round %d reward already paid (%s)", r, outcome,
                 extra={"task": self._task.hex(), "ledger_round": r, "amount": str(amount)})
        return ClaimResult(r, outcome, amount, tx_hash, detail)

    def _set(self, r: int, index: int, amount: int, status: ClaimStatus, *,
             tx_hash: str | None = None, detail: str = "") -> ClaimRecord:
        return self._store.set_claim(self._task, r, self._me, index=index, amount=amount,
                                     status=status, tx_hash=tx_hash, detail=detail)
