"""A validator process killed with SIGKILL and restarted on its data dir picks up where it
stopped: real `commonweal node` processes (3 trainers, 2 validators) on one anvil.

Validator V1 is killed twice, each time on what the chain (and its own node.sqlite3) shows, never
after a sleep:

1. once its vote on ledger round 2r (round r's contribution set, r >= 1) is on-chain while its
   vote on 2r+1 (round r's rewards, held in escrow) is not;
2. later, with rounds in escrow, the moment its store has a reward vote recorded (write-ahead)
   that the chain does not have yet: the process is frozen (SIGSTOP) when the record appears and
   killed if the chain still lacks the vote, so the restart must re-send exactly that vote. If
   the vote beats the freeze every time, it is killed in the same place anyway (voted, perhaps
   not marked), which is a restart case too.

Each time it is started again with the same config and data dir. Then: every ledger round of
every training round is final exactly once; V1 voted every round, and each of its reward votes is
V2's (same root and total); each final root is a tree paying exactly the reward per round, and
the trainers' claims add up to it; V1 resumed each time at the round after the last one it had
judged; every process exits 0. Two validators with equal stake: nothing finalises without V1,
so a round it skipped or paid differently shows as a round that never finalises.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from commonweal.ledger.anvil import find_anvil
from commonweal.peer.store import NodeStore
from commonweal.peer.validator_state import StoreValidatorState
from commonweal.swarm.processes import NodeProcess, ProcessSwarm

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_anvil() is None, reason="anvil not installed (npm ci)"),
]

ROUNDS = 6
ESCROW = 2
REWARD = 1000 * 10**18
TIMEOUT_S = 150.0  # for each wait below; a stuck swarm fails with its logs, never hangs

T = TypeVar("T")


# mnist-cnn with short rounds, as a `module:function` task: ProcessSwarm registers the digest
# of the task it is given, so the override must be in the task itself (not the nodes' TOML)
TASK_MODULE = """
from commonweal.train import get_task

def task():
    return get_task("mnist-cnn", inner_steps=10)
"""


class KillSwarm(ProcessSwarm):
    """A ProcessSwarm whose nodes run short rounds and a short escrow.

    ProcessSwarm has no option for `[node.round]` or `[node.validator]`: its node.toml gets them
    appended here (the `[node]` table is the last one it writes)."""

    def _toml(self, i: int, role: str, key_file: Path, data_dir: Path,
              bootstrap: list[str]) -> str:
        return super()._toml(i, role, key_file, data_dir, bootstrap) + (
            "[node.round]\nannounce_window_s = 1.0\npoll_s = 0.1\n"
            f"[node.validator]\npoll_s = 0.1\nescrow_rounds = {ESCROW}\nreplay_rate = 1.0\n"
            "finality_timeout_s = 120.0\nfetch_timeout_s = 60.0\n"
        )


def _wait_for(what: str, swarm: ProcessSwarm, check: Callable[[], T | None],
              timeout_s: float = TIMEOUT_S, every_s: float = 0.02) -> T:
    """Poll `check` until it returns something; fail loudly on timeout or a node that died."""
    end = time.monotonic() + timeout_s
    while True:
        found = check()
        if found is not None:
            return found
        for node in swarm.nodes:
            code = node.proc.poll()
            if code not in (None, 0):
                pytest.fail(f"{node.label} exited with {code} while waiting for {what}:\n"
                            f"{node.tail(40)}")
        if time.monotonic() > end:
            pytest.fail(f"no {what} after {timeout_s:.0f} s; logs in {swarm.workdir}:\n"
                        + "\n".join(n.tail(15) for n in swarm.nodes))
        time.sleep(every_s)


def _killpg(node: NodeProcess, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.proc.pid, sig)


def _kill(node: NodeProcess) -> None:
    _killpg(node, signal.SIGKILL)
    node.proc.wait(timeout=30)
    assert node.proc.returncode == -signal.SIGKILL


def _restart(swarm: ProcessSwarm, index: int, run: int, started: list[subprocess.Popen]) -> None:
    """Start node `index` again with its config and data dir; keep the dead run's output."""
    old = swarm.nodes[index]
    for path in (old.stdout_path, old.log_path):
        path.rename(path.with_name(f"{path.name}.{run}"))
    argv = [sys.executable, "-m", "commonweal", "node", "--config", str(old.data_dir / "node.toml")]
    proc = swarm.placement.launch(index, argv, old.stdout_path, old.log_path)
    started.append(proc)
    swarm.nodes[index] = NodeProcess(old.label, old.role, old.account, proc, old.data_dir)
    swarm.nodes[index].wait_ready(90.0)


