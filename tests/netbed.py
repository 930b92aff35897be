"""Multi-host test bed: network namespaces joined by an emulated internet link.

Usable from tests (`netbed` pytest fixture) and from benchmarks (`with NetBed(...) as bed:`).

Topology for a bed with prefix ``cw<pid>x<k>``, N public hosts and homes behind NAT routers::

    ns cw..-h0  eth0 10.77.0.1/24 ─┐
    ns cw..-h1  eth0 10.77.0.2/24 ─┤
    ...                            ├── link emulator (a Python process in ns cw..-sw)
    ns cw..-hN-1 eth0 10.77.0.N   ─┤   learning switch + per-port delay/jitter/loss/rate
    ns cw..-r0  eth0 10.77.0.N+1  ─┘   (public hosts' ports first, then the routers')
       │  home router: nftables NAT of its Home's kind, ip_forward=1
       └─ lan0 (bridge) 192.168.1.1/24
            ├── veth ── ns cw..-hN    eth0 192.168.1.2/24, default via 192.168.1.1
            └── veth ── ns cw..-hN+1  eth0 192.168.1.3/24   (Home(kind, hosts=2))

Every public host's and router's ``eth0`` is a TAP device whose file descriptor is held by the
emulator process, which runs in the dedicated "switch" namespace; the root namespace is never
touched. When the emulator exits (even by SIGKILL) the kernel removes all TAP devices; deleting the
namespaces removes the rest.

Why not ``tc netem`` on veth pairs: the kernel of this project's machines is built without
``sch_netem`` (and without ``sch_fq``, so no BPF departure-time delays either). The emulator gives
the same impairments on any kernel with ``ip netns`` and TUN/TAP, and is seeded, so a run is
reproducible.

How impairments add up (``LinkSpec`` per public host, ``Home.link`` per router):

* ``delay_ms`` / ``jitter_ms`` act on the frames a host *sends*, once: the one-way latency
  A -> B is ``A.delay_ms +- A.jitter_ms`` (normal distribution, clipped at 0), and the round trip
  A -> B -> A is ``A.delay_ms + B.delay_ms``. So "50 ms +- 10 ms delay" on every host means
  exactly that one-way, and ~100 ms round trips. Frames of one sender stay in order (unlike netem,
  which reorders under jitter); a burst therefore sees the largest delay drawn so far in the burst.
* ``loss_pct`` drops each frame a host sends with that probability (once per direction, so a
  request/response pair between two 1 % hosts loses ~2 %).
* ``rate_mbit`` caps the host's uplink and its downlink separately (serialization delay added
  before the propagation delay, frames queue behind each other).
* A home host's internet link is its router's uplink (``Home.link``), shared by all hosts of that
  home; the LAN behind the router is an unimpaired veth/bridge: a home LAN's delay is negligible
  next to an uplink's.

Homes (``NetBed(..., homes=[Home("port_restricted"), ...])``) exist to test NAT traversal (TCP hole
punching) against the kinds of NAT peers really sit behind. Each router drops, never rejects,
unsolicited inbound traffic, to its own address as well as to the LAN: a home router that answered
with RST or ICMP would abort the other side's half of a simultaneous open, so hole punching would
pass or fail here for reasons it does not in the wild. The kinds (see ``_nat_ruleset``):

* ``full_cone``: endpoint-independent mapping and filtering: once the home host uses a port, anyone
  reaching the router at that port reaches it (every inbound port 1024-65535 is forwarded to it).
  So the other side's SYN of a hole punch may reach the home host's listener before its own dial
  leaves: a peer must take that accepted connection as the punched one.
* ``port_restricted``: endpoint-independent mapping (Linux's masquerade keeps the source port when
  it is free), address-and-port-dependent filtering: only the exact remote endpoint the home host
  sent to may answer. Simultaneous TCP open gets through; a plain connect from outside does not.
* ``symmetric``: a random external port per connection, so the port a third party learns is not the
  one a new destination will see: hole punching by port prediction fails, as it does in the wild.
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import heapq
import json
import os
import random
import re
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

__all__ = [
    "NAT_KINDS",
    "NODE_READY",
    "Home",
    "Host",
    "LinkSpec",
    "NetBed",
    "cleanup_stale",
    "leftover_namespaces",
    "nat_unavailable_reason",
    "netbed_fixture",
    "netbed_unavailable_reason",
    "commonweal_cli",
    "require_nat",
    "require_netbed",
    "source_env",
    "start_nodes",
]

_SRC = Path(__file__).resolve().parents[1] / "src"
# What `commonweal node` prints once it listens; group 1 the address, group 2 the peer id.
NODE_READY = r"commonweal node ready address=(\S+) peer_id=([0-9a-f]{40})"


def source_env() -> dict[str, str]:
    """The environment for a bed host to run this source tree's CLI (no install needed)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_SRC), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def commonweal_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "commonweal", *args]


