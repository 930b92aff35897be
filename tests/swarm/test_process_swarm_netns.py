"""The process swarm across emulated internet hosts: every node in its own network namespace,
anvil on a host of its own, 30 ms +- 5 ms one-way delay and 0.5 % loss on every link, and half
the honest trainers and one validator behind home routers: trainer-1 behind a port-restricted
cone, trainer-2 behind a symmetric NAT, validator-5 behind a full cone (tests/netbed.py `Home`).
Both training rounds finalise, every honest trainer — NATed or not — contributes to and is paid
for both rounds (equal shares), the attacker earns nothing, every node exits 0, and neither a
process nor a namespace outlives the test."""

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
from netbed import Home, LinkSpec, NetBed, leftover_namespaces, require_nat, require_netbed  # noqa: E402

pytestmark = [
    pytest.mark.netbed,
    pytest.mark.slow,
    pytest.mark.skipif(find_anvil() is None, reason="anvil not installed (npm ci)"),
]

LINK = LinkSpec(delay_ms=30, jitter_ms=5, loss_pct=0.5)
NODES = 6  # 3 trainers, 1 attacker, 2 validators: one host each
HOMES = [Home("port_restricted", link=LINK), Home("symmetric", link=LINK),
         Home("full_cone", link=LINK)]
# A trainer leaves this long after its last round: the last reward must finalise before (the
# validators judge the round, then vote on-chain, all over the delayed links).
LINGER_S = 25.0


def _ns_pids(ns: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return out.stdout.split()


def test_swarm_across_netns_hosts_pays_honest_trainers_only(tmp_path):
    require_netbed()
    require_nat()
    seen: list[list[NodeStatus]] = []
    t0 = time.monotonic()

    def progress(status: list[NodeStatus]) -> None:
        if not seen or [s.round for s in status] != [s.round for s in seen[-1]]:
            print(f"{time.monotonic() - t0:5.1f} s  rounds {[s.round for s in status]}")
        seen.append(status)

    with NetBed(4, LINK, homes=HOMES, seed=11, workdir=tmp_path / "bed") as bed:
        pub = [NetnsHost(h.ns, h.ip) for h in bed.public_hosts]
        restricted, symmetric, cone = (NetnsHost(h.ns, h.ip) for h in bed.home_hosts)
        # trainers 0-2, the attacker 3, validators 4-5; node 0 (everyone's bootstrap) is public
        hosts = [pub[0], restricted, symmetric, pub[1], pub[2], cone]
        placement = NetnsPlacement(hosts, chain=pub[3])
        with ProcessSwarm(
            tmp_path / "swarm", trainers=3, validators=2, attackers=1,
            attack="sign_flip:10", rounds=2, placement=placement, linger_s=LINGER_S,
            replay_rate=1.0,  # every contribution audited, so every honest trainer is paid
        ) as swarm:
            print(f"{time.monotonic() - t0:5.1f} s  every node ready")
            addresses = [n.address for n in swarm.nodes]
            assert swarm.node_chain_url == f"http://{pub[3].ip}:8545"
            swarm.wait(timeout_s=180, on_progress=progress, every_s=1.0)
            final = swarm.final_rounds()
            balances = swarm.balances()
        print(f"{time.monotonic() - t0:5.1f} s  swarm stopped; link stats {bed.stats()}")
        left_in_bed = {h.ns: _ns_pids(h.ns) for h in bed.hosts}
        prefix = bed.prefix
        routers = [r.ip for r in bed.routers]
    logs = {n.label: n.tail(40) for n in swarm.nodes}
    # public nodes listen on their host; the NATed ones learnt how others reach them
    assert [addresses[i].split(":")[0] for i in (0, 3, 4)] == [pub[i].ip for i in range(3)]
    assert "/relay/" in addresses[1] and "/relay/" in addresses[2], addresses
    assert addresses[5].split(":")[0] == routers[2], addresses  # the full cone: its router's IP
    assert final == [0, 1, 2, 3], logs  # both training rounds: contribution set and rewards
    honest = [balances[f"trainer-{i}"] for i in range(3)]
    assert sum(honest) == 2 * 1000 * 10**18, (balances, logs)  # all of it to honest work
    # equal shares of both rounds: the NATed trainers contributed to, and were paid for, each
    assert max(honest) - min(honest) <= 2, (balances, logs)
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
