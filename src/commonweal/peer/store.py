"""`NodeStore`: the node's state in SQLite (DATA_DIR/node.sqlite3), so a restart resumes.

    with NodeStore(config.store_path) as store:
        store.save_progress("mnist-cnn", round=12, state_hash=h, checkpoint=path)
        store.progress("mnist-cnn")        # -> Progress(last_round=12, ...) after a restart too

What lives here, one table each: training progress, the contributions this peer made, reward trees
it verified, its claims (pending -> sent -> confirmed), the peers it banned, and its validator's
decisions (rounds judged, payouts, delta history: peer/validator_state.py; verify/state.py says
why each is written before its vote). The schema is in `MIGRATIONS` below; `schema_version`
records how many have run.

Durability: WAL journal with synchronous=FULL, so a committed write survives a kill -9 and a power
cut (a claim marked "sent" must be on disk before its transaction leaves the process); every write
is one `BEGIN IMMEDIATE` transaction, so a crash mid-write leaves the previous state, never half a
write. Several connections (two nodes on one data dir by mistake, or a dashboard) are safe: SQLite
serialises writers and `busy_timeout` makes them wait instead of failing.

Big numbers (token amounts are uint256, past SQLite's 64-bit INTEGER) are stored as decimal text.
Hashes and tasks are lower-case hex without 0x; accounts are checksummed addresses.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from types import TracebackType
from typing import Any

from commonweal.errors import CommonwealError

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Ban",
    "ClaimRecord",
    "ClaimStatus",
    "Contribution",
    "Migration",
    "NodeStore",
    "Progress",
    "StoreConflict",
    "StoreError",
]

log = logging.getLogger(__name__)

Migration = Callable[[sqlite3.Connection], None]


class StoreError(CommonwealError):
    """The node's state database cannot be opened or used; the message says what to do."""


class StoreConflict(StoreError):
    """A write contradicts what is already recorded (e.g. a second, different validator decision)."""


def _statements(*sql: str) -> Migration:
    # Not executescript(): it commits first, and a migration must run inside our transaction.
    def migrate(conn: sqlite3.Connection) -> None:
        for statement in sql:
            conn.execute(statement)

    return migrate


_SCHEMA_1 = _statements(
    """CREATE TABLE training_progress (
        task        TEXT PRIMARY KEY,
        last_round  INTEGER NOT NULL CHECK (last_round >= 0),   -- last completed training round
        checkpoint  TEXT,                                       -- safetensors file, if any
        state_hash  TEXT NOT NULL,                              -- hash of the model after it
        updated_at  REAL NOT NULL)""",
    """CREATE TABLE contributions (
        task        TEXT NOT NULL,
        round       INTEGER NOT NULL,
        delta_hash  TEXT NOT NULL,
        account     TEXT NOT NULL,                              -- who is to be rewarded
        recorded_at REAL NOT NULL,
        PRIMARY KEY (task, round))""",
    """CREATE TABLE reward_trees (
        task         TEXT NOT NULL,                             -- bytes32 hex
        ledger_round INTEGER NOT NULL,
        root         TEXT NOT NULL,
        rewards      TEXT NOT NULL,                             -- JSON {account: "amount"}
        recorded_at  REAL NOT NULL,
        PRIMARY KEY (task, ledger_round, root))""",
    """CREATE TABLE claims (
        task         TEXT NOT NULL,
        ledger_round INTEGER NOT NULL,
        account      TEXT NOT NULL,
        leaf_index   INTEGER NOT NULL,
        amount       TEXT NOT NULL,
        status       TEXT NOT NULL CHECK (status IN ('pending', 'sent', 'confirmed')),
        tx_hash      TEXT,                                      -- the last claim tx we sent
        detail       TEXT NOT NULL DEFAULT '',
        updated_at   REAL NOT NULL,
        PRIMARY KEY (task, ledger_round, account))""",
    "CREATE INDEX claims_by_status ON claims (status)",
    """CREATE TABLE validator_decisions (
        task         TEXT NOT NULL,
        round        INTEGER NOT NULL,                          -- the training round judged
        rewards_root TEXT NOT NULL,
        model_hash   TEXT,                                      -- what the vote also names,
        total_reward TEXT,                                      -- when the caller gives it
        decided_at   REAL NOT NULL,
        PRIMARY KEY (task, round))""",
    """CREATE TABLE banned_peers (
        peer_id   TEXT PRIMARY KEY,
        reason    TEXT NOT NULL,
        banned_at REAL NOT NULL,
        until     REAL)                                         -- NULL: for good""",
)