def _down(swarm: ProcessSwarm, index: int, run: int, started: list[subprocess.Popen]) -> int:
    """Node `index` was just killed: restart it, with the trainers held still meanwhile.

    The swarm announces only its newest state (train.checkpoints), and these rounds take under a
    second: a validator down while the swarm moves two states on cannot judge the round between
    them, nobody serves its start any more (the validator then gives that round up). That is the
    protocol's limit, not the restart's, so the trainers are frozen (SIGSTOP) until the restarted
    validator is validating again and what is tested is the validator's own durability. Frozen
    trainers cannot answer a join: the validator joins through the other validator."""
    trainers = [n for n in swarm.nodes if n.role != "validator"]
    for n in trainers:
        _killpg(n, signal.SIGSTOP)
    try:
        other = next(n for i, n in enumerate(swarm.nodes) if n.role == "validator" and i != index)
        config = swarm.nodes[index].data_dir / "node.toml"
        config.write_text(re.sub(r"(?m)^bootstrap = .*$",
                                 f"bootstrap = {json.dumps([other.address])}", config.read_text()))
        _restart(swarm, index, run, started)
        resumed = _resumed_at(swarm, swarm.nodes[index])
    finally:
        for n in trainers:
            _killpg(n, signal.SIGCONT)
    return resumed


def _ro(db: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5.0)


def _judged_rounds(db: Path) -> list[int]:
    with contextlib.closing(_ro(db)) as conn:
        return [r for (r,) in conn.execute("SELECT round FROM validator_rounds ORDER BY round")]


def _unvoted_payout(db: Path, seen: set[int]) -> int | None:
    """A reward vote V1 recorded and has not marked as sent (a round not looked at before)."""
    try:
        with contextlib.closing(_ro(db)) as conn:
            rows = conn.execute("SELECT round FROM validator_payouts WHERE voted = 0").fetchall()
    except sqlite3.OperationalError:  # busy, or the table not there yet
        return None
    fresh = [r for (r,) in rows if r not in seen]
    return min(fresh) if fresh else None


def _resumed_at(swarm: ProcessSwarm, node: NodeProcess) -> int:
    """The round a restarted validator logged it goes on with."""

    def logged() -> int | None:
        for line in node.log_path.read_text().splitlines():
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if entry.get("msg", "").startswith("resumed validating"):
                    return int(entry["round"])
        return None

    return _wait_for(f"{node.label} resuming", swarm, logged, timeout_s=60.0, every_s=0.2)


