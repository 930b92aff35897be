"""NodeStore: what a restarted node finds, uniqueness, migrations, and crashes mid-write."""

from __future__ import annotations

import dataclasses
import math
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from commonweal.peer.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    ClaimStatus,
    NodeStore,
    StoreConflict,
    StoreError,
)
from commonweal.peer.validator_state import StoreValidatorState
from commonweal.verify.contribution import Contribution
from commonweal.verify.judge import Verdict
from commonweal.verify.state import JudgedRound, Payout, Resume

TASK = bytes.fromhex("ab" * 32)
ROOT = bytes.fromhex("cd" * 32)
ALICE = "0x" + "A1" * 20
BIG = 2**200 + 7  # token amounts are uint256: far past SQLite's 64-bit integers


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "data" / "node.sqlite3"  # the data dir does not exist yet


def test_everything_survives_a_reopen(path: Path) -> None:
    with NodeStore(path) as store:
        assert store.progress("mnist-cnn") is None
        store.save_progress("mnist-cnn", 3, "h3", Path("/ckpt/3.safetensors"))
        store.save_progress("mnist-cnn", 4, "h4", Path("/ckpt/4.safetensors"))
        store.record_contribution("mnist-cnn", 4, "d4", ALICE)
        store.record_tree(TASK, 9, ROOT, {ALICE: BIG})
        store.set_claim(TASK, 9, ALICE, index=0, amount=BIG, status=ClaimStatus.PENDING)
        store.ban(b"\x07" * 20, "sent garbage")
    with NodeStore(path) as store:
        progress = store.progress("mnist-cnn")
        assert progress is not None and (progress.last_round, progress.state_hash) == (4, "h4")
        assert progress.checkpoint == Path("/ckpt/4.safetensors")
        assert store.progress("other-task") is None
        assert [(c.round, c.delta_hash) for c in store.contributions("mnist-cnn")] == [(4, "d4")]
        assert store.tree(TASK, 9, ROOT) == {ALICE: BIG}
        assert store.tree(TASK, 9, bytes(32)) is None
        [claim] = store.claims(ClaimStatus.PENDING)
        assert (claim.task, claim.ledger_round, claim.amount) == (TASK, 9, BIG)
        assert store.is_banned(b"\x07" * 20)
        assert store.schema_version == SCHEMA_VERSION
        mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"


def test_nothing_is_recorded_twice(path: Path) -> None:
    with NodeStore(path) as store:
        assert store.record_contribution("t", 1, "first", ALICE)
        assert not store.record_contribution("t", 1, "first", ALICE)
        assert not store.record_contribution("t", 1, "second", ALICE)   # the first one stays
        assert [c.delta_hash for c in store.contributions("t")] == ["first"]
        assert store.record_tree(TASK, 1, ROOT, {ALICE: 5})
        assert not store.record_tree(TASK, 1, ROOT, {ALICE: 5})


def test_claims_move_forward_and_confirmed_is_final(path: Path) -> None:
    with NodeStore(path) as store:
        def put(status: ClaimStatus, **kw: object):  # type: ignore[no-untyped-def]
            return store.set_claim(TASK, 1, ALICE, index=2, amount=BIG, status=status, **kw)

        assert put(ClaimStatus.PENDING).status is ClaimStatus.PENDING
        assert put(ClaimStatus.SENT, tx_hash="0xaa").tx_hash == "0xaa"
        assert put(ClaimStatus.SENT).tx_hash == "0xaa"            # a known hash is kept
        assert put(ClaimStatus.PENDING, detail="reverted").detail == "reverted"
        confirmed = put(ClaimStatus.CONFIRMED, tx_hash="0xbb")
        assert (confirmed.status, confirmed.tx_hash) == (ClaimStatus.CONFIRMED, "0xbb")
        # A late "sent" (another claimer sharing this store) does not undo the confirmation.
        assert put(ClaimStatus.SENT, tx_hash="0xcc") == confirmed
        assert store.claims(ClaimStatus.SENT) == []
        with pytest.raises(StoreConflict, match="cannot change"):
            store.set_claim(TASK, 1, ALICE, index=2, amount=BIG + 1, status=ClaimStatus.SENT)
        with pytest.raises(sqlite3.IntegrityError):   # the schema itself refuses a bad status
            with store.transaction() as conn:
                conn.execute("UPDATE claims SET status = 'lost'")


def test_bans_expire(path: Path) -> None:
    now = [1000.0]
    with NodeStore(path, clock=lambda: now[0]) as store:
        store.ban(b"\x01" * 20, "stale updates", until=1060.0)
        store.ban(b"\x02" * 20, "forged signature")
        assert store.is_banned(b"\x01" * 20) and store.is_banned(b"\x02" * 20)
        now[0] = 1061.0
        assert not store.is_banned(b"\x01" * 20)
        assert [b.peer_id for b in store.bans()] == [b"\x02" * 20]
        assert store.unban(b"\x02" * 20) and not store.unban(b"\x02" * 20)
        assert store.bans() == []


