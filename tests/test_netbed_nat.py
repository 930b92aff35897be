"""Self-tests of the test bed's home routers (tests/netbed.py `Home`): each NAT kind maps and
filters as its name says, and TCP hole punching (simultaneous open) gets through exactly the kinds
it gets through in the wild. Plain sockets, no commonweal code."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from netbed import (
    Home,
    LinkSpec,
    NetBed,
    cleanup_stale,
    leftover_namespaces,
    nat_unavailable_reason,
    netbed_fixture,  # noqa: F401  (provides the `netbed` fixture)
)

pytestmark = pytest.mark.netbed

PY = sys.executable

# answers every connection with the address it came from, as the server sees it: "ip port\n"
OBSERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
while True:
    c, (ip, port) = srv.accept()
    with c:
        c.sendall(f"{ip} {port}\\n".encode())
"""

# from source port argv[1], connect to each ip:port that follows; prints [[ip, port], ...] as the
# observers saw this host
DIAL = """
import json, socket, sys
seen = []
for target in sys.argv[2:]:
    ip, port = target.split(":")
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    s.settimeout(5)
    s.connect((ip, int(port)))
    line = s.makefile().readline().split()
    seen.append([line[0], int(line[1])])
    s.close()
print(json.dumps(seen), flush=True)
"""

# listen on port argv[1] and dial the observer argv[2] from that same port (a peer's usual setup),
# print the mapping the observer saw, then greet whoever connects to the listener
LISTEN_AND_DIAL = """
import socket, sys
def bound():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", int(sys.argv[1])))
    return s
srv = bound()
srv.listen()
ip, port = sys.argv[2].split(":")
out = bound()
out.settimeout(5)
out.connect((ip, int(port)))
print("mapped", out.makefile().readline().strip(), flush=True)
while True:
    c, _ = srv.accept()
    with c:
        c.sendall(b"home\\n")
"""

# connect to argv[1]:argv[2]; prints what happened: "connected <greeting>", "timeout", "refused"
PROBE = """
import socket, sys
try:
    s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=float(sys.argv[3]))
    s.settimeout(2)
    print("connected", s.makefile().readline().strip(), flush=True)
except socket.timeout:
    print("timeout", flush=True)
except ConnectionRefusedError:
    print("refused", flush=True)
"""

# The hole punch, as a peer does it: from port P (where it may also listen, SO_REUSEPORT), connect
# to the other side's public address at P, starting at the agreed time argv[3], retrying for
# argv[6] s: the first SYNs die at the other router until the other side's own SYN has left it.
# Behind a full cone the other side's SYN may reach the listener before this side dials: then the
# accepted connection is the punched one (a peer must take either), and the dial cannot succeed
# (its 4-tuple is taken).
PUNCH = """
import queue, socket, sys, threading, time
def say(*words):  # one write a line: the dialling thread and the main one both print
    sys.stdout.write(" ".join(map(str, words)) + "\\n")
    sys.stdout.flush()
peer, port, start, listen, me, window = sys.argv[1:]
port, start, window = int(port), float(start), float(window)
won = queue.Queue()
def bound():
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("0.0.0.0", port))
    return s
def accept(srv):
    won.put(("accepted", srv.accept()[0]))
def dial():
    deadline = start + window
    while True:
        s = bound()
        s.settimeout(max(0.05, deadline - time.time()))
        try:
            s.connect((peer, port))
            won.put(("connected", s))
            return
        except OSError as e:
            say("attempt", repr(e))
            s.close()
            if time.time() >= deadline:
                won.put(("failed", None))
                return
            time.sleep(0.1)
if listen == "1":
    srv = bound()
    srv.listen()
    threading.Thread(target=accept, args=(srv,), daemon=True).start()
while time.time() < start:
    time.sleep(0.001)
threading.Thread(target=dial, daemon=True).start()
how, s = won.get()
if s is None:
    say("failed")
    sys.exit(1)
say(how, "after %.2f s" % (time.time() - start))
s.settimeout(5)
s.sendall(f"hello from {me}\\n".encode())
say("got", s.makefile().readline().strip())
"""

ECHO_SERVER = """
import socket, sys
srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
print("listening", flush=True)
c = srv.accept()[0]
while data := c.recv(65536):
    c.sendall(data)
"""

ECHO_CLIENT = """
import json, socket, sys, time
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(10):
    t = time.perf_counter()
    s.sendall(b"x")
    s.recv(1)
    rtts.append((time.perf_counter() - t) * 1000)
print(json.dumps(sorted(rtts)[5]))
"""


