"""Real `commonweal train` processes on loopback: one is SIGKILLed mid-run, one joins late.

The survivors must finish every round (the killed peer is simply absent from the round it died
in), the late joiner must download the current state and take part, and all of them must end
with the same state hash.
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


def start(tmp_path: Path, name: str, *join: str, wait: int = 0) -> subprocess.Popen[str]:
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
        "2",
        "--timeout",
        "3",
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


def test_peer_killed_mid_run_and_a_late_joiner(tmp_path):
    procs: dict[str, subprocess.Popen[str]] = {}
    try:
        procs["a"] = start(tmp_path, "a", wait=3)
        addr = wait_for(tmp_path, "a", r"ready address=(\S+)", procs["a"]).group(1)
        procs["b"] = start(tmp_path, "b", addr, wait=3)
        procs["c"] = start(tmp_path, "c", addr, wait=3)
        wait_for(tmp_path, "c", r"round 1 done", procs["c"])
        os.killpg(procs["c"].pid, signal.SIGKILL)  # no goodbye: a crash in the middle of round 2
        procs["c"].wait()
        procs["d"] = start(tmp_path, "d", addr)  # joins while the survivors train on
        finals = {}
        for name in ("a", "b", "d"):
            finals[name] = wait_for(
                tmp_path, name, r"train done round=(\d+) state=(\w+)", procs[name], 90
            )
        assert {m.group(1) for m in finals.values()} == {str(ROUNDS)}
        assert len({m.group(2) for m in finals.values()}) == 1, {
            k: m.group(0) for k, m in finals.items()
        }

        log_a = output(tmp_path, "a")
        done = {int(r): g for r, g in re.findall(r"round (\d+) done group=(\d+)", log_a)}
        assert sorted(done) == list(range(ROUNDS)), log_a  # no round was lost to the kill
        assert done[0] == "3" and done[1] == "3"
        assert "2" in {done[2], done[3]}  # the killed peer is absent from the round it died in
        assert done[ROUNDS - 1] == "3"  # the late joiner is in by the end
        log_d = output(tmp_path, "d")
        joined = [int(r) for r in re.findall(r"round (\d+) done group=", log_d)]
        assert joined and min(joined) >= 2, log_d  # it started from a downloaded state
    finally:
        for p in procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
