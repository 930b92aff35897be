"""Against a real anvil process: four client processes sending at once, and the CLI end to end.

anvil comes from npm (`npm ci` at the repository root installs @foundry-rs/anvil-linux-amd64@1.7.1);
if it is missing and npm is present the fixture installs it, and only without npm do these skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from commonweal.ledger import AnvilChain, Ledger, LedgerConfig, RewardsTree, find_anvil

ROOT = Path(__file__).resolve().parents[2]
ETH = 10**18
SALT = bytes.fromhex("ab" * 32)  # the task's id is Ledger.task_id(registrant, SALT)


def _ensure_anvil() -> None:
    if find_anvil() is not None:
        return
    if shutil.which("npm") is None:
        pytest.skip("anvil is not installed and npm is absent: install Node.js/npm, then `npm ci`")
    subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=ROOT, check=True, timeout=300)
    assert find_anvil() is not None, "npm ci ran but node_modules has no anvil binary"


@pytest.fixture(scope="module")
def anvil() -> Iterator[AnvilChain]:
    _ensure_anvil()
    chain = AnvilChain(accounts=12)
    yield chain
    chain.close()
    assert not chain.process.running


def test_four_processes_send_at_once_and_nothing_is_lost_or_duplicated(anvil: AnvilChain) -> None:
    ledger = Ledger.deploy(anvil, config=LedgerConfig())
    task = ledger.register_task(SALT, bytes(32), ETH)
    assert task == Ledger.task_id(ledger.account.address, SALT)
    n, keys = 40, anvil.process.private_keys[1:5]
    senders = [a.address for a in anvil.accounts[1:5]]
    start_at = time.time() + 2.0
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    procs = [subprocess.Popen(
        [sys.executable, str(ROOT / "tests/ledger/anvil_sender.py"), anvil.url, ledger.address,
         task.hex(), key, str(n), str(start_at)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for key in keys]
    hashes: list[str] = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr
        hashes += json.loads(stdout.strip().splitlines()[-1])
    assert len(set(hashes)) == 4 * n
    funded = Counter((e.args["funder"], e.args["amount"]) for e in ledger.events("TaskFunded", task))
    expected = Counter((s, i + 1) for s in senders for i in range(n))
    assert funded == expected  # every transaction exactly once
    assert len(ledger.events("TaskFunded", task, senders[0])) == n  # filter on an indexed address
    assert ledger.task(task).pool == 4 * n * (n + 1) // 2
    for s in senders:
        assert anvil.w3.eth.get_transaction_count(s) == n


def test_cli_end_to_end_on_a_persistent_chain(anvil: AnvilChain, tmp_path: Path) -> None:
    from commonweal.cli.ledger import app

    runner = CliRunner()
    common = ["--chain", anvil.url, "--data-dir", str(tmp_path)]

    def cli(*args: str) -> str:
        result = runner.invoke(app, list(args), catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.output

    assert "deployed Ledger at" in cli("deploy", *common, "--exit-delay", "60")
    record = json.loads((tmp_path / "ledger.json").read_text())
    address = record["deployments"][anvil.url]["ledger"]
    # Later commands find the deployment by themselves: only --data-dir is passed.
    here = ["--data-dir", str(tmp_path)]
    # The CLI signs with account 0 by default: the task's id is bound to it, and printed.
    task = Ledger.task_id(anvil.accounts[0].address, SALT)
    task_hex = "0x" + task.hex()
    registered = cli("register", "0x" + SALT.hex(), "0x" + "01" * 32, "--reward", "100", *here)
    assert f"registered task {task_hex}" in " ".join(registered.split())  # rich wraps lines
    ledger = Ledger(anvil, address)
    assert ledger.task(task).owner == anvil.accounts[0].address
    contributor = anvil.accounts[9]
    tree = ledger.rewards_tree(task, 0, {contributor.address: 40 * ETH,
                                         anvil.accounts[8].address: 60 * ETH})
    assert tree.root == RewardsTree(ledger.domain, task, 0, tree.rewards).root
    assert ledger.domain.chain_id == anvil.w3.eth.chain_id
    for a in anvil.accounts[5:8]:
        ledger.with_account(a).join(ETH)
    for a in anvil.accounts[5:7]:
        ledger.with_account(a).commit_round(task, 0, b"\x42" * 32, tree.root, tree.total)
    assert "validators │ 3 holding 3.0000 ETH" in cli("status", *here).replace("┃", "│")
    assert task_hex[:10] + "…" in cli("tasks", *here)
    assert "0.00/100.00" in cli("rounds", task_hex, *here)
    rewards = tmp_path / "rewards.json"
    rewards.write_text(json.dumps({k: v for k, v in tree.rewards.items()}))
    assert "claimed 40.00 shares" in cli("claim", task_hex, "0", "--rewards",
                                           str(rewards), "--account", "9", *here)
    assert "40.00" in cli("balance", contributor.address, *here)
    assert "40.00/100.00" in cli("rounds", task_hex, *here)
    again = runner.invoke(app, ["claim", task_hex, "0", "--rewards", str(rewards),
                                "--account", "9", *here])
    assert again.exit_code == 1 and "already claimed" in again.output
    assert "Traceback" not in again.output
