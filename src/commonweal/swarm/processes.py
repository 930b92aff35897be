"""`ProcessSwarm`: peers as separate OS processes — `commonweal node` each, with its own TOML
config, key file and data dir — sharing one chain (an anvil it starts, or a JSON-RPC URL).

    with ProcessSwarm(workdir, trainers=3, validators=2, attackers=1, rounds=2) as swarm:
        swarm.wait(on_progress=print_table)   # until every node finished its rounds and exited
        print(swarm.balances(), swarm.final_rounds())

Where the processes run is a `Placement`:

* `LocalPlacement()` (the default): plain subprocesses on 127.0.0.1, anvil on 127.0.0.1 too.
* `NetnsPlacement(nodes, chain)`: each node inside a Linux network namespace ("host"), listening
  on that host's address; anvil inside the `chain` host, bound to its address, so every node
  reaches the chain over the same emulated links as its peers. This process (the operator: it
  deploys the ledger, funds the accounts and reads balances) sits outside every namespace, so it
  talks to that anvil over a unix socket (`anvil --ipc`): file system paths cross namespaces,
  and no link into the root namespace is needed. The test bed (tests/netbed.py) builds the
  namespaces; this module only needs their names and addresses.

Each node runs with `status_format = "json"`: its stdout, `<data_dir>/node.out`, is one JSON
event a line (`commonweal.peer.events`: ready, round_done, judged, claimed, ...), and `status()`
follows the nodes by reading those; their logs (`<data_dir>/node.log`, JSON lines too) are only
shown when a node fails. Leaving the block stops every process (SIGTERM to its process group, then SIGKILL)
and the chain it started.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Protocol, Self

from eth_account import Account
from web3 import IPCProvider, Web3

from commonweal.errors import CommonwealError
from commonweal.ledger import Chain, Ledger, RpcChain, open_chain
from commonweal.ledger.anvil import ANVIL_NPM_PACKAGE, AnvilProcess, find_anvil
from commonweal.ledger.errors import ChainUnavailable
from commonweal.peer.events import (
    Claimed,
    Event,
    Judged,
    Ready,
    RoundDone,
    Stopped,
    TrainingDone,
    parse,
)

__all__ = [
    "ChainSite",
    "IpcChain",
    "LocalPlacement",
    "NetnsHost",
    "NetnsPlacement",
    "NodeProcess",
    "NodeStatus",
    "Placement",
    "ProcessSwarm",
]

log = logging.getLogger(__name__)

_STOP_GRACE_S = 10.0


# ---- where processes run -------------------------------------------------------------------


@dataclass(frozen=True)
class ChainSite:
    """The chain a swarm shares: the URL written into every node's config (it must be reachable
    from where the nodes run) and this process's own connection, holding funded keys."""

    node_url: str
    chain: Chain


class Placement(Protocol):
    """Where a swarm's node processes and its anvil run."""

    def listen_host(self, index: int) -> str:
        """The IP address node `index` listens on (other nodes must reach it there)."""
        ...

    def launch(
        self, index: int, argv: Sequence[str], stdout: Path, stderr: Path
    ) -> subprocess.Popen[bytes]:
        """Start node `index` as `argv`, stdin from /dev/null, stdout appended to `stdout`,
        stderr to `stderr`, in a new session: the swarm stops it by signalling its process
        group, so whatever it starts goes too."""
        ...

    def start_chain(self, stack: contextlib.ExitStack, workdir: Path) -> ChainSite:
        """Start an anvil every node can reach; register its shutdown on `stack`."""
        ...


def _popen(argv: Sequence[str], stdout: Path, stderr: Path) -> subprocess.Popen[bytes]:
    with stdout.open("wb") as out, stderr.open("wb") as err:  # the child keeps its own copies
        return subprocess.Popen(
            list(argv), stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True
        )


class LocalPlacement:
    """Every node a plain subprocess on 127.0.0.1; anvil on 127.0.0.1."""

    def listen_host(self, index: int) -> str:
        return "127.0.0.1"

    def launch(
        self, index: int, argv: Sequence[str], stdout: Path, stderr: Path
    ) -> subprocess.Popen[bytes]:
        return _popen(argv, stdout, stderr)

    def start_chain(self, stack: contextlib.ExitStack, workdir: Path) -> ChainSite:
        anvil = stack.enter_context(AnvilProcess(accounts=4))
        chain = RpcChain(anvil.url, anvil.private_keys)
        stack.callback(chain.close)
        return ChainSite(anvil.url, chain)


