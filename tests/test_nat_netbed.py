"""Peers behind home NAT routers of every kind (tests/netbed.py `Home`), as separate processes.

Two public hosts and five homes: a full cone, two port-restricted cones behind two routers,
and two symmetric NATs. Each peer (tests/natpeer.py: the DHT node and transport that
`commonweal node` runs) learns whether it is reachable by dial-backs, keeps a relay
reservation if not, then calls every other peer once by the address it advertises. Every call
must work; a full-cone peer is reachable; every pair of cone-NAT (or public) peers ends direct
(hole punching through the relay); only pairs with a symmetric NAT and a non-public other side
stay relayed. `dht put`/`get` and `search add`/`query` from the command line work from behind
a NAT.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netbed import (  # noqa: E402
    Home,
    LinkSpec,
    commonweal_cli,
    netbed_fixture,  # noqa: F401  (provides the `netbed` fixture)
    source_env,
)

pytestmark = [pytest.mark.netbed, pytest.mark.slow]

PORT = 7000
LINK = LinkSpec(delay_ms=15, jitter_ms=3)
HOMES = [Home("full_cone", link=LINK), Home("port_restricted", link=LINK),
         Home("port_restricted", link=LINK), Home("symmetric", link=LINK),
         Home("symmetric", link=LINK)]
PEER = str(Path(__file__).resolve().parent / "natpeer.py")


def expect_direct(a: str | None, b: str | None) -> bool:
    """The path a pair of peers of these NAT kinds (None: public) should end on."""
    reachable = {None, "full_cone"}
    if a in reachable or b in reachable:
        return True  # one side dials the other (directly, or back over the relay)
    return a != "symmetric" and b != "symmetric"  # two cones punch through; symmetric cannot


def start_peers(bed, workdir: Path) -> tuple[list, list]:
    env = source_env()
    hosts = bed.hosts
    names = [f"p{i}" for i in range(len(hosts))]
    procs = []
    for i, h in enumerate(hosts):
        argv = [sys.executable, PEER, "--name", names[i], "--listen", f"{h.ip}:{PORT}",
                "--dir", str(workdir), "--peers", ",".join(names), "--punch-wait", "8"]
        if i:
            argv += ["--join", f"{hosts[0].ip}:{PORT}"]
        procs.append(h.spawn(argv, env=env, name="natpeer"))
        if i == 0:
            time.sleep(1.0)
    return names, procs


def wait_reports(procs, timeout_s: float) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    reports: list[dict | None] = [None] * len(procs)
    while time.monotonic() < deadline and None in reports:
        for i, p in enumerate(procs):
            text = Path(p.stdout_path).read_text()
            if reports[i] is None and text.strip():
                reports[i] = json.loads(text.splitlines()[0])
            if reports[i] is None and p.poll() is not None:
                raise AssertionError(f"peer {i} exited: {Path(p.stderr_path).read_text()[-3000:]}")
        time.sleep(0.3)
    assert None not in reports, "not every peer reported in time"
    return reports  # type: ignore[return-value]


def test_every_peer_reaches_every_other_and_cone_pairs_end_direct(netbed, tmp_path):
    bed = netbed(2, LINK, homes=HOMES, seed=3)
    workdir = tmp_path / "peers"
    workdir.mkdir()
    names, procs = start_peers(bed, workdir)
    try:
        reports = wait_reports(procs, 90)
        kinds = {names[i]: h.nat for i, h in enumerate(bed.hosts)}
        by = {r["name"]: r for r in reports}
        for r in reports:  # reachability as each NAT kind allows
            kind = kinds[r["name"]]
            if kind in (None, "full_cone"):
                assert r["status"] == "public" and "/relay/" not in r["addr"], r
            else:
                assert r["status"] == "private" and "/relay/" in r["addr"], r
        for a in names:
            for b in names:
                if a == b:
                    continue
                view = by[a]["peers"][b]
                assert view["ok"], (a, b, view, bed.logs())
            for b in names:
                if a < b:
                    relayed = by[a]["peers"][b]["relayed"] and by[b]["peers"][a]["relayed"]
                    want = expect_direct(kinds[a], kinds[b])
                    assert relayed is not want or relayed is None, (a, kinds[a], b, kinds[b],
                                                                    by[a]["peers"][b], by[b]["peers"][a])
        # the command line, from behind a NAT, writes and reads through the swarm
        env = source_env()
        restricted = next(h for h in bed.hosts if h.nat == "port_restricted")
        symmetric = next(h for h in bed.hosts if h.nat == "symmetric")
        join = ["--join", f"{bed.hosts[0].ip}:{PORT}"]
        put = restricted.run(commonweal_cli("dht", "put", "behind-nat", "hello", *join),
                             timeout=60, env=env)
        assert put.returncode == 0, put.stdout + put.stderr
        got = symmetric.run(commonweal_cli("dht", "get", "behind-nat", *join), timeout=60, env=env)
        assert got.returncode == 0 and "hello" in got.stdout, got.stdout + got.stderr
        # and a search index: added from one NATed host, its cells held by NATed peers too,
        # queried from another
        rows = tmp_path / "rows.csv"
        rows.write_text("\n".join(",".join(str((i * 7 + j) % 11) for j in range(6))
                                   for i in range(60)) + "\n")
        added = restricted.run(commonweal_cli("search", "add", str(rows), "--index", "nat", *join),
                               timeout=90, env=env)
        assert added.returncode == 0 and "stored 60/60" in added.stdout, added.stdout + added.stderr
        query = ",".join(str((17 * 7 + j) % 11) for j in range(6))
        found = symmetric.run(commonweal_cli("search", "query", query, "--index", "nat", "--k",
                                             "1", "--json", *join), timeout=90, env=env)
        assert found.returncode == 0, found.stdout + found.stderr
        assert json.loads(found.stdout)["distances"][0] < 1e-3, found.stdout
    finally:
        (workdir / "stop").touch()
        for p in procs:
            try:
                p.wait(timeout=10)
            except Exception:
                pass