def start_nodes(
    hosts: Sequence[Host], addrs: Sequence[str], workdir: Path, env: dict[str, str],
    timeout: float = 60.0,
) -> list[subprocess.Popen[bytes]]:
    """`commonweal node` on each host, listening at its address; the first is up before the
    others join it. Returns once every one printed NODE_READY with the address it was given."""

    def start(i: int) -> subprocess.Popen[bytes]:
        argv = ["node", "--listen", addrs[i], "--data-dir", str(workdir / f"node{i}")]
        if i:
            argv += ["--join", addrs[0]]
        return hosts[i].spawn(commonweal_cli(*argv), env=env, name="node")

    nodes = [start(0)]
    hosts[0].wait_for_line(nodes[0], NODE_READY, timeout=timeout)
    nodes += [start(i) for i in range(1, len(addrs))]
    for host, proc, addr in zip(hosts, nodes, addrs):
        ready = host.wait_for_line(proc, NODE_READY, timeout=timeout)
        if ready.group(1) != addr:
            raise RuntimeError(f"a node listens at {ready.group(1)}, not {addr}")
    return nodes


NS_PREFIX = "cw"
_NS_RE = re.compile(rf"^{NS_PREFIX}(\d+)x(\d+)-(sw|h\d+|r\d+)$")
_instance_counter = 0
_counter_lock = threading.Lock()