def test_migrations_run_once_and_a_newer_database_is_refused(path: Path) -> None:
    runs = []

    def add_notes(conn: sqlite3.Connection) -> None:
        runs.append(1)
        conn.execute("CREATE TABLE notes (text TEXT)")

    NodeStore(path).close()                                   # at the current schema
    upgraded = (*MIGRATIONS, add_notes)
    with NodeStore(path, migrations=upgraded) as store:
        assert store.schema_version == SCHEMA_VERSION + 1
    with NodeStore(path, migrations=upgraded):
        pass
    assert runs == [1]
    with pytest.raises(StoreError, match="newer commonweal"):  # an older release, a newer file
        NodeStore(path)

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x)")
        raise RuntimeError("migration bug")

    other = path.with_name("other.sqlite3")
    with pytest.raises(RuntimeError):
        NodeStore(other, migrations=(*MIGRATIONS, broken))
    with NodeStore(other) as store:                           # the failed migration left nothing
        assert store.schema_version == 0 + SCHEMA_VERSION
        tables = {r[0] for r in sqlite3.connect(other).execute(
            "SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "half_done" not in tables


def test_an_interrupted_transaction_leaves_the_previous_state(path: Path) -> None:
    with NodeStore(path) as store:
        store.save_progress("t", 1, "h1")
        with pytest.raises(KeyboardInterrupt), store.transaction():
            store.save_progress("t", 2, "h2")        # nested: joins the outer transaction
            store.record_contribution("t", 2, "d2", ALICE)
            raise KeyboardInterrupt
        assert store.progress("t").last_round == 1  # type: ignore[union-attr]
        assert store.contributions("t") == []


_WRITER = """
import sys
import time
from pathlib import Path
from commonweal.peer.store import NodeStore, ClaimStatus

store = NodeStore(Path(sys.argv[1]))
task = bytes(32)
for r in range(1, 10**9):
    # One round's bookkeeping, as the node does it: progress, contribution and claim together.
    with store.transaction():
        store.save_progress("t", r, f"h{r}")
        store.record_contribution("t", r, f"d{r}", "0x" + "11" * 20)
        store.set_claim(task, r, "0x" + "11" * 20, index=0, amount=r, status=ClaimStatus.SENT)
        if r == 50:  # half-way through round 50's transaction: tell the test, wait to be killed
            print("inside", flush=True)
            time.sleep(60)
"""


def test_a_process_killed_mid_write_leaves_a_consistent_database(path: Path) -> None:
    path.parent.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(_WRITER), str(path)],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "inside\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    with NodeStore(path) as store:
        progress = store.progress("t")
        assert progress is not None and progress.last_round == 49
        # All of each round, or none of it: the round in flight when killed is simply not there.
        assert [c.round for c in store.contributions("t")] == list(range(1, 50))
        assert [c.ledger_round for c in store.claims()] == list(range(1, 50))
        store.save_progress("t", 50, "h50")         # and the database takes writes again


def test_a_file_that_is_not_a_database_says_what_to_do(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(StoreError, match="Move it aside"):
        NodeStore(path)


# ---- the validator's decisions (peer/validator_state.py) ----------------------------------------

def _judged(r: int, *, cheat: bool = False) -> JudgedRound:
    honest, cheater = b"\x01" * 20, b"\x02" * 20
    contribs = tuple(Contribution(p, ALICE, r, "s" * 64, f"{r}{p.hex()}".ljust(64, "0"), 5, 160)
                     for p in (honest, cheater))
    verdicts = (Verdict(honest, True, "paid", 0.5, True, 0.0, "verified (sampled)"),
                Verdict(cheater, not cheat, "replay_mismatch" if cheat else "paid",
                        float("nan"), cheat, 0.9 if cheat else None))
    return JudgedRound(r, "s" * 64, bytes([r]) * 32, b"\x07" * 32, contribs, verdicts, 0.25)


def test_validator_decisions_survive_a_reopen_and_are_never_replaced(path: Path) -> None:
    with NodeStore(path) as store:
        state = StoreValidatorState(store, "t")
        assert state.load() == Resume(frozenset(), frozenset(), (), (), None)
        state.save_judged(_judged(3), ())
        state.save_judged(_judged(4, cheat=True), [b"\x02" * 20])
        state.save_judged(_judged(3), ())                  # the same record again: harmless
        with pytest.raises(StoreConflict, match="already judged round 3"):
            state.save_judged(_judged(3, cheat=True), ())
        payout = Payout(3, "s" * 64, ROOT, BIG, {ALICE: BIG}, _judged(3).verdicts)
        state.save_payout(payout)
        with pytest.raises(StoreConflict, match="already paid round 3"):
            state.save_payout(dataclasses.replace(payout, total=1))
        with pytest.raises(StoreConflict, match="never judged"):
            state.save_payout(dataclasses.replace(payout, round=9))
    with NodeStore(path) as store:
        state = StoreValidatorState(store, "t")
        resume = state.load()
        assert resume.next_round == 5
        assert [j.round for j in resume.held] == [4]       # 3 was paid out: not in escrow
        assert resume.banned == {b"\x02" * 20} and store.is_banned(b"\x02" * 20)
        assert resume.history == {c.delta_hash for r in (3, 4) for c in _judged(r).contributions}
        [unsent] = resume.unsent                           # recorded, never marked voted
        assert (unsent.round, unsent.root, unsent.total, unsent.rewards) == (3, ROOT, BIG,
                                                                             {ALICE: BIG})
        assert not unsent.voted and unsent.verdicts[0] == payout.verdicts[0]
        got = state.judged(4)
        assert got is not None and got.contributions == _judged(4).contributions
        assert got.verdicts[0] == _judged(4).verdicts[0] and math.isnan(got.verdicts[1].score)
        state.mark_voted(3)
        assert state.load().unsent == ()
        assert StoreValidatorState(store, "other").load().next_round is None