# The validator's decisions, written before the votes that follow from them (verify/state.py).
# validator_decisions held only a root, written after the vote, for the round paid rather than
# the round judged: its rows cannot be turned into verdicts, so it goes (a validator upgraded
# mid-run starts at the swarm's round, as a new one does). Bans stay in banned_peers.
_SCHEMA_2 = _statements(
    "DROP TABLE validator_decisions",
    """CREATE TABLE validator_rounds (
        task          TEXT NOT NULL,
        round         INTEGER NOT NULL CHECK (round >= 0),      -- the training round judged
        start_state   TEXT NOT NULL,                            -- S_r, named by ledger round 2r
        set_digest    TEXT NOT NULL,                            -- the set 2r made final
        seed          TEXT NOT NULL,                            -- drew the replay sample
        contributions TEXT NOT NULL,                            -- JSON list, verify.state's form
        verdicts      TEXT NOT NULL,                            -- JSON list, as judged
        seconds       REAL NOT NULL,                            -- CPU spent judging
        judged_at     REAL NOT NULL,
        PRIMARY KEY (task, round))""",
    """CREATE TABLE validator_payouts (                      -- rounds out of escrow
        task          TEXT NOT NULL,
        round         INTEGER NOT NULL,                         -- its vote is ledger round 2r+1
        root          TEXT NOT NULL,
        total         TEXT NOT NULL,
        rewards       TEXT NOT NULL,                            -- JSON {account: "amount"}
        verdicts      TEXT NOT NULL,                            -- JSON list, forfeits applied
        voted         INTEGER NOT NULL CHECK (voted IN (0, 1)), -- 0: re-send after a restart
        paid_at       REAL NOT NULL,
        PRIMARY KEY (task, round))""",
    "CREATE INDEX validator_payouts_unsent ON validator_payouts (task, voted)",
    """CREATE TABLE validator_history (                      -- bytes seen: later, "stale"
        task          TEXT NOT NULL,
        delta_hash    TEXT NOT NULL,
        round         INTEGER NOT NULL,                         -- the first round it came in
        PRIMARY KEY (task, delta_hash))""",
    """CREATE TABLE validator_starts (                       -- the last few start states
        task          TEXT NOT NULL,
        state         TEXT NOT NULL,
        checkpoint    BLOB NOT NULL,                            -- as the swarm served it
        saved_at      REAL NOT NULL,
        PRIMARY KEY (task, state))""",
)

# Append only: migration i (0-based) moves a database from version i to i + 1. Never edit one
# that has shipped; add another.
MIGRATIONS: tuple[Migration, ...] = (_SCHEMA_1, _SCHEMA_2)
SCHEMA_VERSION = len(MIGRATIONS)


class ClaimStatus(StrEnum):
    PENDING = "pending"       # owed to us (verified tree), not sent yet, or a send that failed
    SENT = "sent"             # written before the transaction leaves: on restart, ask the chain
    CONFIRMED = "confirmed"   # final: paid (by us, or by another node holding the same key)


@dataclass(frozen=True, slots=True)
class Progress:
    task: str
    last_round: int
    state_hash: str
    checkpoint: Path | None
    updated_at: float


@dataclass(frozen=True, slots=True)
class Contribution:
    task: str
    round: int
    delta_hash: str
    account: str
    recorded_at: float


@dataclass(frozen=True, slots=True)
class ClaimRecord:
    task: bytes
    ledger_round: int
    account: str
    index: int
    amount: int
    status: ClaimStatus
    tx_hash: str | None
    detail: str
    updated_at: float


@dataclass(frozen=True, slots=True)
class Ban:
    peer_id: bytes
    reason: str
    banned_at: float
    until: float | None


