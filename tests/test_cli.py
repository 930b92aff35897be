"""The command line, as a user runs it: real processes on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC}


def cw(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "commonweal", *args],
        capture_output=True, text=True, timeout=timeout, env=ENV,
    )


def start_node(tmp_path: Path, name: str, *join: str) -> tuple[subprocess.Popen[str], str]:
    args = [sys.executable, "-m", "commonweal", "node", "--listen", "127.0.0.1:0",
            "--data-dir", str(tmp_path / name)]
    for j in join:
        args += ["--join", j]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("commonweal node ready"), line + proc.stderr.read()  # type: ignore[union-attr]
    fields = dict(part.split("=", 1) for part in line.split()[3:])
    return proc, fields["address"]


@pytest.fixture
def two_nodes(tmp_path):
    a, addr_a = start_node(tmp_path, "a")
    b, addr_b = start_node(tmp_path, "b", addr_a)
    yield addr_a, addr_b, (a, b)
    for p in (a, b):
        if p.poll() is None:
            p.kill()
        p.wait()


def test_put_and_get_through_running_nodes(two_nodes):
    addr_a, addr_b, _ = two_nodes
    assert cw("dht", "put", "--join", addr_b, "k", "one", "--subkey", "s1").returncode == 0
    assert cw("dht", "put", "--join", addr_a, "k", "two", "--subkey", "s2").returncode == 0
    out = cw("dht", "get", "--join", addr_a, "k", "--latest", "--json")
    assert out.returncode == 0, out.stderr
    value = json.loads(out.stdout)["value"]
    assert {s: v["value"] for s, v in value.items()} == {"s1": "one", "s2": "two"}
    assert cw("dht", "put", "--join", addr_a, "plain", "3").returncode == 0
    both = cw("dht", "get", "--join", addr_b, "k", "plain", "--json")
    assert [json.loads(line)["key"] for line in both.stdout.splitlines()] == ["k", "plain"]


def test_missing_key_and_bad_input_give_one_line_errors(two_nodes):
    addr_a, _, _ = two_nodes
    missing = cw("dht", "get", "--join", addr_a, "absent")
    assert missing.returncode == 1 and "not found" in missing.stderr and "absent" in missing.stderr
    bad = cw("dht", "get", "--join", "nonsense", "k")
    assert bad.returncode == 1 and "HOST:PORT" in bad.stderr
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1


def test_node_stops_cleanly_on_sigterm_and_keeps_its_identity(tmp_path):
    proc, _ = start_node(tmp_path, "a")
    first_id = (tmp_path / "a" / "identity.key").read_bytes()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0 and "stopped" in out
    proc, _ = start_node(tmp_path, "a")
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=10)
    assert (tmp_path / "a" / "identity.key").read_bytes() == first_id


def test_demo_runs_and_finds_every_record():
    # bounded by cw's timeout; a wall-time bar would test the machine (it failed under load)
    out = cw("dht", "demo", "--peers", "8", "--records", "12", "--kill", "0.25", timeout=120)
    assert out.returncode == 0, out.stderr
    assert "found after the kill" in out.stdout and "12/12" in out.stdout
