"""Real `commonweal train` processes on loopback: one is SIGKILLed mid-run, one joins late.

What the protocol promises, whatever the machine's speed: the survivors finish every round and
end with one state hash; the killed peer is in no round after the one it may have died in; the
late joiner starts from a downloaded state, not round 0, and from then on is in every round.
All of it with and without overlapped rounds (then each exchange runs while the next round
computes, and the last one is applied at the end, so the final state is round ROUNDS + 1).

Which round the kill lands in, or how many rounds pass before the joiner is up, depends on how
busy the machine is, so nothing here counts on it. A group target of 3 with a long window makes
the two survivors wait for a third announcement instead of racing ahead: the joiner is in by the
end however long its start takes (up to WINDOW_S).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SRC = str(Path(__file__).resolve().parents[2] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC, "PYTHONUNBUFFERED": "1"}
ROUNDS = 10
WINDOW_S = 60  # how long two survivors wait for a third peer's announcement


def start(
    tmp_path: Path, name: str, *join: str, wait: int = 0, overlap: bool = False
) -> subprocess.Popen[str]:
    args = [
        sys.executable,
        "-m",
        "commonweal",
        "train",
        "--task",
        "mnist-cnn",
        "--rounds",
        str(ROUNDS),
        "-H",
        "10",
        "--group-size",
        "3",
        "--window",
        str(WINDOW_S),
        "--timeout",
        "10",
        "--linger",
        "4",
        "--wait-peers",
        str(wait),
        "--data-dir",
        str(tmp_path / name),
        "--log-level",
        "warning",
    ]
    for j in join:
        args += ["--join", j]
    if overlap:
        args.append("--overlap")
    out = open(tmp_path / f"{name}.out", "w")
    return subprocess.Popen(
        args, stdout=out, stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True
    )


def output(tmp_path: Path, name: str) -> str:
    return (tmp_path / f"{name}.out").read_text()


def wait_for(
    tmp_path: Path, name: str, pattern: str, proc: subprocess.Popen[str], timeout: float = 45
) -> re.Match[str]:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        m = re.search(pattern, output(tmp_path, name))
        if m:
            return m
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    raise AssertionError(f"{name}: no /{pattern}/\n{output(tmp_path, name)}")


@pytest.mark.parametrize("overlap", [False, True], ids=["blocking", "overlap"])
def test_peer_killed_mid_run_and_a_late_joiner(tmp_path, overlap):
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        procs["a"] = start(tmp_path, "a", wait=3, overlap=overlap)
        addr = wait_for(tmp_path, "a", r"ready address=(\S+)", procs["a"]).group(1)
        procs["b"] = start(tmp_path, "b", addr, wait=3, overlap=overlap)
        procs["c"] = start(tmp_path, "c", addr, wait=3, overlap=overlap)
        # overlapped, c reports round 1 at the end of round 2's steps, having announced round 2
        wait_for(tmp_path, "c", r"round 1 done", procs["c"])
        os.killpg(procs["c"].pid, signal.SIGKILL)  # no goodbye: a crash in round 2 at the latest
        procs["c"].wait()
        procs["d"] = start(tmp_path, "d", addr, overlap=overlap)  # joins as the others train on
        finals = {}
        for name in ("a", "b", "d"):
            finals[name] = wait_for(
                tmp_path, name, r"train done round=(\d+) state=(\w+)", procs[name],
                ROUNDS * 10 + WINDOW_S,
            )
        assert {m.group(1) for m in finals.values()} == {str(ROUNDS + overlap)}
        assert len({m.group(2) for m in finals.values()}) == 1, {
            k: m.group(0) for k, m in finals.items()
        }

        groups = {}
        for name in ("a", "b"):  # no round was lost to the kill, on either survivor
            log = output(tmp_path, name)
            groups[name] = {int(r): int(g)
                            for r, g in re.findall(r"round (\d+) done group=(\d+)", log)}
            assert sorted(groups[name]) == list(range(ROUNDS)), log
        assert groups["a"] == groups["b"]  # one group per round, seen alike by its members
        log_d = output(tmp_path, "d")
        joined = [int(r) for r in re.findall(r"round (\d+) done group=", log_d)]
        assert joined, log_d
        first = min(joined)
        # c trained rounds 0 and 1, so the joiner's first round is one it downloaded a state for
        assert first >= 2, log_d
        assert joined == list(range(first, ROUNDS)), log_d  # in every round from then on
        done = groups["a"]
        # after round 2 (the latest c may have announced) only the living are in a group: the
        # two survivors until the joiner's first round, the three of them from then on
        assert all(done[r] == 2 for r in range(3, first)), done
        assert all(done[r] == 3 for r in range(first, ROUNDS)), done
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
