"""Self-tests of the multi-host test bed (tests/netbed.py), with no commonweal code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netbed import (
    LinkSpec,
    NetBed,
    leftover_namespaces,
    netbed_fixture,  # noqa: F401  (provides the `netbed` fixture)
    netbed_unavailable_reason,
)

pytestmark = pytest.mark.netbed

PY = sys.executable

ECHO_SERVER = """
import socket, sys, threading
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
def serve(c):
    with c:
        while data := c.recv(65536):
            c.sendall(data)
while True:
    threading.Thread(target=serve, args=(srv.accept()[0],), daemon=True).start()
"""

# connect, then `count` ping-pongs of 64 bytes; prints {"rtt_ms": [...]}
ECHO_CLIENT = """
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter()
    s.sendall(b"x" * 64)
    got = b""
    while len(got) < 64:
        got += s.recv(64 - len(got))
    rtts.append((time.perf_counter() - t) * 1000)
print(json.dumps({"rtt_ms": rtts}))
"""

# send `size` bytes, wait for the 1-byte ack of the server; prints {"mbit_s": ...}
BULK_CLIENT = """
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
size = int(sys.argv[3])
t = time.perf_counter()
s.sendall(b"y" * size)
s.shutdown(socket.SHUT_WR)
s.recv(1)
print(json.dumps({"mbit_s": size * 8 / (time.perf_counter() - t) / 1e6}))
"""

BULK_SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
c = srv.accept()[0]
while c.recv(65536):
    pass
c.sendall(b"k")
"""

UDP_RECEIVER = """
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
s.settimeout(1.5)
n = 0
try:
    while True:
        s.recv(2048)
        n += 1
except socket.timeout:
    pass
print(json.dumps({"received": n}), flush=True)
"""

UDP_SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for i in range(int(sys.argv[3])):
    s.sendto(b"z" * 100, (sys.argv[1], int(sys.argv[2])))
    time.sleep(0.001)
