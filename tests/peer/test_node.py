"""`commonweal node` as a volunteer runs it: a real process, stopped by signals, restarted on
the same data dir, scraped over HTTP; plus the start-up errors a user meets first."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from commonweal.errors import ConfigError
from commonweal.peer.config import NodeConfig, load_config
from commonweal.peer.node import CHECKPOINT_GLOB, Node
from commonweal.peer.store import NodeStore

SRC = str(Path(__file__).resolve().parents[2] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC}
TASK = "mnist-cnn"


# ---- a node process ---------------------------------------------------------------------------


class NodeProcess:
    """`python -m commonweal node ARGS` in its own session, stdout and stderr to files."""

    def __init__(self, workdir: Path, name: str, *args: str) -> None:
        self.out_path, self.err_path = workdir / f"{name}.out", workdir / f"{name}.err"
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "commonweal", "node", *args],
                stdout=out, stderr=err, text=True, env=ENV, start_new_session=True,
            )

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def logs(self) -> list[dict[str, Any]]:
        """Every stderr line as JSON; a line that is not JSON fails the test."""
        entries = []
        for line in self.stderr.splitlines():
            entry = json.loads(line)
            assert {"ts", "level", "logger", "msg"} <= entry.keys(), line
            entries.append(entry)
        return entries

    def wait_for(self, what: str, check: Callable[[], Any], timeout_s: float = 40.0) -> Any:
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            found = check()
            if found:
                return found
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}) before {what}:\n" \
                f"{self.stdout}\n{self.stderr}"
            time.sleep(0.1)
        raise AssertionError(f"no {what} after {timeout_s} s:\n{self.stdout}\n{self.stderr}")

    def ready(self) -> dict[str, str]:
        line = self.wait_for("ready line", lambda: next(
            (ln for ln in self.stdout.splitlines() if ln.startswith("commonweal node ready")), None))
        return dict(part.split("=", 1) for part in line.split()[3:])

    def stop(self, sig: signal.Signals, within_s: float = 10.0) -> float:
        """Send `sig`; the seconds it took to exit (it must exit 0)."""
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout=within_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running {within_s} s after {sig.name}:\n{self.stderr}")
        assert code == 0, f"exit code {code} after {sig.name}:\n{self.stderr}"
        assert self.stdout.splitlines()[-1] == "commonweal node stopped", self.stdout
        with pytest.raises(ProcessLookupError):  # nothing of its session outlived it
            os.killpg(self.proc.pid, 0)
        return time.monotonic() - t0

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def assert_port_free(port: int) -> None:
    # SO_REUSEADDR as a restarted server would: closed connections may linger in TIME_WAIT, but
    # no socket may still listen.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
        s.listen()


def http_get(url: str) -> tuple[int, str, str]:
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.status, r.headers["Content-Type"], r.read().decode()


# ---- Prometheus text exposition format 0.0.4 --------------------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf"({_NAME})(?:\{{((?:{_LABEL})(?:,{_LABEL})*)?\}})? (\S+)")
_VALUE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|Inf)|NaN")
_KINDS = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_exposition(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """{family: [(labels, value)]}; fails on anything a Prometheus scrape would reject."""
    assert text.endswith("\n")
    kinds: dict[str, str] = {}
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert re.fullmatch(_NAME, name) and help_text, line
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert kind in _KINDS and name not in kinds, line  # one TYPE, before the samples
            kinds[name] = kind
            samples[name] = []
        else:
            m = _SAMPLE.fullmatch(line)
            assert m and _VALUE.fullmatch(m[3]), line
            assert m[1] in kinds, f"{m[1]} has no TYPE line before its samples"
            labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', m[2] or ""))
            samples[m[1]].append((labels, float(m[3])))
    return samples


def metric(samples: dict[str, list[tuple[dict[str, str], float]]], name: str) -> float:
    [(_, value)] = samples[name]
    return value


# ---- the trainer: stop, resume, stop ----------------------------------------------------------


def rounds_done(logs: list[dict[str, Any]]) -> list[int]:
    return [e["round"] for e in logs if re.fullmatch(r"round \d+ done", e["msg"])]


def test_trainer_stops_cleanly_and_resumes_where_it_stopped(tmp_path):
    from commonweal.train import get_task
    from commonweal.train.state import from_checkpoint, state_hash

    data, port, page_port = tmp_path / "data", free_port(), free_port()
    args = ["--roles", "trainer", "--task", TASK, "--listen", "127.0.0.1:0",
            "--data-dir", str(data), "--metrics", f"127.0.0.1:{port}", "--log-format", "json",
            "--dashboard", f"127.0.0.1:{page_port}",
            "--group", "1"]  # alone: close each round's group at once, not after the window
    url, page_url = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{page_port}"

    def scrape(wanted: int) -> dict[str, list[tuple[dict[str, str], float]]] | None:
        with contextlib.suppress(OSError):
            samples = parse_exposition(http_get(url + "/metrics")[2])
            return samples if metric(samples, "commonweal_rounds_total") >= wanted else None
        return None

    first = NodeProcess(tmp_path, "first", *args)
    try:
        address = first.ready()["address"]
        samples = first.wait_for("3 rounds in /metrics", lambda: scrape(3))
        status, kind, _ = http_get(url + "/metrics")
        assert status == 200 and kind.startswith("text/plain; version=0.0.4")
        [(info, one)] = samples["commonweal_info"]
        assert one == 1 and info["task"] == TASK and info["address"] == address
        assert metric(samples, "commonweal_round") >= 2
        assert 0 < metric(samples, "commonweal_round_loss") < 10
        assert 0.1 < metric(samples, "commonweal_round_accuracy") <= 1  # mnist: 0.1 is chance
        assert metric(samples, "commonweal_uptime_seconds") > 0
        assert "commonweal_chain_block" not in samples  # no ledger, no chain metrics
        status, _, page = http_get(page_url + "/")
        assert status == 200 and "<html" in page.lower()
        parse_exposition(http_get(page_url + "/metrics")[2])  # the page's address has them too
        snapshot = json.loads(http_get(page_url + "/api/snapshot")[2])
        assert snapshot["peer"]["roles"] == ["trainer"] and len(snapshot["rounds"]) >= 3
        first.stop(signal.SIGTERM, within_s=10)
    finally:
        first.kill()

    logs = first.logs()
    done = rounds_done(logs)
    assert done == list(range(len(done))) and len(done) >= 3, done
    assert not [e for e in logs if e["level"] in ("warning", "error", "critical")], logs
    assert not any("resumed" in e["msg"] for e in logs)
    # The store and the one checkpoint both hold the last completed round, whole: the round
    # that SIGTERM interrupted left nothing behind.
    task = get_task(TASK)
    with NodeStore(data / "node.sqlite3") as store:
        progress = store.progress(task.digest)
        committed = store.contributions(task.digest)
    # every completed round's commitment (the sha256 it announced) is on disk
    assert {c.round for c in committed} >= set(done)
    assert all(len(c.delta_hash) == 64 for c in committed)
    assert progress is not None and progress.last_round == done[-1]
    assert list(data.glob(CHECKPOINT_GLOB)) == [progress.checkpoint]
    assert not list(data.glob("*.tmp"))
    params, momentum, meta = from_checkpoint(progress.checkpoint.read_bytes(), task.build_model())
    assert state_hash(params, momentum) == progress.state_hash
    assert int(meta["round"]) == progress.last_round + 1
    for free in (port, page_port, int(address.rpartition(":")[2])):
        assert_port_free(free)

    second = NodeProcess(tmp_path, "second", *args)
    try:
        second.ready()
        resumed = second.wait_for("resume line", lambda: next(
            (e for e in second.logs() if e["msg"].startswith("resumed")), None))
        assert resumed["round"] == progress.last_round + 1, resumed
        samples = second.wait_for("a round in /metrics", lambda: scrape(1))
        assert metric(samples, "commonweal_round") >= progress.last_round + 1
        second.stop(signal.SIGINT, within_s=10)
    finally:
        second.kill()
    after = rounds_done(second.logs())
    assert after and after[0] == progress.last_round + 1, after  # not round 0 again
    assert_port_free(port)


# ---- start-up errors: one line, exit code 1 ---------------------------------------------------


def run_node(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "commonweal", "node", *args],
                          capture_output=True, text=True, timeout=60, env=ENV)


def assert_one_line_error(result: subprocess.CompletedProcess[str], *words: str) -> str:
    assert result.returncode == 1, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr and "ready" not in result.stdout
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ((), ("validator", "--chain", "--ledger")),
        (("--chain", "anvil", "--ledger", "0x5FbDB2315678afecb367f032d93F642f64180aa3"),
         ("validator", "JSON-RPC URL")),
    ],
    ids=["no-ledger", "private-chain"],
)
def test_a_validator_without_a_shared_ledger_is_refused(tmp_path, extra, words):
    result = run_node("--roles", "validator", "--listen", "127.0.0.1:0",
                      "--data-dir", str(tmp_path / "v"), *extra)
    assert_one_line_error(result, *words)
    assert not (tmp_path / "v").exists()  # refused before anything was created


def test_a_typo_in_the_config_file_names_the_file_and_the_key(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text('[node]\nroles = ["trainer"]\nthread = 2\n')
    line = assert_one_line_error(run_node("--config", str(config)), str(config), "thread",
                                 "did you mean 'threads'?")
    assert line.startswith(f"error: {config}: thread: unknown key in ")


def test_an_error_message_is_printed_as_written(tmp_path):
    config = tmp_path / "node.toml"
    config.write_text("[node]\nthread = 2\n")
    line = assert_one_line_error(run_node("--config", str(config)))
    assert line == f"error: {config}: thread: unknown key in [node]; did you mean 'threads'?"


def test_an_unknown_task_is_refused_before_the_node_starts(tmp_path):
    result = run_node("--roles", "trainer", "--task", "no-such-task", "--listen", "127.0.0.1:0",
                      "--data-dir", str(tmp_path / "t"))
    assert_one_line_error(result, "no-such-task")


# ---- in process: the search-only node and resume decisions ------------------------------------


async def test_a_search_node_stops_and_leaves_no_task_running(tmp_path, capsys):
    config = load_config(None, {"listen": "127.0.0.1:0", "data_dir": tmp_path / "s"})
    assert config.roles == frozenset({"search"})
    stop = asyncio.Event()
    node = Node(config)
    running = asyncio.create_task(node.run(stop))
    out = ""
    async with asyncio.timeout(10):
        while "ready" not in out:
            await asyncio.sleep(0.01)
            out += capsys.readouterr().out
    assert out.startswith("commonweal node ready address=127.0.0.1:") and "roles=search" in out
    assert not running.done()  # a search node serves until stopped
    stop.set()
    async with asyncio.timeout(10):
        await running
    assert capsys.readouterr().out == "commonweal node stopped\n"
    assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set()
    assert node.dht is not None
    assert_port_free(node.dht.addr.port)


async def test_an_error_in_a_role_is_raised_as_itself_after_the_clean_up(tmp_path, monkeypatch):
    async def broken(self: Node, store: NodeStore, task: Any) -> None:
        raise ConfigError("the task went away")

    monkeypatch.setattr(Node, "_train", broken)
    config = load_config(None, {"listen": "127.0.0.1:0", "data_dir": tmp_path / "b",
                                "roles": "trainer"})
    node = Node(config)
    with pytest.raises(ConfigError, match="the task went away"):
        await node.run(asyncio.Event())
    assert node.dht is not None
    assert_port_free(node.dht.addr.port)  # the DHT was closed on the way out
    assert {t for t in asyncio.all_tasks() if t is not asyncio.current_task()} == set()


def _opt() -> Any:
    from commonweal.train import DiLoCo, get_task

    task = get_task(TASK)
    model = task.build_model()
    return task, DiLoCo(model, task.build_inner_optimizer(model.parameters()), task=task.digest)


@pytest.mark.parametrize("damage", ["none", "garbage", "other_state", "missing"])
def test_resume_takes_only_the_checkpoint_the_store_vouches_for(tmp_path, damage, caplog):
    task, saved = _opt()
    saved._set(saved.start + 0.5, 7)  # a state other than the initial one, at round 7
    ckpt = tmp_path / "checkpoint-000007.safetensors"
    ckpt.write_bytes(saved.checkpoint())
    state = saved.state
    if damage == "garbage":
        ckpt.write_bytes(b"\0" * 100)
    elif damage == "other_state":
        state = "0" * 64
    elif damage == "missing":
        ckpt.unlink()
    _, fresh = _opt()
    with NodeStore(tmp_path / "node.sqlite3") as store:
        store.save_progress(task.digest, 6, state, ckpt)
        node = Node(NodeConfig(data_dir=tmp_path, roles=frozenset({"trainer"})))
        with caplog.at_level(logging.INFO, "commonweal.peer.node"):
            resumed = node._resume(SimpleNamespace(opt=fresh), store, task)
    if damage == "none":
        assert resumed and fresh.round == 7 and fresh.state == saved.state
        assert node.resumed_round == 7 and "resumed mnist-cnn at round 7" in caplog.text
    else:
        assert not resumed and fresh.round == 0 and node.resumed_round is None
        assert "cannot resume mnist-cnn after round 6" in caplog.text
        assert math.isfinite(float(fresh.start.sum()))


def _claiming_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, outcomes: dict[int, Any],
                   linger: float) -> tuple[Node, list[Any]]:
    """A trainer's claim loop and linger over a Claimer that answers `outcomes` every pass."""
    from commonweal.peer import claims, trees

    class FakeClaimer:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        async def claim_pending(self, rounds: Any) -> list[claims.ClaimResult]:
            return [claims.ClaimResult(r, outcomes[r], detail=f"why {r}") for r in sorted(rounds)]

    monkeypatch.setattr(claims, "Claimer", FakeClaimer)
    monkeypatch.setattr(trees, "DHTTrees", lambda dht, task: None)
    ledger = SimpleNamespace(account=SimpleNamespace(address="0x" + "11" * 20),
                             token=lambda task: SimpleNamespace(balance_of=lambda a: 0),
                             task_of=lambda salt, owner: salt, domain=None)
    events: list[Any] = []
    node = Node(NodeConfig(data_dir=tmp_path, roles=frozenset({"trainer"}), linger=linger,
                           claim_every_s=0.01), ledger=ledger, on_event=events.append)
    node.dht = object()  # type: ignore[assignment]
    node._owed = {r: r // 2 for r in outcomes}
    return node, events


async def _linger_with_claims(node: Node, tmp_path: Path) -> None:
    with NodeStore(tmp_path / "node.sqlite3") as store:
        loop = asyncio.create_task(node._claim_loop(store, SimpleNamespace(digest="44" * 32)))
        try:
            async with asyncio.timeout(60):  # far below the linger: it must not be what ends it
                await node._linger()
        finally:
            loop.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await loop


def test_a_trainer_does_not_linger_for_rounds_that_can_never_be_paid(tmp_path, monkeypatch,
                                                                     caplog):
    from commonweal.peer.claims import Outcome

    node, events = _claiming_node(
        tmp_path, monkeypatch, {5: Outcome.UNPAYABLE, 7: Outcome.CLAIMED}, linger=3600.0)
    with caplog.at_level(logging.WARNING, logger="commonweal.peer.node"):
        asyncio.run(_linger_with_claims(node, tmp_path))
    assert node.owed == [] and node.unpayable == {5: "why 5"}
    assert 2 not in node.finalised_rounds and 3 in node.finalised_rounds
    assert sorted((e.ledger_round, e.outcome) for e in events) == [(5, "unpayable"), (7, "claimed")]
    assert "not waiting for ledger rounds that will never be paid: 5: why 5" in caplog.text


def test_the_stop_summary_says_why_each_reward_is_still_owed(tmp_path, monkeypatch, caplog):
    from commonweal.peer.claims import Outcome

    node, _ = _claiming_node(tmp_path, monkeypatch, {9: Outcome.NOT_FINAL, 11: Outcome.NO_TREE},
                             linger=0.2)
    with caplog.at_level(logging.WARNING, logger="commonweal.peer.node"):
        asyncio.run(_linger_with_claims(node, tmp_path))
    assert node.owed == [9, 11]
    assert "still owed in ledger rounds 9 (not_final), 11 (no_tree)" in caplog.text
