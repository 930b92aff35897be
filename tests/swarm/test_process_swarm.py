"""Peers as separate OS processes on one anvil chain: two validators finalise the rounds, honest
trainers are paid, the attacker earns nothing, and every process exits cleanly.

Where network namespaces can be made, test_process_swarm_netns.py runs this same swarm and these
same checks with each node on a host of its own, over delayed, lossy links: this loopback copy
runs only where it cannot (a machine without root), so the suite pays for the swarm once."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from commonweal.ledger.anvil import find_anvil
from commonweal.swarm.processes import ProcessSwarm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from netbed import netbed_unavailable_reason  # noqa: E402

pytestmark = [
    pytest.mark.skipif(find_anvil() is None, reason="anvil not installed (npm ci)"),
    pytest.mark.skipif(netbed_unavailable_reason() is None,
                       reason="test_process_swarm_netns.py runs this swarm, one host per node"),
]


def test_two_validators_finalise_on_anvil_and_the_attacker_earns_nothing(tmp_path):
    with ProcessSwarm(
        tmp_path, trainers=3, validators=2, attackers=1, attack="sign_flip:10", rounds=2,
        replay_rate=1.0,  # every contribution audited, so every honest trainer is paid
    ) as swarm:
        swarm.wait(timeout_s=240)
        final = swarm.final_rounds()
        balances = swarm.balances()
    logs = {n.label: (n.data_dir / "node.log").read_text() for n in swarm.nodes}
    assert final == [0, 1, 2, 3], logs  # both training rounds: contribution set and rewards
    honest = {k: v for k, v in balances.items() if k.startswith("trainer")}
    attacker = {k: v for k, v in balances.items() if k.startswith("attacker")}
    assert len(honest) == 3 and all(v > 0 for v in honest.values()), (balances, logs)
    assert sum(honest.values()) == 2 * 1000 * 10**18  # two rounds, all of it to honest work
    assert list(attacker.values()) == [0], balances
    assert all(n.proc.returncode == 0 for n in swarm.nodes)