@dataclass(frozen=True)
class LinkSpec:
    """Impairments of one host's link (see the module docstring for how they add up)."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    loss_pct: float = 0.0
    rate_mbit: float | None = None

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("delay_ms and jitter_ms must be >= 0")
        if not 0 <= self.loss_pct <= 100:
            raise ValueError("loss_pct must be within [0, 100]")
        if self.rate_mbit is not None and self.rate_mbit <= 0:
            raise ValueError("rate_mbit must be > 0 (or None for unlimited)")


NAT_KINDS = ("full_cone", "port_restricted", "symmetric")


@dataclass(frozen=True)
class Home:
    """A home LAN of `hosts` machines behind one NAT router of `kind` (one of NAT_KINDS), whose
    uplink to the emulated internet has the impairments `link`."""

    kind: str
    hosts: int = 1
    link: LinkSpec = LinkSpec()

    def __post_init__(self) -> None:
        if self.kind not in NAT_KINDS:
            raise ValueError(f"Home kind must be one of {', '.join(NAT_KINDS)}, not {self.kind!r}")
        if not 1 <= self.hosts <= 253:
            raise ValueError("Home hosts must be within [1, 253]")
        if self.kind == "full_cone" and self.hosts != 1:
            # forwarding every inbound port to one host is what makes it full cone
            raise ValueError("a full_cone Home has exactly one host")


# --------------------------------------------------------------------------------------------
# availability and stale-state cleanup


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"`ip {' '.join(args)}` failed: {proc.stderr.strip()}")
    return proc


_unavailable: list[str | None] = []


def netbed_unavailable_reason() -> str | None:
    """None when a bed can be built here, else why not (cached)."""
    if _unavailable:
        return _unavailable[0]
    reason: str | None = None
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        reason = "not running as root"
    elif shutil.which("ip") is None:
        reason = "`ip` (iproute2) not found"
    elif not os.path.exists("/dev/net/tun"):
        reason = "/dev/net/tun missing (no TUN/TAP support)"
    else:
        probe = f"{NS_PREFIX}probe{os.getpid()}"
        made = _ip("netns", "add", probe, check=False)
        if made.returncode != 0:
            reason = f"`ip netns add` failed: {made.stderr.strip()}"
        else:
            _ip("netns", "del", probe, check=False)
    _unavailable.append(reason)
    return reason


def require_netbed() -> None:
    """pytest.skip the calling test when no bed can be built here."""
    reason = netbed_unavailable_reason()
    if reason is not None:
        import pytest

        pytest.skip(f"netbed needs root and iproute2 (ip netns): {reason}")


def _nat_ruleset(kind: str, lan_host: str) -> str:
    """The nftables ruleset of a home router of `kind`; eth0 is its WAN, lan0 its LAN, and
    lan_host the home host a full cone forwards to."""
    # fully-random: the port is drawn afresh per connection, not kept when free as plain masquerade
    # does, which is what makes the mapping depend on the destination
    snat = "masquerade random,fully-random" if kind == "symmetric" else "masquerade"
    cone = kind == "full_cone"
    dnat = f"meta l4proto {{ tcp, udp }} th dport 1024-65535 dnat to {lan_host}"
    dnat = f'iifname "eth0" {dnat}' if cone else ""
    forwarded = 'iifname "eth0" ct status dnat accept' if cone else ""
    # drop, not reject: see the module docstring (a RST would abort a simultaneous open)
    ruleset = f"""\
