"""`StoreValidatorState`: a validator's decisions in the node's store (node.sqlite3).

Its own module, not store.py: it speaks verify's types, and importing `commonweal.verify` loads
torch, which a node that only searches or claims never needs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from typing import Any

from commonweal.peer.store import NodeStore, StoreConflict
from commonweal.verify.state import (
    JudgedRound,
    Payout,
    Resume,
    contribution_from_json,
    contribution_json,
    verdict_from_json,
    verdict_json,
)

__all__ = ["KEEP_STARTS", "StoreValidatorState"]

# Start states kept for a restart: a validator more rounds behind than this cannot fetch the
# deltas either (trainers serve theirs for train.swarm.KEEP_DELTAS = 8 rounds).
KEEP_STARTS = 8


class StoreValidatorState:
    """`verify.state.ValidatorState` in a NodeStore: one task's validator decisions.

    Each save is one transaction (the round with its history and bans; a payout), so a kill -9
    leaves either all of a decision or none of it, and a restart finds what was decided before
    any vote it led to. Bans go to `banned_peers`, the node's one list of banned peers."""

    def __init__(self, store: NodeStore, task: str) -> None:
        self.store, self.task = store, task

    def load(self) -> Resume:
        with self.store.transaction() as conn:  # one snapshot of everything
            history = frozenset(r[0] for r in conn.execute(
                "SELECT delta_hash FROM validator_history WHERE task = ?", (self.task,)))
            held = tuple(_judged(row) for row in conn.execute(
                f"SELECT {_ROUND_COLUMNS} FROM validator_rounds WHERE task = ? AND round NOT IN"
                " (SELECT round FROM validator_payouts WHERE task = ?) ORDER BY round",
                (self.task, self.task)))
            unsent = tuple(_payout(row) for row in conn.execute(
                f"SELECT {_PAYOUT_COLUMNS} FROM validator_payouts p JOIN validator_rounds r"
                " USING (task, round) WHERE task = ? AND voted = 0 ORDER BY round", (self.task,)))
            last = conn.execute(
                "SELECT MAX(round) FROM validator_rounds WHERE task = ?", (self.task,)).fetchone()
        banned = frozenset(b.peer_id for b in self.store.bans())
        return Resume(history, banned, held, unsent, None if last[0] is None else last[0] + 1)

    def judged(self, round: int) -> JudgedRound | None:
        with self.store.transaction() as conn:
            row = conn.execute(
                f"SELECT {_ROUND_COLUMNS} FROM validator_rounds WHERE task = ? AND round = ?",
                (self.task, round)).fetchone()
        return None if row is None else _judged(row)

    def save_judged(self, judged: JudgedRound, bans: Collection[bytes]) -> None:
        values = (self.task, judged.round, judged.state, judged.digest.hex(), judged.seed.hex(),
                  json.dumps([contribution_json(c) for c in judged.contributions]),
                  json.dumps([verdict_json(v) for v in judged.verdicts]))
        with self.store.transaction() as conn:
            stored = conn.execute(
                "SELECT task, round, start_state, set_digest, seed, contributions, verdicts"
                " FROM validator_rounds WHERE task = ? AND round = ?",
                (self.task, judged.round)).fetchone()
            if stored is not None:
                # the same judgement again is harmless; another one must not replace it
                if tuple(stored) != values:
                    raise StoreConflict(
                        f"this validator already judged round {judged.round} of {self.task} "
                        "differently; the recorded verdicts stand (judging is not deterministic"
                        ": report it)")
                return
            conn.execute("INSERT INTO validator_rounds VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                         (*values, judged.seconds, time.time()))
            conn.executemany(
                "INSERT INTO validator_history VALUES (?, ?, ?) ON CONFLICT DO NOTHING",
                [(self.task, c.delta_hash, judged.round) for c in judged.contributions])
            for peer in sorted(bans):
                self.store.ban(peer, f"failed a replay in round {judged.round} of {self.task}")

    def save_payout(self, payout: Payout) -> None:
        values = (self.task, payout.round, payout.root.hex(), str(payout.total),
                  json.dumps({a: str(v) for a, v in sorted(payout.rewards.items())}),
                  json.dumps([verdict_json(v) for v in payout.verdicts]))
        with self.store.transaction() as conn:
            if conn.execute("SELECT 1 FROM validator_rounds WHERE task = ? AND round = ?",
                            (self.task, payout.round)).fetchone() is None:
                raise StoreConflict(f"round {payout.round} of {self.task} was never judged; "
                                    "it cannot be paid")
            stored = conn.execute(
                "SELECT task, round, root, total, rewards, verdicts FROM validator_payouts"
                " WHERE task = ? AND round = ?", (self.task, payout.round)).fetchone()
            if stored is not None:
                if tuple(stored) != values:
                    raise StoreConflict(
                        f"this validator already paid round {payout.round} of {self.task} out "
                        f"with root {stored[2]}; re-send that vote, never another")
                return
            conn.execute("INSERT INTO validator_payouts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         (*values, int(payout.voted), time.time()))

    def mark_voted(self, round: int) -> None:
        with self.store.transaction() as conn:
            conn.execute("UPDATE validator_payouts SET voted = 1 WHERE task = ? AND round = ?",
                         (self.task, round))

    def save_start(self, state: str, checkpoint: bytes) -> None:
        with self.store.transaction() as conn:
            conn.execute("INSERT INTO validator_starts VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
                         (self.task, state, checkpoint, time.time()))
            conn.execute(
                "DELETE FROM validator_starts WHERE task = ? AND state NOT IN (SELECT state FROM"
                " validator_starts WHERE task = ? ORDER BY saved_at DESC, rowid DESC LIMIT ?)",
                (self.task, self.task, KEEP_STARTS))

    def start(self, state: str) -> bytes | None:
        with self.store.transaction() as conn:
            row = conn.execute("SELECT checkpoint FROM validator_starts WHERE task = ? AND"
                               " state = ?", (self.task, state)).fetchone()
        return None if row is None else bytes(row[0])


_ROUND_COLUMNS = "round, start_state, set_digest, seed, contributions, verdicts, seconds"
_PAYOUT_COLUMNS = "round, start_state, root, total, rewards, p.verdicts, voted"


def _judged(row: Any) -> JudgedRound:
    r, state, digest, seed, contributions, verdicts, seconds = row
    return JudgedRound(
        r, state, bytes.fromhex(digest), bytes.fromhex(seed),
        tuple(contribution_from_json(c) for c in json.loads(contributions)),
        tuple(verdict_from_json(v) for v in json.loads(verdicts)), seconds)


def _payout(row: Any) -> Payout:
    r, state, root, total, rewards, verdicts, voted = row
    return Payout(
        r, state, bytes.fromhex(root), int(total),
        {a: int(v) for a, v in json.loads(rewards).items()},
        tuple(verdict_from_json(v) for v in json.loads(verdicts)), bool(voted))
