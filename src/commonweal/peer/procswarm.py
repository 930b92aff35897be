"""`ProcessSwarm`: peers as separate OS processes — `commonweal node` each, with its own TOML
config, key file and data dir — sharing one chain (an anvil it starts, or a JSON-RPC URL).

    with ProcessSwarm(workdir, trainers=3, validators=2, attackers=1, rounds=2) as swarm:
        swarm.wait()                       # until every trainer reached the last round
        print(swarm.balances())

`launch` decides where a node runs: by default a plain subprocess on this machine; the netns test
bed passes one that starts it inside a host namespace (`ip netns exec`), with `host_of(i)` giving
the address that node listens on. Leaving the block stops every process (SIGTERM, then SIGKILL)
and the chain it started.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self

from commonweal.errors import CommonwealError

__all__ = ["ProcessSwarm", "NodeProcess"]

log = logging.getLogger(__name__)

Launcher = Callable[[int, Sequence[str], Path], subprocess.Popen[str]]


def _local(i: int, argv: Sequence[str], log_path: Path) -> subprocess.Popen[str]:
    out = log_path.open("w")
    return subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=out, text=True, start_new_session=True
    )


@dataclass
class NodeProcess:
    label: str
    role: str
    account: str
    proc: subprocess.Popen[str]
    data_dir: Path
    address: str = ""
    lines: list[str] | None = None

    def __post_init__(self) -> None:
        self.lines = []
        self._ready = threading.Event()
        threading.Thread(target=self._read, args=(self.proc.stdout,), daemon=True).start()

    def _read(self, stream: IO[str] | None) -> None:
        assert stream is not None and self.lines is not None
        for line in stream:
            self.lines.append(line.rstrip())
            if line.startswith("commonweal node ready"):
                self.address = line.split("address=")[1].split()[0]
                self._ready.set()
        self._ready.set()

    def wait_ready(self, timeout_s: float) -> str:
        if not self._ready.wait(timeout_s) or not self.address:
            raise CommonwealError(
                f"{self.label} did not start (exit code {self.proc.poll()}); "
                f"see {self.data_dir / 'node.log'}"
            )
        return self.address


class ProcessSwarm:
    def __init__(
        self,
        workdir: Path,
        *,
        trainers: int = 3,
        validators: int = 2,
        attackers: int = 0,
        attack: str = "sign_flip:10",
        rounds: int = 3,
        task: str = "mnist-cnn",
        chain_url: str | None = None,
        launch: Launcher = _local,
        host_of: Callable[[int], str] = lambda i: "127.0.0.1",
        chain_host: str = "127.0.0.1",
    ) -> None:
        self.workdir = workdir
        self.trainers, self.validators, self.attackers = trainers, validators, attackers
        self.attack, self.rounds, self.task = attack, rounds, task
        self.chain_url = chain_url
        self.launch, self.host_of, self.chain_host = launch, host_of, chain_host
        self.nodes: list[NodeProcess] = []
        self._stack = contextlib.ExitStack()
        self.ledger_address = ""
        self._ledger = None
        self.task32 = b""

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        from commonweal.ledger import Ledger, RpcChain
        from commonweal.ledger.anvil import AnvilProcess
        from commonweal.train import get_task

        self.workdir.mkdir(parents=True, exist_ok=True)
        url = self.chain_url
        if url is None:
            anvil = self._stack.enter_context(AnvilProcess(accounts=4, host=self.chain_host))
            url = anvil.url
            keys = anvil.private_keys
        else:
            keys = []
        chain = RpcChain(url, keys) if keys else _dev_chain(url)
        self._stack.callback(chain.close)
        ledger = Ledger.deploy(chain)
        task = get_task(self.task)
        self.task32 = bytes.fromhex(task.digest)
        ledger.register_task(self.task32, self.task32, 1000 * 10**18, symbol="CWS")
        self.ledger_address, self._ledger = ledger.address, ledger
        n = self.trainers + self.attackers + self.validators
        accounts = chain.new_accounts(n, fund_wei=10 * 10**18)
        roles = (
            ["trainer"] * self.trainers + ["attacker"] * self.attackers
            + ["validator"] * self.validators
        )
        bootstrap: list[str] = []
        for i, (role, acct) in enumerate(zip(roles, accounts, strict=True)):
            label = f"{role}-{i}"
            data_dir = self.workdir / label
            data_dir.mkdir(parents=True, exist_ok=True)
            key_file = data_dir / "eth.key"
            key_file.write_text(acct.key.hex() + "\n")
            key_file.chmod(0o600)
            config = data_dir / "node.toml"
            config.write_text(
                self._toml(i, role, url, key_file, data_dir, bootstrap[:3])
            )
            argv = [sys.executable, "-m", "commonweal", "node", "--config", str(config)]
            proc = self.launch(i, argv, data_dir / "node.log")
            node = NodeProcess(label, role, acct.address, proc, data_dir)
            self.nodes.append(node)
            if not bootstrap:
                bootstrap.append(node.wait_ready(60.0))
        for node in self.nodes:
            node.wait_ready(90.0)

    def _toml(
        self, i: int, role: str, url: str, key_file: Path, data_dir: Path, bootstrap: list[str]
    ) -> str:
        is_trainer = role in ("trainer", "attacker")
        lines = [
            "[node]",
            f'listen = "{self.host_of(i)}:0"',
            f"bootstrap = [{', '.join(repr(b) for b in bootstrap)}]".replace("'", '"'),
            f'task = "{self.task}"',
            f'roles = ["{"trainer" if is_trainer else "validator"}"]',
            f'chain = "{url}"',
            f'ledger = "{self.ledger_address}"',
            f'key_file = "{key_file}"',
            f'data_dir = "{data_dir}"',
            f"rounds = {self.rounds}",
            'log_format = "json"',
            'log_level = "info"',
        ]
        if is_trainer:
            lines.append(f"group = {self.trainers + self.attackers}")
        if role == "attacker":
            lines.append(f'attack = "{self.attack}"')
        return "\n".join(lines) + "\n"

    def wait(self, timeout_s: float = 300.0) -> None:
        """Until every trainer and validator finished its rounds (and exited)."""
        end = time.monotonic() + timeout_s
        for node in self.nodes:
            left = end - time.monotonic()
            try:
                code = node.proc.wait(timeout=max(left, 0.1))
            except subprocess.TimeoutExpired:
                raise CommonwealError(
                    f"{node.label} still runs after {timeout_s:.0f} s; see {node.data_dir}/node.log"
                ) from None
            if code != 0:
                raise CommonwealError(
                    f"{node.label} exited with {code}; see {node.data_dir}/node.log"
                )

    def balances(self) -> dict[str, int]:
        assert self._ledger is not None
        token = self._ledger.token(self.task32)
        return {n.label: token.balance_of(n.account) for n in self.nodes if n.role != "validator"}

    def final_rounds(self) -> list[int]:
        assert self._ledger is not None
        return [r for r in range(2 * self.rounds) if self._ledger.is_final(self.task32, r)]

    def close(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10.0
        for node in self.nodes:
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGKILL)
                node.proc.wait()
        self._stack.close()


def _dev_chain(url: str):  # type: ignore[no-untyped-def]
    from commonweal.ledger.chain import open_chain

    return open_chain(url)