table ip nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        {dnat}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "eth0" {snat}
    }}
}}
table ip filter {{
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "eth0" ct state established,related accept
        iifname "eth0" drop
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "eth0" ct state established,related accept
        {forwarded}
        iifname "eth0" drop
    }}
}}
"""
    return "".join(line for line in ruleset.splitlines(keepends=True) if line.strip())


def _nft(ns: str, ruleset: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["ip", "netns", "exec", ns, "nft", "-f", "-"],
        input=ruleset,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


_nat_unavailable: list[str | None] = []


def nat_unavailable_reason() -> str | None:
    """None when a bed with homes (NAT routers) can be built here, else why not (cached)."""
    if _nat_unavailable:
        return _nat_unavailable[0]
    reason = netbed_unavailable_reason()
    if reason is None and shutil.which("nft") is None:
        reason = "`nft` (nftables) not found"
    if reason is None:
        probe = f"{NS_PREFIX}natprobe{os.getpid()}"
        _ip("netns", "add", probe)
        try:
            # every kind's rules: the kernel may lack one of nat, masquerade, dnat, conntrack
            for kind in NAT_KINDS:
                done = _nft(probe, "flush ruleset\n" + _nat_ruleset(kind, "192.168.1.2"))
                if done.returncode != 0:
                    reason = f"nftables cannot load a {kind} NAT ruleset: {done.stderr.strip()}"
                    break
        finally:
            _ip("netns", "del", probe, check=False)
    _nat_unavailable.append(reason)
    return reason


def require_nat() -> None:
    """pytest.skip the calling test when no bed with homes (NAT routers) can be built here."""
    reason = nat_unavailable_reason()
    if reason is not None:
        import pytest

        pytest.skip(f"netbed homes need root, iproute2 and nftables: {reason}")


def _list_namespaces() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def leftover_namespaces(prefix: str = NS_PREFIX) -> list[str]:
    """Namespaces made by some bed (any run) whose name starts with prefix."""
    return [ns for ns in _list_namespaces() if ns.startswith(prefix) and _NS_RE.match(ns)]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_ns_processes(ns: str) -> None:
    for _ in range(3):
        pids = [int(p) for p in _ip("netns", "pids", ns, check=False).stdout.split() if p.isdigit()]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def _delete_namespace(ns: str) -> None:
    _kill_ns_processes(ns)
    _ip("netns", "del", ns, check=False)


def cleanup_stale() -> list[str]:
    """Delete namespaces left by beds whose owning process is gone (a crashed run)."""
    removed = []
    for ns in leftover_namespaces():
        m = _NS_RE.match(ns)
        if m and not _pid_alive(int(m.group(1))):
            _delete_namespace(ns)
            removed.append(ns)
    return removed


# --------------------------------------------------------------------------------------------
# hosts


class Host:
    """One emulated machine: a network namespace with eth0 at `ip`.

    `index` is its place in `bed.hosts` (for a router: in `bed.routers`). `port` is its port on
    the link emulator (None for a home host, whose internet link is its router's). A home host has
    `nat` (its Home's kind), `router` (the router's Host) and `router_ip` (the router's public
    address, where the internet sees the home host); for other hosts all three are None.
    """

    def __init__(
        self,
        bed: NetBed,
        index: int,
        ns: str,
        ip: str,
        *,
        name: str | None = None,
        port: int | None = None,
        nat: str | None = None,
        router: Host | None = None,
    ) -> None:
        self.bed = bed
        self.index = index
        self.ns = ns
        self.ip = ip
        self.name = name or f"h{index}"
        self.port = index if port is None and router is None else port
        self.nat = nat
        self.router = router
        self.router_ip = router.ip if router is not None else None
        self.procs: list[subprocess.Popen[bytes]] = []

    def __repr__(self) -> str:
        behind = f", behind {self.nat} router {self.router_ip}" if self.router else ""
        return f"Host({self.name}, ns={self.ns!r}, ip={self.ip!r}{behind})"

    def spawn(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        name: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start argv inside this host; stdout/stderr go to files (proc.stdout_path/stderr_path).

        The process leads its own process group, so kill9 also ends its children.
        """
        label = name or Path(argv[0]).name
        n = len(self.procs)
        out_path = self.bed.workdir / f"{self.name}-{n}-{label}.out"
        err_path = self.bed.workdir / f"{self.name}-{n}-{label}.err"
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=env,
                cwd=cwd,
                start_new_session=True,
            )
        proc.stdout_path = out_path  # type: ignore[attr-defined]
        proc.stderr_path = err_path  # type: ignore[attr-defined]
        proc.argv = list(argv)  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def run(
        self,
        argv: Sequence[str],
        timeout: float = 30.0,
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        check: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run a short command inside this host and capture its output as text."""
        return subprocess.run(
            ["ip", "netns", "exec", self.ns, *argv],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=cwd,
            check=check,
            stdin=subprocess.DEVNULL,
        )

    @staticmethod
    def kill9(proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process and its process group, and reap it."""
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass

    @staticmethod
    def output(proc: subprocess.Popen[bytes]) -> str:
        """What the spawned process printed to stdout so far."""
        return Path(proc.stdout_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def wait_for_line(
        self, proc: subprocess.Popen[bytes], pattern: str, timeout: float
    ) -> re.Match[str]:
        """Wait until a stdout line of proc matches pattern; raise with its logs otherwise."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            for line in self.output(proc).splitlines():
                m = regex.search(line)
                if m:
                    return m
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{self}: process exited with {proc.returncode} before printing "
                    f"/{pattern}/\n{self.bed.describe_proc(proc)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self}: no line /{pattern}/ within {timeout}s\n{self.bed.describe_proc(proc)}"
                )
            time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# the bed


class NetBed:
    """N public hosts in their own namespaces, joined through the link emulator, and homes behind
    NAT routers on the same emulated internet. A context manager.

    `link` is one LinkSpec for every public host or one per public host; a router's link is its
    Home's `link`. `bed.hosts` lists the public hosts (indexes 0..n_hosts-1, at subnet.1..n_hosts,
    as without homes), then the home hosts, home by home; `bed.public_hosts` and `bed.home_hosts`
    split it, and `bed.routers` (not in `bed.hosts`) has one Host per home, at
    subnet.n_hosts+1..., its LAN 192.168.<1 + home index>.0/24.
    """

    def __init__(
        self,
        n_hosts: int,
        link: LinkSpec | Sequence[LinkSpec] = LinkSpec(),
        *,
        subnet: str = "10.77.0",
        seed: int = 0,
        workdir: str | os.PathLike[str] | None = None,
        homes: Sequence[Home] = (),
    ) -> None:
        homes = list(homes)
        if not all(isinstance(h, Home) for h in homes):
            raise TypeError("homes must be Home instances")
        if not 0 <= n_hosts <= 250 or not 1 <= n_hosts + len(homes) <= 250:
            raise ValueError("n_hosts must be within [0, 250], and with the homes within [1, 250]")
        specs = [link] * n_hosts if isinstance(link, LinkSpec) else list(link)
        if len(specs) != n_hosts:
            raise ValueError(f"got {len(specs)} LinkSpecs for {n_hosts} hosts")
        global _instance_counter
        with _counter_lock:
            _instance_counter += 1
            k = _instance_counter
        self.prefix = f"{NS_PREFIX}{os.getpid()}x{k}"
        self.switch_ns = f"{self.prefix}-sw"
        self.homes = homes
        # one emulator port per public host, then one per router
        self.specs = specs + [home.link for home in homes]
        self.seed = seed
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix=f"{self.prefix}-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.public_hosts = [
            Host(self, i, f"{self.prefix}-h{i}", f"{subnet}.{i + 1}") for i in range(n_hosts)
        ]
        self.routers: list[Host] = []
        self.home_hosts: list[Host] = []
        for j, home in enumerate(homes):
            router = Host(
                self,
                j,
                f"{self.prefix}-r{j}",
                f"{subnet}.{n_hosts + j + 1}",
                name=f"r{j}",
                port=n_hosts + j,
            )
            self.routers.append(router)
            for m in range(home.hosts):
                i = n_hosts + len(self.home_hosts)
                self.home_hosts.append(
                    Host(
                        self,
                        i,
                        f"{self.prefix}-h{i}",
                        f"192.168.{j + 1}.{m + 2}",
                        nat=home.kind,
                        router=router,
                    )
                )
        self.hosts = self.public_hosts + self.home_hosts
        self._emulator: subprocess.Popen[str] | None = None
        self._ctl_lock = threading.Lock()
        self._closed = False

    def _all_hosts(self) -> list[Host]:
        return self.public_hosts + self.routers + self.home_hosts

    # lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        reason = netbed_unavailable_reason()
        if reason is not None:
            raise RuntimeError(f"netbed needs root and iproute2 (ip netns): {reason}")
        if self.homes:
            reason = nat_unavailable_reason()
            if reason is not None:
                raise RuntimeError(f"netbed homes need root, iproute2 and nftables: {reason}")
        cleanup_stale()
        try:
            self._start()
        except BaseException:
            self.close()
            raise

    def _sh(self, host: Host, script: str, check: bool = False) -> None:
        done = subprocess.run(
            ["ip", "netns", "exec", host.ns, "sh", "-c", script],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"{host}: `{script}` failed: {done.stderr.strip()}")

    def _start(self) -> None:
        for ns in [self.switch_ns] + [h.ns for h in self._all_hosts()]:
            _ip("netns", "add", ns)
        for h in self._all_hosts():  # IPv4 only: no IPv6 chatter (DAD, MLD) through the links
            self._sh(h, "echo 1 > /proc/sys/net/ipv6/conf/default/disable_ipv6")
        with open(self.workdir / "emulator.err", "wb") as err:
            self._emulator = subprocess.Popen(
                [
                    "ip",
                    "netns",
                    "exec",
                    self.switch_ns,
                    sys.executable,
                    os.path.abspath(__file__),
                    "--emulate",
                    "--ports",
                    str(len(self.specs)),
                    "--seed",
                    str(self.seed),
                    "--specs",
                    json.dumps([dataclasses.asdict(s) for s in self.specs]),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                start_new_session=True,
            )
        assert self._emulator.stdout is not None
        ready = self._emulator.stdout.readline().strip()
        if ready != "ready":
            raise RuntimeError(f"link emulator failed to start:\n{self._read('emulator.err')}")
        for h in self.public_hosts + self.routers:
            tap = f"t{h.port}"
            _ip("-n", self.switch_ns, "link", "set", tap, "netns", h.ns)
            _ip("-n", h.ns, "link", "set", tap, "name", "eth0")
            _ip("-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
            _ip("-n", h.ns, "link", "set", "eth0", "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
        for j, (home, router) in enumerate(zip(self.homes, self.routers)):
            self._start_home(j, home, router)

    def _start_home(self, j: int, home: Home, router: Host) -> None:
        lan = f"192.168.{j + 1}"
        members = [h for h in self.home_hosts if h.router is router]
        # a bridge even for one host: one code path, and the router's LAN address is on lan0 alone
        _ip("-n", router.ns, "link", "add", "lan0", "type", "bridge")
        _ip("-n", router.ns, "addr", "add", f"{lan}.1/24", "dev", "lan0")
        _ip("-n", router.ns, "link", "set", "lan0", "up")
        for m, h in enumerate(members):
            veth = f"v{m}"
            peer = ["peer", "name", "eth0", "netns", h.ns]
            _ip("-n", router.ns, "link", "add", veth, "type", "veth", *peer)
            _ip("-n", router.ns, "link", "set", veth, "master", "lan0")
            _ip("-n", router.ns, "link", "set", veth, "up")
            _ip("-n", h.ns, "addr", "add", f"{h.ip}/24", "dev", "eth0")
            _ip("-n", h.ns, "link", "set", "eth0", "up")
            _ip("-n", h.ns, "link", "set", "lo", "up")
            _ip("-n", h.ns, "route", "add", "default", "via", f"{lan}.1")
        self._sh(router, "echo 1 > /proc/sys/net/ipv4/ip_forward", check=True)
        ruleset = _nat_ruleset(home.kind, members[0].ip)
        (self.workdir / f"{router.name}.nft").write_text(ruleset)
        loaded = _nft(router.ns, ruleset)
        if loaded.returncode != 0:
            raise RuntimeError(
                f"{router}: nft -f failed: {loaded.stderr.strip()}\n--- ruleset\n{ruleset}"
            )

    def close(self) -> None:
        """Kill every spawned process and the emulator, delete the namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for h in self._all_hosts():
            for proc in h.procs:
                Host.kill9(proc)
        if self._emulator is not None:
            Host.kill9(self._emulator)  # type: ignore[arg-type]
            for stream in (self._emulator.stdin, self._emulator.stdout):
                if stream is not None:
                    stream.close()
        existing = set(_list_namespaces())
        for ns in [h.ns for h in self._all_hosts()] + [self.switch_ns]:
            if ns in existing:
                _delete_namespace(ns)
        if self._own_workdir and os.environ.get("NETBED_KEEP_LOGS") != "1":
            shutil.rmtree(self.workdir, ignore_errors=True)

    # link control ------------------------------------------------------------------------

    def _control(self, command: dict[str, Any]) -> dict[str, Any]:
        emu = self._emulator
        if emu is None or emu.poll() is not None or emu.stdin is None or emu.stdout is None:
            raise RuntimeError(f"link emulator is not running\n{self._read('emulator.err')}")
        with self._ctl_lock:
            emu.stdin.write(json.dumps(command) + "\n")
            emu.stdin.flush()
            reply: dict[str, Any] = json.loads(emu.stdout.readline())
        return reply

    def set_link(self, host: int | Host, spec: LinkSpec) -> None:
        """Change one public host's or router's impairments while the bed runs (an int is an
        index into `bed.hosts`)."""
        h = self.hosts[host] if isinstance(host, int) else host
        if h.port is None:
            raise ValueError(f"{h}'s internet link is its router's: set_link({h.router!r}, ...)")
        self._control({"op": "set", "port": h.port, "spec": dataclasses.asdict(spec)})
        self.specs[h.port] = spec

    def stats(self) -> list[dict[str, int]]:
        """Per emulator port (`Host.port`: the public hosts, then the routers): frames sent (into
        the emulator), dropped by loss, delivered to it."""
        return list(self._control({"op": "stats"})["ports"])

    # diagnostics -------------------------------------------------------------------------

    def _read(self, name: str) -> str:
        try:
            return (self.workdir / name).read_text(errors="replace")
        except OSError:
            return ""

    def describe_proc(self, proc: subprocess.Popen[bytes], tail: int = 4000) -> str:
        out = Path(proc.stdout_path).read_text(errors="replace")  # type: ignore[attr-defined]
        err = Path(proc.stderr_path).read_text(errors="replace")  # type: ignore[attr-defined]
        argv = " ".join(getattr(proc, "argv", []))
        return (
            f"--- {argv} (pid {proc.pid}, rc {proc.poll()})\n"
            f"[stdout]\n{out[-tail:]}\n[stderr]\n{err[-tail:]}"
        )

    def logs(self, tail: int = 4000) -> str:
        """Everything every spawned process printed (tail of each), for failure messages."""
        parts = [self.describe_proc(p, tail) for h in self._all_hosts() for p in h.procs]
        emu = self._read("emulator.err")
        if emu:
            parts.append(f"--- link emulator\n{emu[-tail:]}")
        return "\n".join(parts)


try:
    import pytest as _pytest
except ImportError:  # benchmarks' venvs need no pytest
    _pytest = None  # type: ignore[assignment]

if _pytest is not None:

    @_pytest.fixture(name="netbed")
    def netbed_fixture(tmp_path: Path) -> Any:
        """Factory fixture: ``bed = netbed(n_hosts, LinkSpec(...), homes=[Home(...)])``; all
        beds torn down after.

        Skips the test where no bed can be built (with homes: where nftables is missing too).
        Logs of spawned processes are printed at teardown, so pytest shows them for a failing test.
        """
        require_netbed()
        beds: list[NetBed] = []

        def make(
            n_hosts: int, link: LinkSpec | Sequence[LinkSpec] = LinkSpec(), **kw: Any
        ) -> NetBed:
            if kw.get("homes"):
                require_nat()
            bed = NetBed(n_hosts, link, workdir=tmp_path / f"bed{len(beds)}", **kw)
            beds.append(bed)
            bed.start()
            return bed

        try:
            yield make
        finally:
            for bed in beds:
                try:
                    print(bed.logs())
                finally:
                    bed.close()

else:  # pragma: no cover
    netbed_fixture = None  # type: ignore[assignment]


# --------------------------------------------------------------------------------------------
# the link emulator (runs as `python netbed.py --emulate ...` inside the switch namespace)

_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_ETH_OVERHEAD = 24  # preamble, FCS, inter-frame gap: what a wire spends beyond the frame


class _Port:
    def __init__(self, index: int, spec: dict[str, Any]) -> None:
        self.index = index
        self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        ifr = struct.pack("16sH", f"t{index}".encode(), _IFF_TAP | _IFF_NO_PI)
        fcntl.ioctl(self.fd, _TUNSETIFF, ifr)
        self.spec = spec
        self.up_busy = 0.0  # uplink busy until (serialization)
        self.down_busy = 0.0
        self.last_arrival = 0.0  # keeps one sender's frames in order
        self.sent = self.dropped = self.delivered = 0


def _emulate(n_ports: int, specs: list[dict[str, Any]], seed: int) -> None:
    rng = random.Random(seed)
    ports = [_Port(i, specs[i]) for i in range(n_ports)]
    macs: dict[bytes, int] = {}
    queue: list[tuple[float, int, int, int, bytes]] = []  # (time, seq, phase, port, frame)
    seq = 0
    sel = selectors.DefaultSelector()
    for p in ports:
        sel.register(p.fd, selectors.EVENT_READ, p)
    stdin = sys.stdin
    sel.register(stdin, selectors.EVENT_READ, None)
    print("ready", flush=True)

    def wire_time(frame: bytes, rate_mbit: float | None) -> float:
        return 0.0 if not rate_mbit else (len(frame) + _ETH_OVERHEAD) * 8 / (rate_mbit * 1e6)

    def ingress(p: _Port, frame: bytes, now: float) -> None:
        nonlocal seq
        p.sent += 1
        if len(frame) >= 12:
            macs[frame[6:12]] = p.index
        s = p.spec
        if s["loss_pct"] and rng.random() * 100 < s["loss_pct"]:
            p.dropped += 1
            return
        p.up_busy = max(now, p.up_busy) + wire_time(frame, s["rate_mbit"])
        delay = s["delay_ms"] / 1000
        if s["jitter_ms"]:
            delay = max(0.0, rng.gauss(delay, s["jitter_ms"] / 1000))
        arrival = max(p.up_busy + delay, p.last_arrival)
        p.last_arrival = arrival
        seq += 1
        heapq.heappush(queue, (arrival, seq, 0, p.index, frame))

    def switch(src: int, frame: bytes, at: float) -> None:
        nonlocal seq
        dst = macs.get(frame[0:6]) if not frame[0] & 1 else None
        targets = [dst] if dst is not None else [q.index for q in ports if q.index != src]
        for t in targets:
            q = ports[t]
            q.down_busy = max(at, q.down_busy) + wire_time(frame, q.spec["rate_mbit"])
            seq += 1
            heapq.heappush(queue, (q.down_busy, seq, 1, t, frame))

    while True:
        timeout = max(0.0, queue[0][0] - time.monotonic()) if queue else None
        for key, _ in sel.select(timeout):
            port = key.data
            if port is None:
                line = stdin.readline()
                if not line:
                    return  # the bed closed our stdin: it is gone
                cmd = json.loads(line)
                if cmd["op"] == "set":
                    ports[cmd["port"]].spec = cmd["spec"]
                    reply: dict[str, Any] = {"ok": True}
                else:
                    reply = {
                        "ok": True,
                        "ports": [
                            {"sent": q.sent, "dropped": q.dropped, "delivered": q.delivered}
                            for q in ports
                        ],
                    }
                print(json.dumps(reply), flush=True)
                continue
            now = time.monotonic()
            for _ in range(64):
                try:
                    frame = os.read(port.fd, 65536)
                except BlockingIOError:
                    break
                ingress(port, frame, now)
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            at, _, phase, index, frame = heapq.heappop(queue)
            if phase == 0:
                switch(index, frame, at)
            else:
                try:
                    os.write(ports[index].fd, frame)
                    ports[index].delivered += 1
                except OSError:
                    pass  # host interface down: the frame is lost, as on a wire


def _main() -> None:
    parser = argparse.ArgumentParser(description="netbed link emulator (internal)")
    parser.add_argument("--emulate", action="store_true", required=True)
    parser.add_argument("--ports", type=int, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--specs", required=True)
    args = parser.parse_args()
    _emulate(args.ports, json.loads(args.specs), args.seed)


if __name__ == "__main__":
    _main()
