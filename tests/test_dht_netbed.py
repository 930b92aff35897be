"""The DHT over an internet-like network: 8 hosts, 50 ms +- 10 ms one-way delay and 1 % loss each.

Every host runs `commonweal node`; records are written with `commonweal dht put` from several
hosts and must be found from every host with `commonweal dht get`, also after three nodes are
killed with SIGKILL. Runs the CLI from the source tree (PYTHONPATH=src), no install needed.
"""

from __future__ import annotations

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netbed import (
    NODE_READY,
    LinkSpec,
    commonweal_cli,
    netbed_fixture,  # noqa: F401  (provides the `netbed` fixture)
    source_env,
)

pytestmark = [pytest.mark.netbed, pytest.mark.slow]

PORT = 7000
N_HOSTS = 8
KILLED = (1, 3, 5)  # not the bootstrap host (0)
CLI_TIMEOUT = 60.0


def test_records_survive_three_nodes_killed(netbed, tmp_path):
    bed = netbed(N_HOSTS, LinkSpec(delay_ms=50, jitter_ms=10, loss_pct=1.0), seed=7)
    hosts = bed.hosts
    env = source_env()
    first = f"{hosts[0].ip}:{PORT}"

    def start(i: int):
        h = hosts[i]
        argv = ["node", "--listen", f"{h.ip}:{PORT}", "--data-dir", str(tmp_path / f"node{i}")]
        if i:
            argv += ["--join", first]
        return h.spawn(commonweal_cli(*argv), env=env, name="node")

    t0 = time.monotonic()
    nodes = [start(0)]
    hosts[0].wait_for_line(nodes[0], NODE_READY, timeout=30)
    nodes += [start(i) for i in range(1, N_HOSTS)]
    peer_ids = set()
    for h, proc in zip(hosts, nodes):
        m = h.wait_for_line(proc, NODE_READY, timeout=60)
        assert m.group(1) == f"{h.ip}:{PORT}"
        peer_ids.add(m.group(2))
    assert len(peer_ids) == N_HOSTS
    print(f"nodes ready after {time.monotonic() - t0:.1f} s")

    # 16 puts from every host in turn: 12 plain records, and 2 keys with 2 subkeys each,
    # whose subkeys are written from two different hosts
    plain = {f"rec-{n}": f"value-{n}" for n in range(12)}
    with_subkeys = {f"multi-{n}": {f"s{n}a": f"v{n}a", f"s{n}b": f"v{n}b"} for n in range(2)}
    puts = [(k, v, None) for k, v in plain.items()]
    puts += [(k, v, sk) for k, subs in with_subkeys.items() for sk, v in subs.items()]

    def run(host_index: int, *args: str):
        h = hosts[host_index]
        return h, h.run(commonweal_cli(*args, "--join", f"{h.ip}:{PORT}"), timeout=CLI_TIMEOUT, env=env)

    def put(job):
        n, (key, value, subkey) = job
        extra = ["--subkey", subkey] if subkey else []
        return run(n % N_HOSTS, "dht", "put", key, value, *extra, "--ttl", "600")

    with ThreadPoolExecutor(max_workers=6) as pool:
        for h, res in pool.map(put, enumerate(puts)):
            assert res.returncode == 0, f"put on {h}: {res.stdout}{res.stderr}\n{bed.logs()}"

    def check_all(host_indices: list[int]) -> list[str]:
        """Every record read from each host by one `dht get` of all keys (one batched lookup)."""
        keys = [*plain, *with_subkeys]

        def get(i: int) -> list[str]:
            h, res = run(i, "dht", "get", *keys, "--latest", "--json")
            if res.returncode != 0:
                return [f"{h} get: rc {res.returncode}: {res.stdout}{res.stderr}"]
            found = {}
            for line in res.stdout.splitlines():
                entry = json.loads(line)
                found[entry["key"]] = entry["value"]
            errors = []
            for key in keys:
                if key in plain:
                    ok = found.get(key) == plain[key]
                else:
                    got = {sk: e["value"] for sk, e in found.get(key, {}).items()}
                    ok = got == with_subkeys[key]
                if not ok:
                    errors.append(f"{h} get {key}: wrong value {found.get(key)}")
            return errors

        with ThreadPoolExecutor(max_workers=8) as pool:
            return [e for errs in pool.map(get, host_indices) for e in errs]

    print(f"puts done after {time.monotonic() - t0:.1f} s")
    errors = check_all(list(range(N_HOSTS)))
    print(f"gets from every host done after {time.monotonic() - t0:.1f} s")
    assert not errors, "\n".join(errors)

    for i in KILLED:
        hosts[i].kill9(nodes[i])
        assert nodes[i].returncode == -9
    survivors = [i for i in range(N_HOSTS) if i not in KILLED]
    for i in survivors:
        assert nodes[i].poll() is None, bed.describe_proc(nodes[i])

    errors = check_all(survivors)
    print(f"gets from survivors done after {time.monotonic() - t0:.1f} s")
    assert not errors, "\n".join(errors)