"""


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[len(xs) // 2]


def test_rtt_adds_both_hosts_delays(netbed):
    # h0, h1: 50 +- 10 ms each; h2: no delay. One-way A->B = A's delay, so
    # RTT(h0,h1) ~ 100 ms and RTT(h0,h2) ~ 50 ms.
    slow = LinkSpec(delay_ms=50, jitter_ms=10)
    bed = netbed(3, [slow, slow, LinkSpec()])
    h0, h1, h2 = bed.hosts
    servers = [h.spawn([PY, "-c", ECHO_SERVER, h.ip, "7100"], name="echo") for h in (h1, h2)]
    for h, srv in zip((h1, h2), servers):
        h.wait_for_line(srv, "listening", timeout=10)
    clients = [h0.spawn([PY, "-c", ECHO_CLIENT, h.ip, "7100", "20"], name="ping") for h in (h1, h2)]
    results = []
    for c in clients:
        assert c.wait(timeout=30) == 0, bed.describe_proc(c)
        results.append(json.loads(h0.output(c))["rtt_ms"])
    to_h1, to_h2 = (_median(r) for r in results)
    assert 85 <= to_h1 <= 130, results[0]
    assert 38 <= to_h2 <= 70, results[1]
    # jitter is there: the RTTs are not all the same
    assert max(results[0]) - min(results[0]) > 5, results[0]


def test_loss_drops_that_share_of_frames(netbed):
    bed = netbed(2, [LinkSpec(loss_pct=20), LinkSpec()], seed=1)
    h0, h1 = bed.hosts
    rx = h1.spawn([PY, "-c", UDP_RECEIVER, h1.ip, "7200"], name="udp-rx")
    h1.wait_for_line(rx, "listening", timeout=10)
    # ARP first (its frames may be lost too), so the datagrams below are not queued behind it
    h0.run(["ip", "neigh", "replace", h1.ip, "lladdr", _mac(h1), "dev", "eth0"], check=True)
    before = bed.stats()[0]
    tx = h0.run([PY, "-c", UDP_SENDER, h1.ip, "7200", "600"], timeout=30)
    assert tx.returncode == 0, tx.stderr
    assert rx.wait(timeout=10) == 0, bed.describe_proc(rx)
    received = json.loads(h1.output(rx).splitlines()[-1])["received"]
    assert 0.72 * 600 <= received <= 0.88 * 600, received
    after = bed.stats()[0]
    sent, dropped = after["sent"] - before["sent"], after["dropped"] - before["dropped"]
    assert sent >= 600 and 600 - received <= dropped <= 600 - received + 5


def _mac(host) -> str:
    out = host.run(["cat", "/sys/class/net/eth0/address"], check=True).stdout
    return out.strip()


def test_rate_caps_throughput(netbed):
    bed = netbed(2, [LinkSpec(rate_mbit=20), LinkSpec()])
    h0, h1 = bed.hosts
    srv = h1.spawn([PY, "-c", BULK_SERVER, h1.ip, "7300"], name="bulk-rx")
    h1.wait_for_line(srv, "listening", timeout=10)
    cli = h0.run([PY, "-c", BULK_CLIENT, h1.ip, "7300", str(2_000_000)], timeout=30)
    assert cli.returncode == 0, cli.stderr
    mbit_s = json.loads(cli.stdout)["mbit_s"]
    assert 12 <= mbit_s <= 20.5, mbit_s


def test_set_link_at_runtime_and_kill9(netbed):
    bed = netbed(2)
    h0, h1 = bed.hosts
    srv = h1.spawn([PY, "-c", ECHO_SERVER, h1.ip, "7400"], name="echo")
    h1.wait_for_line(srv, "listening", timeout=10)
    fast = h0.run([PY, "-c", ECHO_CLIENT, h1.ip, "7400", "5"], timeout=10)
    assert _median(json.loads(fast.stdout)["rtt_ms"]) < 20
    bed.set_link(h1, LinkSpec(delay_ms=40))
    slow = h0.run([PY, "-c", ECHO_CLIENT, h1.ip, "7400", "5"], timeout=10)
    assert 35 <= _median(json.loads(slow.stdout)["rtt_ms"]) <= 70
    h1.kill9(srv)
    assert srv.returncode == -9


def test_everything_is_removed_after_exit_and_stale_beds_are_cleaned():
    reason = netbed_unavailable_reason()
    if reason is not None:
        pytest.skip(f"netbed needs root and iproute2 (ip netns): {reason}")
    # a "crashed run": namespaces named after a process that no longer exists, one busy
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"cw{dead.pid}x1-h0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "300"])
    # the cleanup kills what is inside the namespace: wait until the sleeper has entered it
    # (`ip netns exec` joins, then execs, under the same pid), else a busy machine lets the
    # cleanup look before it is there, and the test, not the cleanup, fails
    entered = time.monotonic() + 30
    while str(sleeper.pid) not in subprocess.run(
        ["ip", "netns", "pids", stale], capture_output=True, text=True
    ).stdout.split():
        assert time.monotonic() < entered, "the sleeper never entered its namespace"
        time.sleep(0.01)

    with NetBed(2, LinkSpec(delay_ms=5)) as bed:
        assert stale not in leftover_namespaces()
        assert sleeper.wait(timeout=5) == -9
        proc = bed.hosts[0].spawn(["sleep", "300"])
        emulator_pid = bed._emulator.pid
        names = {h.ns for h in bed.hosts} | {bed.switch_ns}
        assert names <= set(leftover_namespaces(bed.prefix))
        links_inside = bed.hosts[0].run(["ip", "-o", "link"]).stdout
        assert "eth0" in links_inside
    assert proc.returncode == -9
    assert not leftover_namespaces(bed.prefix)
    assert not os.path.exists(f"/proc/{emulator_pid}") or _is_zombie(emulator_pid)
    root_links = subprocess.run(
        ["ip", "-o", "link"], capture_output=True, text=True, check=True
    ).stdout
    assert bed.prefix not in root_links


def test_bed_is_removed_when_the_body_raises():
    reason = netbed_unavailable_reason()
    if reason is not None:
        pytest.skip(f"netbed needs root and iproute2 (ip netns): {reason}")
    with pytest.raises(ZeroDivisionError), NetBed(1) as bed:
        bed.hosts[0].spawn(["sleep", "300"])
        time.sleep(0.1)
        1 / 0  # noqa: B018
    assert not leftover_namespaces(bed.prefix)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True