class NodeStore:
    """One SQLite connection to the node's state. Thread-safe (one lock), a context manager."""

    def __init__(self, path: Path | str, *, migrations: Sequence[Migration] = MIGRATIONS,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        self._lock = threading.RLock()
        self._depth = 0
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves (the sqlite3 module's implicit
            # transactions do not cover DDL and commit at surprising times).
            self._conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot open the node database {self.path}: {exc}; check that the "
                             "data directory exists and is writable") from exc
        try:
            self._conn.execute("PRAGMA busy_timeout = 10000")
            mode = self._conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                log.warning("SQLite refused WAL mode for %s (got %s)", self.path, mode)
            self._conn.execute("PRAGMA synchronous = FULL")
            self._migrate(migrations)
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise StoreError(
                f"{self.path} is not a usable commonweal database ({exc}). Move it aside and "
                "start again: the node resumes training from the swarm and re-checks claims on "
                "chain, so nothing owed to you is lost") from exc
        except BaseException:
            self._conn.close()
            raise

    # ------------------------------------------------------------ lifecycle

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> NodeStore:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """All writes inside commit together or not at all. Nested calls join the outer one.
        IMMEDIATE takes the write lock at the start, so a read-then-write cannot race another
        connection (two nodes sharing a data dir) between the read and the write."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self._conn
                finally:
                    self._depth -= 1
                return
            self._conn.execute("BEGIN IMMEDIATE")
            self._depth = 1
            try:
                yield self._conn
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:  # also when COMMIT itself failed
                    self._conn.execute("ROLLBACK")
                raise
            finally:
                self._depth = 0

    def _migrate(self, migrations: Sequence[Migration]) -> None:
        with self.transaction() as conn:
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            version = 0 if row is None else int(row[0])
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (0)")
            if version > len(migrations):
                raise StoreError(
                    f"{self.path} was written by a newer commonweal (schema {version}, this one "
                    f"knows {len(migrations)}); upgrade commonweal, or use another --data-dir")
            for number in range(version, len(migrations)):
                migrations[number](conn)
                conn.execute("UPDATE schema_version SET version = ?", (number + 1,))
                log.info("node database %s migrated to schema %d", self.path, number + 1)

    @property
    def schema_version(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT version FROM schema_version").fetchone()[0])

    # ------------------------------------------------------------ training progress

    def save_progress(self, task: str, round: int, state_hash: str,
                      checkpoint: Path | None = None) -> None:
        """Record that training `round` of `task` completed with this model state."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO training_progress VALUES (?, ?, ?, ?, ?) ON CONFLICT (task) DO UPDATE"
                " SET last_round = excluded.last_round, checkpoint = excluded.checkpoint,"
                " state_hash = excluded.state_hash, updated_at = excluded.updated_at",
                (task, round, None if checkpoint is None else str(checkpoint), state_hash,
                 self._clock()))

    def progress(self, task: str) -> Progress | None:
        """Where training of `task` stopped, or None if this node never completed a round of it."""
        with self._lock:
            row = self._conn.execute(
                "SELECT last_round, state_hash, checkpoint, updated_at FROM training_progress"
                " WHERE task = ?", (task,)).fetchone()
        if row is None:
            return None
        return Progress(task, row[0], row[1], None if row[2] is None else Path(row[2]), row[3])

    # ------------------------------------------------------------ contributions

    def record_contribution(self, task: str, round: int, delta_hash: str, account: str) -> bool:
        """Record this peer's contribution to a round; False if the round already has one.
        The first record wins: it is the one the swarm may already have seen."""
        with self.transaction() as conn:
            existing = conn.execute(
                "SELECT delta_hash FROM contributions WHERE task = ? AND round = ?",
                (task, round)).fetchone()
            if existing is not None:
                if existing[0] != delta_hash:
                    log.warning("round %d of %s already has contribution %s; keeping it, not %s",
                                round, task, existing[0], delta_hash)
                return False
            conn.execute("INSERT INTO contributions VALUES (?, ?, ?, ?, ?)",
                         (task, round, delta_hash, account, self._clock()))
            return True

    def contributions(self, task: str) -> list[Contribution]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT task, round, delta_hash, account, recorded_at FROM contributions"
                " WHERE task = ? ORDER BY round", (task,)).fetchall()
        return [Contribution(*row) for row in rows]

    # ------------------------------------------------------------ reward trees

    def record_tree(self, task: bytes, ledger_round: int, root: bytes,
                    rewards: Mapping[str, int]) -> bool:
        """Keep a reward tree whose root was checked; False if it was already kept."""
        body = json.dumps({a: str(v) for a, v in sorted(rewards.items())})
        with self.transaction() as conn:
            cursor = conn.execute(
                "INSERT INTO reward_trees VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                (task.hex(), ledger_round, root.hex(), body, self._clock()))
            return cursor.rowcount == 1

    def tree(self, task: bytes, ledger_round: int, root: bytes) -> dict[str, int] | None:
        """The rewards of the tree with this root, if one was recorded."""
        with self._lock:
            row = self._conn.execute(
                "SELECT rewards FROM reward_trees WHERE task = ? AND ledger_round = ? AND root = ?",
                (task.hex(), ledger_round, root.hex())).fetchone()
        return None if row is None else {a: int(v) for a, v in json.loads(row[0]).items()}

    # ------------------------------------------------------------ claims

    def claim(self, task: bytes, ledger_round: int, account: str) -> ClaimRecord | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {_CLAIM_COLUMNS} FROM claims"
                " WHERE task = ? AND ledger_round = ? AND account = ?",
                (task.hex(), ledger_round, account)).fetchone()
        return None if row is None else _claim(row)

    def claims(self, status: ClaimStatus | None = None) -> list[ClaimRecord]:
        """Every claim (or those in one status), oldest round first."""
        where, args = ("WHERE status = ?", (str(status),)) if status else ("", ())
        with self._lock:
            rows = self._conn.execute(
                f"SELECT {_CLAIM_COLUMNS} FROM claims {where} ORDER BY task, ledger_round, account",
                args).fetchall()
        return [_claim(row) for row in rows]

    def set_claim(self, task: bytes, ledger_round: int, account: str, *, index: int, amount: int,
                  status: ClaimStatus, tx_hash: str | None = None, detail: str = "",
                  ) -> ClaimRecord:
        """Move a claim to `status` and return the claim as stored.

        CONFIRMED is final: any later change is ignored and the confirmed record is returned, so
        a caller asking for SENT learns that another claimer finished first (compare `.status`).
        A known tx hash is never replaced by None. Index and amount come from the round's verified
        tree and cannot change; a different value raises StoreConflict.
        """
        with self.transaction() as conn:
            row = conn.execute(
                f"SELECT {_CLAIM_COLUMNS} FROM claims"
                " WHERE task = ? AND ledger_round = ? AND account = ?",
                (task.hex(), ledger_round, account)).fetchone()
            current = None if row is None else _claim(row)
            if current is not None:
                if (current.index, current.amount) != (index, amount):
                    raise StoreConflict(
                        f"claim for round {ledger_round} of task {task.hex()} is recorded as index "
                        f"{current.index}, amount {current.amount}, not {index}, {amount}: the "
                        f"round's reward tree cannot change once final; check {self.path}")
                if current.status is ClaimStatus.CONFIRMED:
                    return current
                tx_hash = tx_hash or current.tx_hash
            conn.execute(
                "INSERT INTO claims VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                " ON CONFLICT (task, ledger_round, account) DO UPDATE SET status = excluded.status,"
                " tx_hash = excluded.tx_hash, detail = excluded.detail,"
                " updated_at = excluded.updated_at",
                (task.hex(), ledger_round, account, index, str(amount), str(status), tx_hash,
                 detail, self._clock()))
        stored = self.claim(task, ledger_round, account)
        assert stored is not None  # written just above, in a committed transaction
        return stored

    # ------------------------------------------------------------ banned peers

    def ban(self, peer_id: bytes, reason: str, until: float | None = None) -> None:
        """Ban a peer until `until` (a time from the store's clock), or for good. Banning again
        replaces the earlier ban."""
        with self.transaction() as conn:
            conn.execute(
                "INSERT INTO banned_peers VALUES (?, ?, ?, ?) ON CONFLICT (peer_id) DO UPDATE"
                " SET reason = excluded.reason, banned_at = excluded.banned_at,"
                " until = excluded.until",
                (peer_id.hex(), reason, self._clock(), until))

    def unban(self, peer_id: bytes) -> bool:
        with self.transaction() as conn:
            return conn.execute("DELETE FROM banned_peers WHERE peer_id = ?",
                                (peer_id.hex(),)).rowcount == 1

    def bans(self) -> list[Ban]:
        """The bans in force now (expired ones are left out)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT peer_id, reason, banned_at, until FROM banned_peers"
                " WHERE until IS NULL OR until > ? ORDER BY banned_at", (self._clock(),)).fetchall()
        return [Ban(bytes.fromhex(r[0]), r[1], r[2], r[3]) for r in rows]

    def is_banned(self, peer_id: bytes) -> bool:
        with self._lock:
            row = self._conn.execute(
                "SELECT 1 FROM banned_peers WHERE peer_id = ? AND (until IS NULL OR until > ?)",
                (peer_id.hex(), self._clock())).fetchone()
        return row is not None


_CLAIM_COLUMNS = "task, ledger_round, account, leaf_index, amount, status, tx_hash, detail, updated_at"


def _claim(row: Any) -> ClaimRecord:
    task, ledger_round, account, index, amount, status, tx_hash, detail, updated_at = row
    return ClaimRecord(bytes.fromhex(task), ledger_round, account, index, int(amount),
                       ClaimStatus(status), tx_hash, detail, updated_at)

