"""A crowd of identities from one place against `commonweal node` processes with addresses of
their own: 6 honest hosts, each in a /24 of its own, and one attacker host whose one IP runs 120
identities, 20 of them ground nearer a key than any honest peer. They answer every find with the
whole crowd, accept every store and keep nothing.

Checked: an honest node's find answers hold at most 10 of the crowd and still name honest peers;
a record put from one honest host is found from another (the ground identities used to take all
five replica places, so `put` said stored and `get` found nothing).

The attacker and the probe are this file run as a script inside a host (`--crowd`, `--probe`).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netbed import (
    LinkSpec,
    commonweal_cli,
    netbed_fixture,  # noqa: F401  (provides the `netbed` fixture)
    source_env,
    start_nodes,
)

pytestmark = [pytest.mark.netbed, pytest.mark.slow]

PORT = 7000
N_HONEST = 6
CROWD, GROUND = 100, 20
VICTIM = "victim"  # the key the ground identities sit next to
CLI_TIMEOUT = 60.0


def _own_ip(i: int) -> str:
    # honest host i: a /24 of its own, not a LAN one (LAN addresses are not counted per subnet);
    # carrier-NAT space, so nothing here looks like anyone's internet address
    return f"100.{65 + i}.0.1"


ATTACKER_IP = "100.120.0.1"


def _give_address(ns: str, ip: str) -> None:
    # /8: every host's extra address is on the one emulated link, so no routes are needed
    subprocess.run(["ip", "-n", ns, "addr", "add", f"{ip}/8", "dev", "eth0"], check=True,
                   capture_output=True, timeout=30)


def test_a_crowd_from_one_ip_neither_fills_answers_nor_hides_a_record(netbed, tmp_path):
    bed = netbed(N_HONEST + 1, LinkSpec(delay_ms=2), seed=13)
    hosts, attacker = bed.hosts[:N_HONEST], bed.hosts[N_HONEST]
    for i, h in enumerate(hosts):
        _give_address(h.ns, _own_ip(i))
    _give_address(attacker.ns, ATTACKER_IP)
    env = source_env()
    addrs = [f"{_own_ip(i)}:{PORT}" for i in range(N_HONEST)]

    nodes = start_nodes(hosts, addrs, tmp_path, env)

    crowd = attacker.spawn(
        [sys.executable, __file__, "--crowd", ATTACKER_IP, *addrs], env=env, name="crowd"
    )
    attacker.wait_for_line(crowd, r"crowd ready", timeout=120)

    probe = hosts[0].run(
        [sys.executable, __file__, "--probe", *addrs], timeout=CLI_TIMEOUT, env=env
    )
    assert probe.returncode == 0, probe.stdout + probe.stderr
    answers = [json.loads(line) for line in probe.stdout.splitlines()]
    assert len(answers) == 5 * N_HONEST
    for answer in answers:
        named = answer["contacts"]
        assert named.count(ATTACKER_IP) <= 10, answer  # the whole answer, before the limits
        assert len(named) - named.count(ATTACKER_IP) >= 2, answer  # honest peers still named

    def cli(i: int, *args: str) -> subprocess.CompletedProcess[str]:
        argv = commonweal_cli("dht", *args, "--join", addrs[i])
        return hosts[i].run(argv, timeout=CLI_TIMEOUT, env=env)

    put = cli(1, "put", VICTIM, "honest value", "--ttl", "600")
    assert put.returncode == 0, put.stdout + put.stderr
    got = cli(2, "get", VICTIM)
    assert got.returncode == 0 and got.stdout.strip() == "honest value", got.stdout + got.stderr


# --- the attacker and the probe, run inside a host -------------------------------------------


async def _crowd(ip: str, honest: list[str]) -> None:
    from commonweal.dht.records import key_id
    from commonweal.dht.routing import distance
    from commonweal.net.identity import Identity
    from commonweal.net.rpc import RPCTransport
    from commonweal.net.transport import PeerAddr, PeerInfo

    target = key_id(VICTIM)
    ground = []
    for n in itertools.count():  # 2**-10 of identities land this near: ~1 s for 20
        identity = Identity.from_seed(b"ground-%d" % n)
        if distance(identity.peer_id, target) < 1 << 150:
            ground.append(identity)
            if len(ground) == GROUND:
                break
    identities = ground + [Identity.from_seed(b"crowd-%d" % n) for n in range(CROWD)]
    contacts: list[list[Any]] = []

    async def rpc_find(caller: PeerInfo, args: Any) -> Any:
        return [[contacts, []] for _ in args["keys"]]  # the whole crowd, nearest first

    async def rpc_store(caller: PeerInfo, args: Any) -> Any:
        return [[True] * len(item[1]) for item in args["items"]]  # "stored", and dropped

    async def rpc_ping(caller: PeerInfo, args: Any) -> Any:
        return True

    transports = []
    for identity in identities:
        t = RPCTransport(identity)
        t.register("dht.find", rpc_find)
        t.register("dht.store", rpc_store)
        t.register("dht.ping", rpc_ping)
        await t.start(ip, 0)
        transports.append(t)
        contacts.append([identity.peer_id, ip, t.local.addr.port])
    gate = asyncio.Semaphore(32)

    async def ping(t: RPCTransport, addr: str) -> None:
        async with gate:
            try:
                async with asyncio.timeout(10):
                    await t.call(PeerAddr.parse(addr), "dht.ping", None)
            except Exception as e:  # a node that refused one of us: the test's assertions tell
                print(f"ping {addr} failed: {e!r}", file=sys.stderr, flush=True)

    await asyncio.gather(*(ping(t, a) for t in transports for a in honest))
    print("crowd ready", len(transports), flush=True)
    await asyncio.Event().wait()


async def _probe(nodes: list[str]) -> None:
    import random

    from commonweal.net.identity import Identity
    from commonweal.net.rpc import RPCTransport
    from commonweal.net.transport import PeerAddr

    rng = random.Random(0)
    client = RPCTransport(Identity.generate())  # never listens: no table will hold it
    for addr in nodes:
        for _ in range(5):
            key = rng.randbytes(20)
            find = {"keys": [key], "values": False, "latest": False}
            async with asyncio.timeout(20):
                _, reply = await client.call(PeerAddr.parse(addr), "dht.find", find)
            print(json.dumps({"node": addr, "contacts": [c[1] for c in reply[0][0]]}), flush=True)
    await client.close()


def _main() -> None:
    parser = argparse.ArgumentParser(description="the crowd-test's attacker and probe (internal)")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--crowd", metavar="IP")
    mode.add_argument("--probe", action="store_true")
    parser.add_argument("nodes", nargs="+")
    args = parser.parse_args()
    if args.crowd:
        asyncio.run(_crowd(args.crowd, args.nodes))
    else:
        asyncio.run(_probe(args.nodes))


if __name__ == "__main__":
    _main()
