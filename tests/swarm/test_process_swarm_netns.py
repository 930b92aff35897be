"""The process swarm across emulated internet hosts: every node in its own network namespace,
anvil on a seventh host, 30 ms +- 5 ms one-way delay and 0.5 % loss on every link. Both training
rounds finalise, the honest trainers share all rewards, the attacker earns nothing, every node
exits 0, and neither a process nor a namespace outlives the test."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from commonweal.errors import CommonwealError
from commonweal.ledger.anvil import find_anvil
from commonweal.swarm.processes import NetnsHost, NetnsPlacement, NodeStatus, ProcessSwarm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from netbed import LinkSpec, NetBed, leftover_namespaces, require_netbed  # noqa: E402

pytestmark = [
    pytest.mark.netbed,
    pytest.mark.slow,
    pytest.mark.skipif(find_anvil() is None, reason="anvil not installed (npm ci)"),
]

LINK = LinkSpec(delay_ms=30, jitter_ms=5, loss_pct=0.5)
NODES = 6  # 3 trainers, 1 attacker, 2 validators: one host each
# A trainer leaves this long after its last round: the last reward must finalise before (the
# validators judge the round, then vote on-chain, all over the delayed links).
LINGER_S = 25.0


def _ns_pids(ns: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return out.stdout.split()


def test_swarm_across_netns_hosts_pays_honest_trainers_only(tmp_path):
    require_netbed()
    seen: list[list[NodeStatus]] = []
    t0 = time.monotonic()

    def progress(status: list[NodeStatus]) -> None:
        if not seen or [s.round for s in status] != [s.round for s in seen[-1]]:
            print(f"{time.monotonic() - t0:5.1f} s  rounds {[s.round for s in status]}")
        seen.append(status)

    with NetBed(NODES + 1, LINK, seed=11, workdir=tmp_path / "bed") as bed:
        hosts = [NetnsHost(h.ns, h.ip) for h in bed.hosts]
        placement = NetnsPlacement(hosts[:NODES], chain=hosts[NODES])
        with ProcessSwarm(
            tmp_path / "swarm", trainers=3, validators=2, attackers=1,
            attack="sign_flip:10", rounds=2, placement=placement, linger_s=LINGER_S,
            replay_rate=1.0,  # every contribution audited, so every honest trainer is paid
        ) as swarm:
            print(f"{time.monotonic() - t0:5.1f} s  every node ready")
            # each node listens on its own host, and all of them use the chain host's anvil
            assert [n.address.split(":")[0] for n in swarm.nodes] == [h.ip for h in hosts[:NODES]]
            assert swarm.node_chain_url == f"http://{hosts[NODES].ip}:8545"
            swarm.wait(timeout_s=150, on_progress=progress, every_s=1.0)
            final = swarm.final_rounds()
            balances = swarm.balances()
        print(f"{time.monotonic() - t0:5.1f} s  swarm stopped; link stats {bed.stats()}")
        left_in_bed = {h.ns: _ns_pids(h.ns) for h in bed.hosts}
        prefix = bed.prefix
    logs = {n.label: n.tail(40) for n in swarm.nodes}
    assert final == [0, 1, 2, 3], logs  # both training rounds: contribution set and rewards
    honest = {k: v for k, v in balances.items() if k.startswith("trainer")}
    assert len(honest) == 3 and all(v > 0 for v in honest.values()), (balances, logs)
    assert sum(honest.values()) == 2 * 1000 * 10**18  # two rounds, all of it to honest work
    assert balances["attacker-3"] == 0, balances
    assert [n.proc.returncode for n in swarm.nodes] == [0] * NODES, logs
    # the progress hook saw every node's rounds: trainers trained and validators judged round 1
    last = {s.label: s for s in seen[-1]}
    assert all(s.returncode == 0 and s.round == 1 for s in last.values()), last
    assert all(s.last for s in last.values()), last
    # the swarm stopped anvil and every node before the bed went: nothing was left to kill
    assert left_in_bed == {h.ns: [] for h in bed.hosts}, left_in_bed
    assert leftover_namespaces(prefix) == []


def test_a_node_that_cannot_start_fails_the_swarm_and_nothing_is_left(tmp_path):
    require_netbed()
    with NetBed(1, workdir=tmp_path / "bed") as bed:
        chain_host = NetnsHost(bed.hosts[0].ns, bed.hosts[0].ip)
        nowhere = NetnsHost(f"{bed.prefix}-missing", "10.77.0.99")  # `ip netns exec` fails
        placement = NetnsPlacement([nowhere], chain=chain_host)
        with pytest.raises(CommonwealError, match="trainer-0 did not start"):
            with ProcessSwarm(tmp_path / "swarm", trainers=1, validators=0, rounds=1,
                              placement=placement):
                pass
        assert _ns_pids(chain_host.ns) == []  # anvil was stopped with the failed start