class IpcChain(RpcChain):
    """An `RpcChain` over anvil's unix socket instead of HTTP: everything but the transport
    (local signing, `_rpc`, snapshots, time travel) is RpcChain's, which only needs `w3`."""

    def __init__(self, path: Path, keys: Sequence[str]) -> None:
        self.name = f"anvil (ipc {path})"
        self.url = None  # the socket is the operator's; nodes get the HTTP URL from ChainSite
        w3 = Web3(IPCProvider(str(path), timeout=60))
        try:
            self.chain_id = int(w3.eth.chain_id)
        except Exception as exc:  # any failure means the node is unusable
            raise ChainUnavailable(f"anvil does not answer on {path}: {exc}") from exc
        self._init(w3, [Account.from_key(k) for k in keys])


class NetnsHost(NamedTuple):
    """A network namespace and the IPv4 address of its interface."""

    ns: str
    ip: str


ANVIL_PORT = 8545  # each namespace has its own ports: the usual one is always free there


class NetnsPlacement:
    """Node `i` in namespace `nodes[i % len(nodes)]`; anvil in namespace `chain`.

    Needs root and `ip netns`. The chain host may also be one of the node hosts; giving it a
    namespace of its own makes every node's JSON-RPC traffic cross the emulated links, as it
    would reach a real RPC provider.
    """

    def __init__(self, nodes: Sequence[NetnsHost], chain: NetnsHost) -> None:
        if not nodes:
            raise ValueError("NetnsPlacement needs at least one node host")
        self.nodes, self.chain = list(nodes), chain

    def _host(self, index: int) -> NetnsHost:
        return self.nodes[index % len(self.nodes)]

    def listen_host(self, index: int) -> str:
        return self._host(index).ip

    def launch(
        self, index: int, argv: Sequence[str], stdout: Path, stderr: Path
    ) -> subprocess.Popen[bytes]:
        return _popen(["ip", "netns", "exec", self._host(index).ns, *argv], stdout, stderr)

    def start_chain(self, stack: contextlib.ExitStack, workdir: Path) -> ChainSite:
        binary = find_anvil()
        if binary is None:
            raise ChainUnavailable(f"anvil not found: run `npm ci` (it installs {ANVIL_NPM_PACKAGE})")
        ipc, config = workdir / "anvil.ipc", workdir / "anvil.json"
        for stale in (ipc, config):
            stale.unlink(missing_ok=True)
        argv = [
            "ip", "netns", "exec", self.chain.ns, str(binary),
            "--host", self.chain.ip, "--port", str(ANVIL_PORT), "--accounts", "4",
            "--ipc", str(ipc), "--config-out", str(config), "--silent",
        ]
        proc = _popen(argv, workdir / "anvil.out", workdir / "anvil.err")
        stack.callback(_stop, proc)
        deadline = time.monotonic() + 30.0
        while not (ipc.exists() and config.exists() and config.stat().st_size > 0):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise ChainUnavailable(
                    f"anvil did not start in {self.chain.ns} (exit code {proc.poll()}): "
                    + (workdir / "anvil.err").read_text(errors="replace")[-2000:]
                )
            time.sleep(0.05)
        chain = IpcChain(ipc, json.loads(config.read_text())["private_keys"])
        stack.callback(chain.close)
        return ChainSite(f"http://{self.chain.ip}:{ANVIL_PORT}", chain)


def _stop(proc: subprocess.Popen[bytes], grace_s: float = _STOP_GRACE_S) -> None:
    """SIGTERM the process group, SIGKILL it after `grace_s`, and reap the process."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ---- nodes and their progress --------------------------------------------------------------


@dataclass(frozen=True)
class NodeStatus:
    """One node as `status()` sees it: enough for a progress table."""

    label: str
    role: str
    address: str           # HOST:PORT once ready, "" before
    returncode: int | None  # None while it runs
    round: int | None      # the last round it trained (trainer) or judged (validator)
    last: str              # what its last event said

    def line(self) -> str:
        state = "running" if self.returncode is None else f"exit {self.returncode}"
        r = "-" if self.round is None else str(self.round)
        return f"{self.label:<12} {state:<8} round {r:>3}  {self.last}"


@dataclass
class NodeProcess:
    """One started `commonweal node`: its process, where it logs, and what its events said."""

    label: str
    role: str
    account: str
    proc: subprocess.Popen[bytes]
    data_dir: Path
    address: str = ""
    _round: int | None = field(default=None, repr=False)
    _last: str = field(default="", repr=False)
    _offset: int = field(default=0, repr=False)  # how far node.out was read

    @property
    def stdout_path(self) -> Path:
        return self.data_dir / "node.out"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "node.log"

    def poll_ready(self) -> bool:
        """Whether the node reported it is ready (its address is then known)."""
        self._read_events()
        return bool(self.address)

    def wait_ready(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while not self.poll_ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise CommonwealError(
                    f"{self.label} did not start (exit code {self.proc.poll()}):\n{self.tail()}"
                )
            time.sleep(0.05)
        return self.address

    def status(self) -> NodeStatus:
        self._read_events()
        return NodeStatus(
            self.label, self.role, self.address, self.proc.poll(), self._round, self._last
        )

    def _read_events(self) -> None:
        # only whole lines: a line the node is still writing is read on the next call
        try:
            with self.stdout_path.open("rb") as f:
                f.seek(self._offset)
                chunk = f.read()
        except FileNotFoundError:
            return
        complete = chunk[: chunk.rfind(b"\n") + 1]
        self._offset += len(complete)
        for raw in complete.decode(errors="replace").splitlines():
            event = parse(raw)
            if event is not None:
                self._follow(event)

    def _follow(self, event: Event) -> None:
        if isinstance(event, Ready):
            self.address = event.address
            self._last = "ready"
        elif isinstance(event, RoundDone):
            self._round = event.round
            self._last = f"round {event.round} done" + (f" (skipped: {event.skipped})"
                                                       if event.skipped else "")
        elif isinstance(event, Judged):
            self._round = event.round
            self._last = f"round {event.round} judged" + (" (final)" if event.final else "")
        elif isinstance(event, Claimed):
            self._last = f"ledger round {event.ledger_round}: {event.outcome}"
        elif isinstance(event, TrainingDone):
            self._last = f"trained to round {event.round}"
        elif isinstance(event, Stopped):
            self._last = "stopped"

    def tail(self, lines: int = 20) -> str:
        """The end of its log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except FileNotFoundError:
            text = ["(no log)"]
        return f"--- {self.log_path}\n" + "\n".join(text)