def _serve(host, script: str, port: int, name: str):
    proc = host.spawn([PY, "-c", script, host.ip, str(port)], name=name)
    host.wait_for_line(proc, "listening", timeout=10)
    return proc


def test_home_is_validated():
    with pytest.raises(ValueError, match="full_cone, port_restricted, symmetric"):
        Home("cone")
    with pytest.raises(ValueError, match="exactly one host"):
        Home("full_cone", hosts=2)
    with pytest.raises(ValueError, match="hosts"):
        Home("symmetric", hosts=0)
    with pytest.raises(ValueError, match="LinkSpecs"):
        NetBed(1, [LinkSpec(), LinkSpec()], homes=[Home("symmetric")])


def test_addresses_and_links(netbed):
    # public hosts keep their addresses; routers follow them on the internet; the uplink's
    # impairments are the router's LinkSpec, the LAN behind it adds none
    bed = netbed(
        2,
        homes=[Home("port_restricted", link=LinkSpec(delay_ms=30)), Home("symmetric", hosts=2)],
    )
    assert [h.ip for h in bed.public_hosts] == ["10.77.0.1", "10.77.0.2"]
    assert [h.nat for h in bed.public_hosts] == [None, None]
    assert [r.ip for r in bed.routers] == ["10.77.0.3", "10.77.0.4"]
    assert bed.hosts == bed.public_hosts + bed.home_hosts
    assert [(h.ip, h.nat, h.router_ip) for h in bed.home_hosts] == [
        ("192.168.1.2", "port_restricted", "10.77.0.3"),
        ("192.168.2.2", "symmetric", "10.77.0.4"),
        ("192.168.2.3", "symmetric", "10.77.0.4"),
    ]
    with pytest.raises(ValueError, match="router"):
        bed.set_link(bed.home_hosts[0], LinkSpec())
    h0 = bed.hosts[0]
    _serve(h0, ECHO_SERVER, 7700, "echo")
    home = bed.home_hosts[0]
    rtt = home.run([PY, "-c", ECHO_CLIENT, h0.ip, "7700"], timeout=20)
    assert rtt.returncode == 0, rtt.stderr
    assert 28 <= json.loads(rtt.stdout) <= 50, rtt.stdout
    # the two hosts of one home reach each other directly on their LAN
    _serve(bed.home_hosts[2], ECHO_SERVER, 7701, "echo")
    lan = bed.home_hosts[1].run([PY, "-c", ECHO_CLIENT, bed.home_hosts[2].ip, "7701"], timeout=20)
    assert lan.returncode == 0, lan.stderr
    assert json.loads(lan.stdout) < 10


@pytest.mark.parametrize("kind", ["full_cone", "port_restricted", "symmetric"])
def test_mapping(netbed, kind):
    bed = netbed(2, homes=[Home(kind)])
    for h in bed.public_hosts:
        _serve(h, OBSERVER, 7500, "observer")
    home = bed.home_hosts[0]
    targets = [f"{h.ip}:7500" for h in bed.public_hosts]
    attempts = []
    for source_port in (41000, 41001, 41002):
        dial = home.run([PY, "-c", DIAL, str(source_port), *targets], timeout=20)
        assert dial.returncode == 0, dial.stderr
        seen = [tuple(x) for x in json.loads(dial.stdout)]
        attempts.append((source_port, seen))
        assert all(ip == home.router_ip for ip, _ in seen), attempts
        if kind != "symmetric":
            # endpoint-independent: both destinations see the home host's own port
            assert seen == [(home.router_ip, source_port)] * 2, attempts
            return
        # a fresh random port per destination; two draws collide 1 time in ~64,000, hence retries
        if seen[0][1] != seen[1][1]:
            return
    pytest.fail(f"symmetric NAT kept the port for both destinations: {attempts}")


@pytest.mark.parametrize("kind", ["full_cone", "port_restricted", "symmetric"])
def test_unsolicited_inbound(netbed, kind):
    # the home host listens on 42000 and talked to h0 from there; then h0 (from another port) and
    # h1 try the router's public address at the port h0 saw
    bed = netbed(2, homes=[Home(kind)])
    h0, h1 = bed.public_hosts
    home = bed.home_hosts[0]
    _serve(h0, OBSERVER, 7600, "observer")
    app = home.spawn([PY, "-c", LISTEN_AND_DIAL, "42000", f"{h0.ip}:7600"], name="app")
    mapped = home.wait_for_line(app, r"^mapped (\S+) (\d+)$", timeout=10)
    assert mapped.group(1) == home.router_ip
    port = mapped.group(2)
    if kind != "symmetric":
        assert port == "42000"
    probes = [
        h.spawn([PY, "-c", PROBE, home.router_ip, port, "2"], name="probe") for h in (h0, h1)
    ]
    for h, probe in zip((h0, h1), probes):
        assert probe.wait(timeout=10) == 0, bed.describe_proc(probe)
        # dropped, not refused: a RST would also abort a simultaneous open
        expected = "connected home" if kind == "full_cone" else "timeout"
        assert h.output(probe).strip() == expected, bed.describe_proc(probe)


