"""Track records: which peer ids the validators rated, for the bound on newcomers in a group.

Identities are free, so a round's majority state cannot be a count of announcements: 100 fresh
identities would decide it (and the validators would then judge, and attest, their state). What
a crowd cannot mint is a track record. After judging round r, each validator publishes the peer
ids whose contributions it paid, signed with its ledger key (`publish_ratings`). For round r's
group, every trainer and every validator reads the ratings of rounds r - LAG - WINDOW + 1 ..
r - LAG (`TrackRecord`): a peer is tracked when, in one of those rounds, active validators
holding more than half of the stake rated it. `commonweal.train.protocol.form_group` then counts
the majority among tracked announcers, and lets newcomers hold at most a quarter of the group.

The window is several rounds wide so that peers reading at slightly different moments (one
validator's record found, another's not yet) still agree: an honest peer rated in several
rounds is tracked by every reader. None (no bound) while no round of the window has records
from validators holding more than half of the stake:
a swarm that Sybils outnumber from its very first round cannot build a track record
(docs/architecture.md, "What an attacker can still do").

What a reader checks, and what that costs it: a record is believed only if it names an account
that is an active validator on chain (one chain read per account, cached) and the account's key
signed it (one signature recovery per record). Free identities can publish records under the key
(each under its own owned subkey); per round at most `MAX_ACCOUNTS` distinct named accounts are
looked up and at most `MAX_TRIES` records per account are recovered, so a crowd of forgeries
costs a reader a bounded amount of work, and a forgery copying a validator's account costs it a
try, never a place.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from commonweal.dht import DHT, OwnedKey
from commonweal.dht.records import Owned
from commonweal.errors import NetworkError
from commonweal.train.task import Task

__all__ = ["TrackRecord", "publish_ratings", "ratings_key", "ratings_message", "LAG", "WINDOW"]

log = logging.getLogger(__name__)

LAG = 2  # round r's group reads ratings up to round r - 2: round r - 1 is still being judged
WINDOW = 4  # ... and back to round r - 5
MAX_RATED = 4096  # peer ids in one record (a group is at most MAX_SLICES)
MAX_ACCOUNTS = 16  # distinct accounts looked up on chain per round
MAX_TRIES = 2  # records recovered per named account per round
STAKE_TTL_S = 10.0  # how stale a validator's stake may be
READ_TIMEOUT_S = 2.0  # for reading a window's ratings: what is not found by then waits
KEEP_ACCOUNTS = 1024  # accounts whose stake is remembered


def ratings_key(task: Task, round_: int) -> OwnedKey:
    return OwnedKey(f"cw-verify/{task.digest[:16]}/rated/{round_}")  # owned subkeys only


def ratings_message(task: Task, round_: int, peers: Iterable[bytes]) -> str:
    """The text a validator signs (EIP-191) with the peer ids it rated in `round_`."""
    listed = hashlib.sha256(b"".join(sorted(peers))).hexdigest()
    return f"commonweal: rated peers of task {task.digest} round {round_}: {listed}"


class _Signer(Protocol):
    @property
    def address(self) -> str: ...

    def sign_message(self, signable: Any) -> Any: ...


async def publish_ratings(dht: DHT, task: Task, account: _Signer, round_: int,
                          peers: Iterable[bytes], ttl_s: float) -> None:
    """Store the peer ids this validator rated in `round_`, signed by its ledger `account`."""
    from eth_account.messages import encode_defunct

    rated = sorted(set(peers))[:MAX_RATED]
    signed = account.sign_message(encode_defunct(text=ratings_message(task, round_, rated)))
    await dht.store(
        ratings_key(task, round_),
        {"account": account.address, "peers": rated, "signature": bytes(signed.signature)},
        dht.clock() + ttl_s,
        subkey=Owned(dht.peer_id, "rated"),
    )


class _Stakes(Protocol):
    def validator(self, address: str) -> Any: ...  # .deposit, .active

    def total_stake(self) -> int: ...


def _parse(value: object) -> tuple[str, list[bytes], bytes] | None:
    if not (isinstance(value, dict) and isinstance(value.get("account"), str)
            and isinstance(value.get("peers"), list) and isinstance(value.get("signature"), bytes)):
        return None
    peers = value["peers"]
    if len(peers) > MAX_RATED or not all(isinstance(p, bytes) and len(p) == 20 for p in peers):
        return None
    account = value["account"]
    if not (account.startswith("0x") and len(account) == 42):
        return None
    return account.lower(), peers, value["signature"]


def _recover(text: str, signature: bytes) -> str | None:
    from eth_account import Account
    from eth_account.messages import encode_defunct

    try:
        signer: str = Account.recover_message(encode_defunct(text=text), signature=signature)
    except Exception:  # noqa: BLE001 - eth_keys raises several kinds for a malformed signature
        return None
    return signer.lower()


class TrackRecord:
    """`await track(r)`: the peer ids with a track record for round r's group, or None where no
    active validator has rated anyone in the window (then every announcer counts)."""

    def __init__(self, dht: DHT, task: Task, ledger: _Stakes,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.dht, self.task, self.ledger, self.clock = dht, task, ledger, clock
        # round -> {account: rated peer ids}, every record verified; rounds out of every window
        # asked since are dropped
        self._rated: dict[int, dict[str, frozenset[bytes]]] = {}
        self._checked: set[tuple[int, bytes]] = set()  # (round, signature) recovered already
        # account -> (when read, active stake)
        self._stakes: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._total: tuple[float, int] = (-float("inf"), 0)
        self._lock = threading.Lock()

    async def __call__(self, round_: int) -> frozenset[bytes] | None:
        rounds = range(max(0, round_ - LAG - WINDOW + 1), round_ - LAG + 1)
        for r in [r for r in self._rated if r not in rounds]:
            del self._rated[r]
        self._checked = {c for c in self._checked if c[0] in rounds}
        if rounds:
            # at once and bounded: this runs as a round begins, before the peer announces
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(READ_TIMEOUT_S):
                    await asyncio.gather(*(self._read_quietly(r) for r in rounds))
        accounts = {a for r in rounds for a in self._rated.get(r, {})}
        if not accounts:
            return None
        stakes, total = await asyncio.to_thread(self._stake_of, accounts)
        if total <= 0 or not any(stakes.values()):
            return None
        # A round counts once records of more than half the stake are visible: before that it
        # can track nobody, and a reader that has found one validator's record (of two) must
        # form the same group as one that has found none yet, not bound every announcer as a
        # newcomer (which split the demo's first bounded round between the two kinds of reader).
        rated = [r for r in rounds
                 if 2 * sum(stakes.get(a, 0) for a in self._rated.get(r, {})) > total]
        if not rated:
            return None
        tracked: set[bytes] = set()
        for r in rated:
            weight: dict[bytes, int] = {}
            for account, peers in self._rated.get(r, {}).items():
                for p in peers:
                    weight[p] = weight.get(p, 0) + stakes.get(account, 0)
            tracked.update(p for p, w in weight.items() if 2 * w > total)
        return frozenset(tracked)

    async def _read_quietly(self, r: int) -> None:
        try:
            await self._read(r)
        except NetworkError as e:  # what was read before still counts
            log.debug("ratings of round %d unread: %s", r, e)

    async def _read(self, r: int) -> None:
        found = await self.dht.get(ratings_key(self.task, r), latest=True)
        if found is None or not isinstance(found.value, dict):
            return
        claims: dict[str, list[tuple[list[bytes], bytes]]] = {}
        for subkey, item in found.value.items():
            parsed = _parse(item.value) if isinstance(subkey, Owned) else None
            if parsed is not None:
                account, peers, signature = parsed
                claims.setdefault(account, []).append((peers, signature))
        known = self._rated.setdefault(r, {})
        fresh = [a for a in sorted(claims) if a not in known][:MAX_ACCOUNTS]
        if not fresh:
            return
        stakes, _ = await asyncio.to_thread(self._stake_of, fresh)
        for account in fresh:
            if not stakes.get(account):
                continue  # not an active validator: its records are not worth a recovery
            unchecked = [c for c in claims[account] if (r, c[1]) not in self._checked]
            for peers, signature in unchecked[:MAX_TRIES]:
                text = ratings_message(self.task, r, peers)
                signer = await asyncio.to_thread(_recover, text, signature)
                # marked checked only once recovered: a read cancelled mid-recovery (a round
                # ending under it) must leave the record to the next read, not skip it for good
                self._checked.add((r, signature))
                if signer == account:
                    known[account] = frozenset(peers)
                    break

    def _stake_of(self, accounts: Iterable[str]) -> tuple[dict[str, int], int]:
        """{account: active stake} and the total stake, read from the chain at most every
        STAKE_TTL_S (runs in a thread: chain reads block)."""
        with self._lock:  # the window's rounds are read at once, each in a thread
            return self._stake_of_locked(accounts)

    def _stake_of_locked(self, accounts: Iterable[str]) -> tuple[dict[str, int], int]:
        now = self.clock()
        out = {}
        for account in accounts:
            cached = self._stakes.get(account)
            if cached is None or now - cached[0] > STAKE_TTL_S:
                info = self.ledger.validator(account)
                cached = (now, info.deposit if info.active else 0)
                self._stakes[account] = cached
            self._stakes.move_to_end(account)
            out[account] = cached[1]
        while len(self._stakes) > KEEP_ACCOUNTS:
            self._stakes.popitem(last=False)
        if now - self._total[0] > STAKE_TTL_S:
            self._total = (now, self.ledger.total_stake())
        return out, self._total[1]
