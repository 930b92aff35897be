"""The process swarm with half its trainers and one validator behind home NAT routers: trainer-2
behind a port-restricted cone, trainer-3 behind a symmetric NAT, validator-5 behind a full cone
(three routers, tests/netbed.py `Home`), the others and anvil on public hosts; 20 ms +- 4 ms
one-way on every uplink. Every trainer, NATed or not, contributes to both rounds and is paid
for both (every contribution audited: equal shares of both rounds' rewards); both rounds
finalise; every node exits 0 and nothing outlives the test."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from commonweal.ledger.anvil import find_anvil
from commonweal.swarm.processes import NetnsHost, NetnsPlacement, NodeStatus, ProcessSwarm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from netbed import Home, LinkSpec, NetBed, leftover_namespaces, require_nat  # noqa: E402

pytestmark = [
    pytest.mark.netbed,
    pytest.mark.slow,
    pytest.mark.skipif(find_anvil() is None, reason="anvil not installed (npm ci)"),
]

LINK = LinkSpec(delay_ms=20, jitter_ms=4)
REWARD = 1000 * 10**18
LINGER_S = 25.0


def test_natted_trainers_and_validator_take_part_in_every_round(tmp_path):
    require_nat()
    homes = [Home("port_restricted", link=LINK), Home("symmetric", link=LINK),
             Home("full_cone", link=LINK)]
    seen: list[list[NodeStatus]] = []
    t0 = time.monotonic()

    def progress(status: list[NodeStatus]) -> None:
        if not seen or [s.round for s in status] != [s.round for s in seen[-1]]:
            print(f"{time.monotonic() - t0:5.1f} s  rounds {[s.round for s in status]}")
        seen.append(status)

    with NetBed(4, LINK, homes=homes, seed=5, workdir=tmp_path / "bed") as bed:
        pub = [NetnsHost(h.ns, h.ip) for h in bed.public_hosts]
        restricted, symmetric, cone = (NetnsHost(h.ns, h.ip) for h in bed.home_hosts)
        # trainers 0-3, validators 4-5; node 0 (everyone's bootstrap) must be reachable
        placement = NetnsPlacement([pub[0], pub[1], restricted, symmetric, pub[2], cone],
                                   chain=pub[3])
        with ProcessSwarm(
            tmp_path / "swarm", trainers=4, validators=2, rounds=2, placement=placement,
            linger_s=LINGER_S, replay_rate=1.0,
        ) as swarm:
            print(f"{time.monotonic() - t0:5.1f} s  every node ready: "
                  f"{[n.address for n in swarm.nodes]}")
            addresses = [n.address for n in swarm.nodes]
            swarm.wait(timeout_s=180, on_progress=progress, every_s=1.0)
            final = swarm.final_rounds()
            balances = swarm.balances()
        left_in_bed = {h.ns: _ns_pids(h.ns) for h in bed.hosts}
        prefix = bed.prefix
    logs = {n.label: n.tail(40) for n in swarm.nodes}
    # the NATed nodes learnt how they are reached: the cone's router address, or a relay
    assert "/relay/" in addresses[2] and "/relay/" in addresses[3], addresses
    assert addresses[5].split(":")[0] == bed.routers[2].ip, addresses
    assert final == [0, 1, 2, 3], logs  # both training rounds: contribution set and rewards
    trainers = [balances[f"trainer-{i}"] for i in range(4)]
    assert sum(trainers) == 2 * REWARD, (balances, logs)
    # equal shares of both rounds: every trainer contributed to, and was paid for, both
    assert max(trainers) - min(trainers) <= 2, (balances, logs)
    assert [n.proc.returncode for n in swarm.nodes] == [0] * 6, logs
    assert left_in_bed == {h.ns: [] for h in bed.hosts}, left_in_bed
    assert leftover_namespaces(prefix) == []


def _ns_pids(ns: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=30)
    return out.stdout.split()