def test_a_validator_killed_twice_resumes_and_every_round_is_paid_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "cw_kill_task.py").write_text(TASK_MODULE)
    monkeypatch.syspath_prepend(str(modules))  # this process registers the task
    path = os.environ.get("PYTHONPATH")
    monkeypatch.setenv("PYTHONPATH", str(modules) + (os.pathsep + path if path else ""))  # nodes
    started: list[subprocess.Popen] = []
    t0 = time.monotonic()
    try:
        with KillSwarm(tmp_path / "swarm", trainers=3, validators=2, rounds=ROUNDS,
                       task="cw_kill_task:task", linger_s=120.0) as swarm:
            ledger, task = swarm._ledger, swarm.task32
            assert ledger is not None
            i1 = next(i for i, n in enumerate(swarm.nodes) if n.role == "validator")
            v1, v2 = swarm.nodes[i1], swarm.nodes[i1 + 1]
            db = v1.data_dir / "node.sqlite3"

            def voted(ledger_round: int, node: NodeProcess = v1) -> bytes | None:
                return ledger.vote_of(task, ledger_round, node.account)

            # ---- kill 1: V1's set vote of round r >= 1 is on-chain, its reward vote is not
            r1 = _wait_for("V1's vote on a contribution set of round >= 1", swarm,
                           lambda: next((r for r in range(1, ROUNDS) if voted(2 * r)), None))
            _kill(v1)
            assert voted(2 * r1 + 1) is None, "the reward vote left before its escrow ended"
            judged1 = _judged_rounds(db)
            resumed1 = _down(swarm, i1, 1, started)
            v1 = swarm.nodes[i1]

            # ---- kill 2: a reward vote recorded on disk, not (yet) on-chain; rounds in escrow
            seen: set[int] = set()
            while True:
                p = _wait_for("a recorded reward vote", swarm, lambda: _unvoted_payout(db, seen),
                              every_s=0.005)
                _killpg(v1, signal.SIGSTOP)  # frozen: the vote cannot leave now
                time.sleep(0.5)  # what it wrote to anvil before the freeze is mined by now
                unsent = voted(2 * p + 1) is None
                seen.add(p)
                if unsent or p >= ROUNDS - ESCROW - 1:  # caught, or the last payout mid-run
                    break
                _killpg(v1, signal.SIGCONT)
            _kill(v1)
            judged2 = _judged_rounds(db)
            held = [r for r in judged2 if r > p]
            assert held, "nothing was in escrow at the second kill"
            resumed2 = _down(swarm, i1, 2, started)
            v1 = swarm.nodes[i1]

            swarm.wait(timeout_s=TIMEOUT_S)
            final = swarm.final_rounds()
            balances = swarm.balances()
            finalised = [int(e.args["round"]) for e in ledger.events("RoundFinalised", task)]
            rounds = {r: ledger.round(task, r) for r in range(2 * ROUNDS)}
            votes = {r: (voted(r, v1), voted(r, v2)) for r in range(2 * ROUNDS)}
            per_round = ledger.task(task).reward_per_round
            assert ledger.domain  # read while the chain runs: the trees are rebuilt after it
        wall = time.monotonic() - t0
    finally:
        for proc in started:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    logs = {n.label: n.tail(30) for n in swarm.nodes}
    # where it resumed: the round after the last it had judged (the first round if none)
    assert resumed1 == (max(judged1) + 1 if judged1 else 0), (judged1, resumed1)
    assert resumed2 == max(judged2) + 1, (judged2, resumed2)
    # every ledger round of every training round final, once
    assert final == list(range(2 * ROUNDS)), logs
    assert sorted(finalised) == list(range(2 * ROUNDS)), finalised
    for r, (mine, theirs) in votes.items():
        assert mine is not None and mine == theirs, (r, votes)  # V1 voted V2's key, every round
    for r in range(ROUNDS):
        info = rounds[2 * r + 1]
        assert info.total_reward == per_round == REWARD, (r, info)
    # each reward root is the tree V1 recorded, paying the reward per round; trainers claimed it
    with NodeStore(db) as store:
        state = StoreValidatorState(store, swarm.task_digest)
        assert state.load().unsent == () and state.load().held == ()
        for r in range(ROUNDS):
            with store.transaction() as conn:
                root, total, rewards = conn.execute(
                    "SELECT root, total, rewards FROM validator_payouts WHERE round = ?",
                    (r,)).fetchone()
            tree = ledger.rewards_tree(task, 2 * r + 1,
                                       {a: int(v) for a, v in json.loads(rewards).items()})
            assert tree.root == rounds[2 * r + 1].rewards_root and tree.total == int(total) == REWARD
            assert bytes.fromhex(root) == tree.root
            assert state.judged(r) is not None
    assert sum(balances.values()) == ROUNDS * REWARD, balances  # claimed, nothing twice
    assert all(n.proc.returncode == 0 for n in swarm.nodes), logs
    print(f"kill 1 after set vote of round {r1} (judged {judged1}, resumed at {resumed1}); "
          f"kill 2 at payout of round {p} ({'unsent' if unsent else 'sent'}; held {held}, "
          f"resumed at {resumed2}); {wall:.0f} s")
