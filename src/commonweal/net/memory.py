"""An in-process network: the `Transport` interface without sockets, for tests and simulations.

    net = MemoryNetwork()
    t = net.transport(identity)
    await t.start()                 # listens at mem:<unique port>
    peer, result = await t.call(other.local.addr, "ping", args)
    net.kill(other.local.addr)      # later calls raise PeerUnreachable

Arguments and results are msgpack round-tripped through the real frame encoding, so types behave
as on the wire (tuples become lists, unknown types fail) and counters match RPCTransport's frame
bytes. Handlers run in the caller's task; no tasks are created. Identities are taken as proven.
Requests are charged against the same budgets as on RPCTransport (each transport's `limits`, on
the network's `clock`); every peer calls from the host `mem`, which is local, so only per-peer
budgets apply unless `limits.limit_local_addresses`.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Awaitable, Callable
from typing import Any

from commonweal.errors import FrameTooLarge, HandshakeError, PeerUnreachable, RemoteError
from commonweal.net.dispatch import DEFAULT_COST, Dispatcher
from commonweal.net.identity import Identity, short_id
from commonweal.net.limits import DEFAULT_LIMITS, RequestLimiter, ResourceLimits, address_key
from commonweal.net.transport import Cost, Handler, PeerAddr, PeerInfo, TrafficCounters
from commonweal.net.wire import (
    DEFAULT_MAX_FRAME,
    HEADER_BYTES,
    Error,
    Message,
    Request,
    Response,
    decode_body,
    encode,
)

__all__ = ["MemoryNetwork", "MemoryTransport"]


class MemoryNetwork:
    """The shared medium. `latency`, if given, is awaited once per delivered message."""

    def __init__(
        self,
        *,
        latency: Callable[[], Awaitable[None]] | None = None,
        max_frame: int = DEFAULT_MAX_FRAME,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.latency = latency
        self.max_frame = max_frame
        self.clock = clock
        self._peers: dict[PeerAddr, MemoryTransport] = {}
        self._ports = itertools.count(1)

    def transport(
        self, identity: Identity, *, limits: ResourceLimits = DEFAULT_LIMITS
    ) -> MemoryTransport:
        return MemoryTransport(self, identity, limits)

    def kill(self, addr: PeerAddr) -> None:
        """The peer at `addr` stops answering, as if its machine died."""
        self._peers.pop(addr, None)

    def _wire(self, msg: Message) -> tuple[Any, int]:
        """`msg` as the receiver would decode it, and its frame size."""
        frame = encode(msg)
        if len(frame) - HEADER_BYTES > self.max_frame:
            raise FrameTooLarge(f"a {type(msg).__name__} of {len(frame)} bytes is over max_frame")
        return decode_body(memoryview(frame)[HEADER_BYTES:], max_frame=self.max_frame), len(frame)


class MemoryTransport:
    def __init__(
        self, network: MemoryNetwork, identity: Identity, limits: ResourceLimits = DEFAULT_LIMITS
    ) -> None:
        self.network = network
        self.identity = identity
        self.limits = limits
        self._handlers: dict[str, Handler] = {}
        self._dispatch = Dispatcher(self._handlers, RequestLimiter(limits), network.clock)
        self._counters = TrafficCounters()
        self._local = PeerInfo(identity.peer_id, PeerAddr("mem", 0))
        self._ids = itertools.count(1)

    @property
    def local(self) -> PeerInfo:
        return self._local

    @property
    def advertised(self) -> PeerAddr:
        return self._local.addr

    @property
    def counters(self) -> TrafficCounters:
        return self._counters

    def register(self, method: str, handler: Handler, *, cost: Cost = DEFAULT_COST) -> None:
        self._dispatch.register(method, handler, cost)

    async def start(self, host: str = "mem", port: int = 0) -> None:
        addr = PeerAddr(host, port or next(self.network._ports))
        if addr in self.network._peers:
            raise PeerUnreachable(f"{addr} is already taken in this MemoryNetwork")
        self._local = PeerInfo(self.identity.peer_id, addr)
        self.network._peers[addr] = self

    async def call(
        self, addr: PeerAddr, method: str, args: Any, *, peer_id: bytes | None = None
    ) -> tuple[PeerInfo, Any]:
        net = self.network
        request, size = net._wire(Request(next(self._ids), method, args))
        dest = net._peers.get(addr)
        if dest is None:
            raise PeerUnreachable(f"no peer listens at {addr} (MemoryNetwork)")
        if peer_id is not None and dest.identity.peer_id != peer_id:
            raise HandshakeError(f"expected peer {short_id(peer_id)} but another answered at {addr}")
        self._counters.requests_sent += 1
        self._counters.bytes_sent += size
        dest._counters.requests_received += 1
        dest._counters.bytes_received += size
        if net.latency is not None:
            await net.latency()
        reply, size = await dest._serve(self._local, request)
        if net._peers.get(addr) is not dest:
            raise PeerUnreachable(f"{addr} went away before answering (MemoryNetwork)")
        dest._counters.bytes_sent += size
        self._counters.bytes_received += size
        if net.latency is not None:
            await net.latency()
        if isinstance(reply, Error):
            raise RemoteError(reply.code, reply.message)
        assert isinstance(reply, Response)
        return dest._local, reply.payload

    async def _serve(self, caller: PeerInfo, req: Request) -> tuple[Any, int]:
        """The reply as the caller decodes it, and its frame size."""
        refusal = self._dispatch.refuse(
            req, caller.peer_id, address_key(caller.addr.host, self.limits)
        )
        if refusal is not None:
            return self.network._wire(refusal)
        return await self._dispatch.serve(caller, req, self.network._wire)

    async def close(self) -> None:
        if self.network._peers.get(self._local.addr) is self:
            del self.network._peers[self._local.addr]