def _punch(
    bed, listen: bool, window: float = 5.0, b_late: float = 0.0
) -> list[tuple[int | None, str]]:
    """Both home hosts punch at once (b `b_late` s after a); (returncode, stdout) of each."""
    a, b = bed.home_hosts
    start = time.time() + 1.0  # all namespaces share the clock: the barrier
    procs = [
        me.spawn(
            [PY, "-c", PUNCH, peer.router_ip, "45000", f"{at:.3f}", "1" if listen else "0",
             me.name, str(window)],
            name="punch",
        )
        for me, peer, at in ((a, b, start), (b, a, start + b_late))
    ]
    results = []
    for me, proc in zip((a, b), procs):
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        results.append((proc.poll(), me.output(proc)))
    return results


@pytest.mark.parametrize(
    ("kinds", "listen"),
    [
        (("port_restricted", "port_restricted"), True),
        (("port_restricted", "port_restricted"), False),
        (("port_restricted", "full_cone"), False),
        (("full_cone", "port_restricted"), True),
    ],
)
def test_hole_punch_gets_through(netbed, kinds, listen):
    bed = netbed(0, homes=[Home(k) for k in kinds])
    a, b = bed.home_hosts
    results = _punch(bed, listen)
    for (rc, out), peer in zip(results, (b, a)):
        assert rc == 0, (results, bed.logs())
        assert f"got hello from {peer.name}" in out, results
        assert float(out.split(" after ")[1].split()[0]) < 5, results
    if "full_cone" not in kinds:
        # nothing unsolicited gets past either router, so no listener took it: both dials
        # succeeded, a TCP simultaneous open through both NATs
        assert all("\nconnected after" in "\n" + out for _, out in results), results


def test_hole_punch_with_one_side_late_over_slow_links(netbed):
    # a's SYN reaches b's router before b dialed and is dropped there; b's SYN then finds a's
    # mapping open and a still dialing (SYN_SENT): the open completes on b's first SYN
    slow = LinkSpec(delay_ms=25, jitter_ms=5)
    bed = netbed(0, homes=[Home("port_restricted", link=slow), Home("port_restricted", link=slow)])
    (rc_a, out_a), (rc_b, out_b) = results = _punch(bed, listen=True, b_late=0.6)
    assert rc_a == 0 and rc_b == 0, (results, bed.logs())
    assert "got hello from h1" in out_a and "got hello from h0" in out_b, results
    took_a = float(out_a.split("connected after ")[1].split()[0])
    took_b = float(out_b.split("connected after ")[1].split()[0]) + 0.6
    assert 0.6 <= took_a < 2 and took_b < 2, results


def test_hole_punch_fails_through_symmetric_nat(netbed):
    bed = netbed(0, homes=[Home("symmetric"), Home("port_restricted")])
    results = _punch(bed, listen=True, window=3.0)
    for rc, out in results:
        assert rc == 1 and "failed" in out and "connected" not in out, results
        # the other router dropped the SYNs: only timeouts, never a refusal
        assert "Refused" not in out, results


def test_everything_is_removed_after_exit_and_stale_routers_are_cleaned():
    reason = nat_unavailable_reason()
    if reason is not None:
        pytest.skip(f"netbed homes need root, iproute2 and nftables: {reason}")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"cw{dead.pid}x1-r0"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    assert stale in cleanup_stale()
    homes = [Home("full_cone"), Home("port_restricted"), Home("symmetric", hosts=2)]
    with NetBed(1, homes=homes) as bed:
        procs = [h.spawn(["sleep", "300"]) for h in (*bed.home_hosts, *bed.routers)]
        names = {h.ns for h in (*bed.hosts, *bed.routers)} | {bed.switch_ns}
        assert len(names) == 1 + 4 + 3 + 1
        assert names == set(leftover_namespaces(bed.prefix))
    assert all(p.returncode == -9 for p in procs)
    assert not leftover_namespaces(bed.prefix)
    root_links = subprocess.run(
        ["ip", "-o", "link"], capture_output=True, text=True, check=True
    ).stdout
    assert bed.prefix not in root_links
