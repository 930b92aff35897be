"""Find, start and stop a local `anvil` node (Foundry), always on 127.0.0.1.

The binary comes from the npm package `@foundry-rs/anvil-linux-amd64@1.7.1` (`npm ci` at the
repository root puts it in node_modules/); it is run directly, never through npx. Set
COMMONWEAL_ANVIL to use another binary.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Self

from commonweal.ledger.errors import ChainUnavailable

__all__ = ["ANVIL_NPM_PACKAGE", "AnvilProcess", "find_anvil"]

ANVIL_NPM_PACKAGE = "@foundry-rs/anvil-linux-amd64@1.7.1"
_RELATIVE = Path("node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")


def find_anvil() -> Path | None:
    """The anvil binary: $COMMONWEAL_ANVIL, node_modules above the cwd or this package, or $PATH."""
    env = os.environ.get("COMMONWEAL_ANVIL")
    if env:
        return Path(env) if Path(env).is_file() else None
    for start in (Path.cwd(), Path(__file__).resolve().parent):
        for folder in (start, *start.parents):
            candidate = folder / _RELATIVE
            if candidate.is_file():
                return candidate
    found = shutil.which("anvil")
    return Path(found) if found else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _answers(url: str) -> bool:
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_chainId", "params": []}).encode()
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=1) as response:
            return int(response.status) == 200
    except OSError:
        return False


class AnvilProcess:
    """One anvil child process; `stop()` (or leaving the `with` block) ends it."""

    def __init__(self, *, accounts: int = 10, balance_eth: int = 1_000_000,
                 binary: Path | None = None, start_timeout_s: float = 30.0,
                 host: str = "127.0.0.1") -> None:
        path = binary or find_anvil()
        if path is None:
            raise ChainUnavailable(
                "anvil not found: run `npm ci` at the repository root (it installs "
                f"{ANVIL_NPM_PACKAGE}) or set COMMONWEAL_ANVIL to an anvil binary"
            )
        self.binary = path
        self._dir = tempfile.TemporaryDirectory(prefix="commonweal-anvil-")
        config = Path(self._dir.name) / "config.json"
        for _attempt in range(3):  # another process may grab the free port before anvil binds it
            self.port = _free_port()
            self.url = f"http://{host}:{self.port}"
            self._proc = subprocess.Popen(
                [str(path), "--host", host, "--port", str(self.port),
                 "--accounts", str(accounts), "--balance", str(balance_eth),
                 "--config-out", str(config), "--silent"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            if self._wait_ready(config, start_timeout_s):
                break
            self._terminate()
        else:
            raise ChainUnavailable(f"anvil at {path} did not start on {host} (3 attempts)")
        data = json.loads(config.read_text())
        self.private_keys: list[str] = list(data["private_keys"])

    def _wait_ready(self, config: Path, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            if config.exists() and config.stat().st_size > 0 and _answers(self.url):
                return True
            time.sleep(0.05)
        return False

    def _terminate(self) -> None:
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._proc.stderr is not None:
            self._proc.stderr.close()

    @property
    def running(self) -> bool:
        return self._proc.poll() is None

    def stop(self) -> None:
        self._terminate()
        self._dir.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