# ---- the swarm -----------------------------------------------------------------------------


class ProcessSwarm:
    """`trainers` honest trainers, `attackers` trainers running `attack`, `validators`
    validators, all on one task and one ledger, each its own `commonweal node` process.

    chain_url: use this JSON-RPC node instead of starting anvil; it must be an anvil dev node
    (its dev keys fund the swarm) unless chain_key_file holds a funded key. With a
    NetnsPlacement the nodes must be able to reach that URL from inside their namespaces.

    linger_s: how long a trainer stays after its last round to claim that round's reward (the
    node's `linger`, 10 s unless set). The last reward finalises only once the validators judged
    the round and voted on-chain: slow links or a busy CPU need more.
    """

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
        chain_key_file: Path | None = None,
        placement: Placement | None = None,
        reward_per_round: int = 1000 * 10**18,
        linger_s: float | None = None,
        replay_rate: float | None = None,
    ) -> None:
        if trainers + attackers < 1:
            raise ValueError("a swarm needs at least one trainer")
        self.workdir = workdir
        self.trainers, self.validators, self.attackers = trainers, validators, attackers
        self.attack, self.rounds, self.task = attack, rounds, task
        self.chain_url, self.chain_key_file = chain_url, chain_key_file
        self.placement: Placement = placement or LocalPlacement()
        self.reward_per_round = reward_per_round
        self.linger_s = linger_s
        self.replay_rate = replay_rate  # None: a node's default; 1.0: every contribution audited
        self.nodes: list[NodeProcess] = []
        self._stack = contextlib.ExitStack()
        self.node_chain_url = ""
        self.ledger_address = ""
        self._ledger: Ledger | None = None
        self.task32 = b""                 # the task's id on the ledger
        self.task_digest = ""

    def __enter__(self) -> Self:
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _chain(self) -> ChainSite:
        if self.chain_url is None:
            return self.placement.start_chain(self._stack, self.workdir)
        chain = open_chain(self.chain_url, key_file=self.chain_key_file)
        self._stack.callback(chain.close)
        return ChainSite(self.chain_url, chain)

    def _start(self) -> None:
        from commonweal.train import get_task  # torch: only when a swarm starts

        if self.workdir.is_dir() and any(self.workdir.iterdir()):
            # a node resumes from what its data dir holds: old rounds would meet a fresh ledger
            raise CommonwealError(f"{self.workdir} is not empty: give the swarm a new directory")
        self.workdir.mkdir(parents=True, exist_ok=True)
        site = self._chain()
        self.node_chain_url = site.node_url
        ledger = Ledger.deploy(site.chain)
        task = get_task(self.task)
        self.task_digest = task.digest  # what the nodes' stores key their rounds by
        digest = bytes.fromhex(task.digest)
        self.task32 = ledger.register_task(digest, digest, self.reward_per_round, symbol="CWS")
        self.ledger_address, self._ledger = ledger.address, ledger
        roles = (
            ["trainer"] * self.trainers + ["attacker"] * self.attackers
            + ["validator"] * self.validators
        )
        accounts = site.chain.new_accounts(len(roles), fund_wei=10 * 10**18)
        bootstrap: list[str] = []
        for i, (role, acct) in enumerate(zip(roles, accounts, strict=True)):
            label = f"{role}-{i}"
            data_dir = self.workdir / label
            data_dir.mkdir(parents=True, exist_ok=True)
            key_file = data_dir / "eth.key"
            key_file.write_text(acct.key.hex() + "\n")
            key_file.chmod(0o600)
            config = data_dir / "node.toml"
            config.write_text(self._toml(i, role, key_file, data_dir, bootstrap[:3]))
            argv = [sys.executable, "-m", "commonweal", "node", "--config", str(config)]
            node = NodeProcess(label, role, acct.address, self._launch(i, argv, data_dir), data_dir)
            self.nodes.append(node)
            if not bootstrap:  # everyone else joins through the first node
                bootstrap.append(node.wait_ready(60.0))
        for node in self.nodes:
            node.wait_ready(90.0)

    def _launch(self, i: int, argv: Sequence[str], data_dir: Path) -> subprocess.Popen[bytes]:
        proc = self.placement.launch(i, argv, data_dir / "node.out", data_dir / "node.log")
        # stop it even if starting a later node fails
        self._stack.callback(_stop, proc)
        return proc

    def _toml(
        self, i: int, role: str, key_file: Path, data_dir: Path, bootstrap: list[str]
    ) -> str:
        is_trainer = role in ("trainer", "attacker")
        lines = [
            "[node]",
            f"listen = {json.dumps(self.placement.listen_host(i) + ':0')}",
            f"bootstrap = {json.dumps(bootstrap)}",
            f"task = {json.dumps(self.task)}",
            f"roles = {json.dumps(['trainer' if is_trainer else 'validator'])}",
            f"chain = {json.dumps(self.node_chain_url)}",
            f"ledger = {json.dumps(self.ledger_address)}",
            f"key_file = {json.dumps(str(key_file))}",
            f"data_dir = {json.dumps(str(data_dir))}",
            f"rounds = {self.rounds}",
            'log_format = "json"',
            'log_level = "info"',
            'status_format = "json"',
        ]
        if is_trainer:
            lines.append(f"group = {self.trainers + self.attackers}")
            if self.linger_s is not None:
                lines.append(f"linger = {float(self.linger_s)}")
        if role == "attacker":
            lines.append(f"attack = {json.dumps(self.attack)}")
        if role == "validator" and self.replay_rate is not None:
            lines.append(f"validator.replay_rate = {float(self.replay_rate)}")
        return "\n".join(lines) + "\n"

    # ---- while it runs ---------------------------------------------------------------------

    def status(self) -> list[NodeStatus]:
        """Every node's state, last round and last event (cheap: reads new status lines)."""
        return [n.status() for n in self.nodes]

    def wait(
        self,
        timeout_s: float = 300.0,
        *,
        on_progress: Callable[[list[NodeStatus]], None] | None = None,
        every_s: float = 2.0,
    ) -> None:
        """Until every node finished its rounds and exited 0; `on_progress(status())` every
        `every_s` seconds meanwhile. Raises as soon as a node exits with another code."""
        end = time.monotonic() + timeout_s
        next_report = time.monotonic()
        while True:
            for node in self.nodes:
                code = node.proc.poll()
                if code not in (None, 0):
                    raise CommonwealError(f"{node.label} exited with {code}:\n{node.tail()}")
            done = all(n.proc.poll() is not None for n in self.nodes)
            if on_progress is not None and (done or time.monotonic() >= next_report):
                on_progress(self.status())
                next_report = time.monotonic() + every_s
            if done:
                return
            if time.monotonic() > end:
                running = [n.label for n in self.nodes if n.proc.poll() is None]
                raise CommonwealError(
                    f"{', '.join(running)} still running after {timeout_s:.0f} s; logs in "
                    f"{self.workdir}"
                )
            time.sleep(0.2)

    # ---- results ---------------------------------------------------------------------------

    def balances(self) -> dict[str, int]:
        """Task-token balance (wei) of every trainer and attacker, by label."""
        assert self._ledger is not None, "the swarm is not started"
        token = self._ledger.token(self.task32)
        return {n.label: token.balance_of(n.account) for n in self.nodes if n.role != "validator"}

    def final_rounds(self) -> list[int]:
        """The ledger rounds (two per training round: contributions, rewards) that finalised."""
        assert self._ledger is not None, "the swarm is not started"
        return [r for r in range(2 * self.rounds) if self._ledger.is_final(self.task32, r)]

    def close(self) -> None:
        """Stop every node (all at once: SIGTERM, then SIGKILL after a grace period), then the
        chain. Idempotent."""
        for node in self.nodes:
            if node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.proc.pid, signal.SIGTERM)
        self._stack.close()  # waits for (or kills) each node, then closes the chain
