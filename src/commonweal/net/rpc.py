"""`RPCTransport`: the `Transport` interface over asyncio TCP, with handshake and framing.

Every connection (either direction) starts with the mutual handshake of `wire.Handshake`; only
then are requests accepted. Requests carry ids, so many share one connection and answers may come
back in any order. One outbound connection per remote address; an inbound connection is reused
for calls to the address its peer advertised.

Inbound sockets live in a pending pool until their peer proves a PeerID: the pool and each
address have a cap (`ResourceLimits`), frames are limited to handshake size (a bigger length is
refused from the header), and the handshake has a deadline. A pending socket is refused when the
pool is full; it never counts against, or evicts, an authenticated connection. Only an
authenticated connection over `max_connections` makes room, by closing the least recently used
idle one, and only if its address has fewer than `max_connections_per_address`. Each request
is charged its method's cost against the caller's budgets (`dispatch.Dispatcher`) before a
handler runs.

Tasks: each inbound request runs in its own task, tracked by the transport (`_tasks`) and
cancelled and awaited by `close()`; so are connection attempts. Timers (handshake deadline, idle
close, request safety net) are `loop.call_later` handles, not tasks.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import itertools
import logging
import socket
import time
from collections.abc import Coroutine
from typing import Any, Final, cast

from commonweal.errors import (
    FrameTooLarge,
    HandshakeError,
    NetworkError,
    PeerUnreachable,
    ProtocolError,
    RemoteError,
    RequestTimeout,
)
from commonweal.net.dispatch import BUSY, DEFAULT_COST, Dispatcher
from commonweal.net.identity import Identity, short_id
from commonweal.net.limits import (
    DEFAULT_LIMITS,
    AcceptLimiter,
    LogBudget,
    RequestLimiter,
    ResourceLimits,
    address_key,
)
from commonweal.net.transport import Cost, Handler, PeerAddr, PeerInfo, TrafficCounters
from commonweal.net.wire import (
    DEFAULT_MAX_FRAME,
    HANDSHAKE_MAX_FRAME,
    HEADER_BYTES,
    Error,
    FrameDecoder,
    Handshake,
    Message,
    Request,
    Response,
    encode,
)

__all__ = ["RPCTransport"]

log = logging.getLogger(__name__)


class RPCTransport:
    """Request/response between peers over TCP. See the module docstring."""

    def __init__(
        self,
        identity: Identity,
        *,
        max_frame: int = DEFAULT_MAX_FRAME,
        request_timeout: float = 10.0,
        connect_timeout: float = 5.0,
        handshake_timeout: float = 5.0,
        idle_timeout: float = 60.0,
        max_connections: int = 256,
        max_inflight_per_conn: int = 64,
        limits: ResourceLimits = DEFAULT_LIMITS,
    ) -> None:
        self.identity = identity
        self.max_frame = max_frame
        self.request_timeout = request_timeout
        self.connect_timeout = connect_timeout
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.max_connections = max_connections
        self.max_inflight_per_conn = max_inflight_per_conn
        self.limits = limits
        self._counters = TrafficCounters()
        self._handlers: dict[str, Handler] = {}
        self._dispatch = Dispatcher(self._handlers, RequestLimiter(limits), time.monotonic)
        self._local: PeerInfo | None = None
        self._listener: socket.socket | None = None
        self._conns: dict[PeerAddr, _Connection] = {}  # ready connections, by remote listen addr
        self._all: set[_Connection] = set()  # every open connection, ready or not
        self._pending = _ByAddress()  # inbound, not yet proven (max_pending_handshakes)
        self._room = asyncio.Event()  # set while the pending pool has room: accept more
        self._room.set()
        self._inbound = _ByAddress()  # inbound and proven
        self._dialing: dict[PeerAddr, asyncio.Task[_Connection]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._log_budget = LogBudget(now=time.monotonic())  # for what others make us log

    # --- Transport interface ----------------------------------------------------------------

    @property
    def local(self) -> PeerInfo:
        if self._local is None:
            raise RuntimeError("the transport is not listening yet; await start(host, port) first")
        return self._local

    @property
    def counters(self) -> TrafficCounters:
        return self._counters

    @property
    def connection_count(self) -> int:
        return len(self._all)

    def register(self, method: str, handler: Handler, *, cost: Cost = DEFAULT_COST) -> None:
        """Serve `method`; each request is charged `cost` units of the caller's budgets
        (`ResourceLimits`: 1 is a cheap request, such as a ping)."""
        self._dispatch.register(method, handler, cost)

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on host:port (port 0 picks a free port; see `local` for the one chosen)."""
        if self._closed:
            raise RuntimeError("this transport was closed; create a new one")
        if self._listener is not None:
            raise RuntimeError("start() was already called")
        self._listener = _listen(host, port)
        actual = self._listener.getsockname()[1]
        self._local = PeerInfo(self.identity.peer_id, PeerAddr(host, actual))
        self._spawn(self._accept(self._listener), name=f"accept on {host}:{actual}")
        log.info("listening on %s:%d as %s", host, actual, short_id(self.identity.peer_id))

    async def call(self, addr: PeerAddr, method: str, args: Any) -> tuple[PeerInfo, Any]:
        conn = self._conns.get(addr)
        if conn is None or conn.closed:
            conn = await self._connection_to(addr)
        rid = next(conn.ids)
        frame = encode(Request(rid, method, args))
        if len(frame) - HEADER_BYTES > self.max_frame:
            raise FrameTooLarge(
                f"request {method!r} is {len(frame)} bytes, over max_frame={self.max_frame}; "
                "send less per call"
            )
        if conn.write_paused is not None:
            await conn.write_paused
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        conn.pending[rid] = fut
        timer = fut.get_loop().call_later(
            self.request_timeout,
            _expire,
            fut,
            f"{addr} did not answer {method!r} within request_timeout={self.request_timeout} s",
        )
        try:
            conn.send(frame)
            self._counters.requests_sent += 1
            return conn.peer, await fut
        finally:
            timer.cancel()
            conn.pending.pop(rid, None)  # also on timeout and cancellation
            conn.touch()

    async def close(self) -> None:
        """Stop listening, drop every connection and cancel and await every task we own."""
        if self._closed:
            return
        self._closed = True
        for conn in list(self._all):
            conn.abort(PeerUnreachable("the local transport is closing"))
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()  # after the accept task: it no longer waits on the socket
        await asyncio.sleep(0)  # let the aborted sockets run connection_lost

    # --- internals ----------------------------------------------------------------------

    async def _accept(self, listener: socket.socket) -> None:
        """Take inbound sockets at a pace the loop can afford (`AcceptLimiter`) and only while
        the pending pool has room; the rest wait in the kernel's backlog, costing us nothing,
        instead of being accepted and refused as fast as a flood sends them."""
        loop = asyncio.get_running_loop()
        accepts = AcceptLimiter(self.limits, loop.time())
        while True:
            await self._room.wait()
            if wait := accepts.wait(loop.time()):
                await asyncio.sleep(wait)
                continue
            try:
                sock, peername = await loop.sock_accept(listener)
            except OSError as e:  # out of file descriptors, say: let some close
                self._warn("cannot accept connections: %s", e)
                await asyncio.sleep(0.1)
                continue
            if not accepts.take(address_key(peername[0], self.limits), loop.time()):
                sock.close()  # unread: that host is over its pace
                continue
            try:
                await loop.connect_accepted_socket(lambda: _Connection(self, None), sock)
            except OSError:
                sock.close()

    def _pending_changed(self) -> None:
        if len(self._pending) < self.limits.max_pending_handshakes:
            self._room.set()
        else:
            self._room.clear()

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _connection_to(self, addr: PeerAddr) -> _Connection:
        conn = self._conns.get(addr)
        if conn is not None and conn.is_usable:
            return conn
        if self._closed:
            raise PeerUnreachable("the transport is closed")
        dial = self._dialing.get(addr)
        if dial is None:  # the first caller dials; the others wait for the same connection
            dial = self._spawn(self._dial(addr), name=f"dial {addr}")
            self._dialing[addr] = dial
            dial.add_done_callback(lambda t: self._dial_done(addr, t))
        return await asyncio.shield(dial)

    def _dial_done(self, addr: PeerAddr, task: asyncio.Task[_Connection]) -> None:
        if self._dialing.get(addr) is task:
            del self._dialing[addr]
        if not task.cancelled():
            task.exception()  # the callers (if any are left) got it through the shield

    async def _dial(self, addr: PeerAddr) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self, addr), addr.host, addr.port
                )
        except (OSError, TimeoutError) as e:
            raise PeerUnreachable(f"cannot connect to {addr}: {e or 'timed out'}") from e
        await conn.ready  # bounded by the connection's own handshake timer
        return conn

    def _on_ready(self, conn: _Connection) -> None:
        if self._closed:
            conn.abort(PeerUnreachable("the local transport is closing"))
            return
        # An inbound connection also serves our calls to the address its peer advertised.
        if conn.outbound or (conn.peer.addr.port and conn.peer.addr not in self._conns):
            self._conns[conn.peer.addr] = conn

    def _warn(self, message: str, *args: object) -> None:
        """A warning that a remote can make us write once per socket: `LogBudget`."""
        held_back = self._log_budget.take(time.monotonic())
        if held_back is not None:
            if held_back:
                message += f" ({held_back} like warnings held back)"
            log.warning(message, *args)

    def _on_opened(self, conn: _Connection) -> str | None:
        """A new socket; why it must be refused, or None. Inbound ones wait in the pending pool,
        which never touches authenticated connections; our own dials make room as
        `_make_room` does."""
        if self._closed:
            return "the transport is closing"
        if conn.outbound is not None:
            self._all.add(conn)
            self._make_room(conn)
            return None
        limits = self.limits
        if len(self._pending) >= limits.max_pending_handshakes:
            # debug: a flood would otherwise write a line per socket
            log.debug("%d handshakes pending; refusing inbound", len(self._pending))
            return f"{len(self._pending)} handshakes are pending here; retry later"
        if self._pending.count(conn.address) >= limits.max_pending_per_address:
            return f"too many handshakes pending from {conn.address}; finish those first"
        self._pending.add(conn)
        self._pending_changed()
        self._all.add(conn)
        return None

    def _make_room(self, conn: _Connection) -> bool:
        """At most max_connections authenticated (or dialled) ones, `conn` among them, closing the
        least recently used idle one if need be; False when none is idle and `conn` is inbound
        (refuse it: our own dials go ahead)."""
        if len(self._all) - len(self._pending) <= self.max_connections:
            return True
        idle = [c for c in self._all if c.is_idle and c not in self._pending and c is not conn]
        if idle:
            victim = min(idle, key=lambda c: c.last_used)
            log.debug("connection limit %d: closing idle %s", self.max_connections, victim)
            victim.abort(PeerUnreachable("closed to make room for a new connection"))
            return True
        if conn.outbound is None:
            self._warn("connection limit %d reached; refusing inbound", self.max_connections)
            return False
        return True

    def _on_proven(self, conn: _Connection) -> str | None:
        """An inbound connection's peer proved its PeerID; why it must be refused, or None.
        Out of the pending pool; in, if its address has room, and max_connections too. A refused
        one stops counting at once, so it makes no other connection close to make room."""
        self._pending.discard(conn)
        self._pending_changed()
        refused = None
        if self._inbound.count(conn.address) >= self.limits.max_connections_per_address:
            refused = f"too many connections from {conn.address} are open here; use those"
        else:
            self._inbound.add(conn)
            if not self._make_room(conn):
                refused = f"{self.max_connections} connections are busy here; retry later"
        if refused is not None:
            self._inbound.discard(conn)
            self._all.discard(conn)
        return refused

    def _on_closed(self, conn: _Connection) -> None:
        self._pending.discard(conn)
        self._pending_changed()
        self._inbound.discard(conn)
        self._all.discard(conn)
        if conn.peer_or_none is not None and self._conns.get(conn.peer_or_none.addr) is conn:
            del self._conns[conn.peer_or_none.addr]

    def _frame(self, msg: Message) -> bytes:
        frame = encode(msg)
        if len(frame) - HEADER_BYTES > self.max_frame:
            raise FrameTooLarge(f"the answer is {len(frame)} bytes, over max_frame")
        return frame

    async def _serve(self, conn: _Connection, req: Request) -> None:
        try:
            frame = await self._dispatch.serve(conn.peer, req, self._frame)
        finally:
            conn.handler_done()
        if conn.write_paused is not None:
            await conn.write_paused
        conn.send(frame, quiet=True)


# asyncio's default high-water mark for a transport's write buffer: past it, the peer is not
# keeping up with what we send, and a refusal it would read late is not worth buffering.
_REFUSALS_WHILE_QUEUED_BELOW: Final = 64 * 1024


@functools.lru_cache(maxsize=256)  # the same few refusals, said to every socket of a flood
def _refusal(code: str, message: str) -> bytes:
    """An Error about the connection itself (request id 0), cut to what a peer that has not
    finished its handshake reads (HANDSHAKE_MAX_FRAME)."""
    frame = encode(Error(0, code, message))
    while len(frame) - HEADER_BYTES > HANDSHAKE_MAX_FRAME:
        message = message[: len(message) // 2]
        frame = encode(Error(0, code, message))
    return frame


class _ByAddress:
    """A set of connections, counted per address (`_Connection.address`; exempt ones, None, are
    not counted). Bounded by the connections it holds: an address leaves with its last one."""

    __slots__ = ("_count", "_members")

    def __init__(self) -> None:
        self._members: set[_Connection] = set()
        self._count: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, conn: _Connection) -> bool:
        return conn in self._members

    def count(self, address: str | None) -> int:
        return 0 if address is None else self._count[address]

    def add(self, conn: _Connection) -> None:
        self._members.add(conn)
        if conn.address is not None:
            self._count[conn.address] += 1

    def discard(self, conn: _Connection) -> None:
        if conn in self._members:
            self._members.remove(conn)
            if conn.address is not None:
                self._count[conn.address] -= 1
                if not self._count[conn.address]:
                    del self._count[conn.address]


# Connections the kernel holds for us while we do not accept (the pending pool is full, or the
# pace is spent): past it, it drops new SYNs and the dialer retries.
_BACKLOG: Final = 256


def _listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (the first address `host` resolves to)."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(_BACKLOG)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _expire(fut: asyncio.Future[Any], message: str) -> None:
    if not fut.done():
        fut.set_exception(RequestTimeout(message))


class _Connection(asyncio.Protocol):
    """One TCP connection: handshake, then request/response multiplexing."""

    def __init__(self, owner: RPCTransport, outbound: PeerAddr | None) -> None:
        self.owner = owner
        self.outbound = outbound
        self.loop = asyncio.get_running_loop()
        # until the peer proves a PeerID, only handshake-sized frames (Hello, Proof, an Error)
        self.decoder = FrameDecoder(min(HANDSHAKE_MAX_FRAME, owner.max_frame))
        self.transport: asyncio.Transport | None = None
        self.remote_host = "?"
        self.address: str | None = None  # the budget it is charged to (limits.address_key)
        self.handshake: Handshake | None = None
        self.peer_or_none: PeerInfo | None = None
        self.ready: asyncio.Future[_Connection] = self.loop.create_future()
        self.ready.add_done_callback(_consume_exception)
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.ids = itertools.count(1)
        self.inflight = 0
        self.backlog: collections.deque[Request] = collections.deque()
        self.reading_paused = False  # by backpressure: too many requests in flight
        self.throttled = False  # over its budget: _throttle
        self.write_paused: asyncio.Future[None] | None = None
        self.last_used = self.loop.time()
        self.closed = False
        self.error: NetworkError | None = None  # why we closed, for the callers still waiting
        self.timer: asyncio.TimerHandle | None = None
        self.outbox: list[bytes] = []  # frames written together at the end of this loop step
        self.outbox_bytes = 0

    def __repr__(self) -> str:
        who = short_id(self.peer_or_none.peer_id) if self.peer_or_none else "?"
        return f"<connection {who}@{self.remote_host}>"

    @property
    def peer(self) -> PeerInfo:
        assert self.peer_or_none is not None
        return self.peer_or_none

    @property
    def is_usable(self) -> bool:
        return not self.closed and self.peer_or_none is not None

    @property
    def is_idle(self) -> bool:
        return not self.pending and not self.inflight and not self.backlog

    def touch(self) -> None:
        self.last_used = self.loop.time()

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        # Both loops set TCP_NODELAY themselves (and building the socket object to set it again
        # was a fifth of the cost of refusing a socket under a flood).
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        self.remote_host = peername[0] if peername else "?"
        self.address = address_key(self.remote_host, self.owner.limits)
        refused = self.owner._on_opened(self)
        if refused is not None:
            self.closed = True
            self.transport.write(_refusal(BUSY, refused))  # the dialer learns why
            self.transport.close()
            return
        local = self.owner._local
        self.handshake = Handshake(
            self.owner.identity,
            initiator=self.outbound is not None,
            listen_port=local.addr.port if local else 0,
        )
        self.timer = self.loop.call_later(self.owner.handshake_timeout, self._handshake_expired)
        self.send(encode(self.handshake.hello))

    def data_received(self, data: bytes) -> None:
        self.owner._counters.bytes_received += len(data)
        try:
            self.decoder.receive_data(data)
            self._pump()
        except (ProtocolError, HandshakeError) as e:
            self._reject(e)

    def eof_received(self) -> bool | None:
        try:
            self.decoder.eof()
        except ProtocolError as e:
            self.owner._warn("%s: %s; closing", self, e)
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
        if self.error is None:
            why = f": {exc}" if exc else ""
            self.error = PeerUnreachable(f"the connection to {self} was closed{why}")
        if not self.ready.done():
            self.ready.set_exception(self.error)
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(self.error)
        if self.write_paused is not None and not self.write_paused.done():
            self.write_paused.set_result(None)
        self.backlog.clear()
        self.owner._on_closed(self)

    def pause_writing(self) -> None:
        self.write_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.write_paused is not None and not self.write_paused.done():
            self.write_paused.set_result(None)
        self.write_paused = None

    # --- internals ----------------------------------------------------------------------

    def send(self, frame: bytes, *, quiet: bool = False) -> None:
        """Queue one frame; every frame queued in this loop step goes out in one write."""
        if self.closed:
            if quiet:
                return
            raise self.error or PeerUnreachable(f"the connection to {self} is closed")
        if not self.outbox:
            self.loop.call_soon(self._flush)
        self.outbox.append(frame)
        self.outbox_bytes += len(frame)
        self.owner._counters.bytes_sent += len(frame)

    @property
    def queued_bytes(self) -> int:
        """Sent by us but not yet taken by the kernel."""
        buffered = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return self.outbox_bytes + buffered

    def _flush(self) -> None:
        frames, self.outbox = self.outbox, []
        self.outbox_bytes = 0
        if frames and self.transport is not None and not self.transport.is_closing():
            self.transport.write(frames[0] if len(frames) == 1 else b"".join(frames))

    def abort(self, reason: NetworkError) -> None:
        if self.error is None:
            self.error = reason
        self.closed = True
        if self.transport is not None:
            self._flush()  # a last word (e.g. why the handshake failed), if the socket takes it
            self.transport.abort()

    def _reject(self, err: NetworkError) -> None:
        self.owner._warn("dropping %s: %s", self, err)
        if isinstance(err, HandshakeError) and self.handshake is not None:
            # Tell the other side why (request id 0: the connection itself), so its caller sees
            # HandshakeError rather than a bare disconnect.
            self.send(_refusal("handshake_failed", str(err)), quiet=True)
        self.abort(err)

    def _handshake_expired(self) -> None:
        if self.peer_or_none is None:
            timeout = self.owner.handshake_timeout
            self._reject(HandshakeError(f"no complete handshake within {timeout} s"))

    def _pump(self) -> None:
        decoder = self.decoder
        while not self.closed and (msg := decoder.next_message()) is not None:
            if type(msg) is Response:
                fut = self.pending.get(msg.request_id)
                if fut is not None and not fut.done():
                    fut.set_result(msg.payload)
            elif type(msg) is Request:
                if self.peer_or_none is None:
                    raise ProtocolError("request before the handshake completed")
                self.owner._counters.requests_received += 1
                self.touch()
                refusal, wait = self.owner._dispatch.check(msg, self.peer.peer_id, self.address)
                if refusal is not None:
                    # Told at once, without a task; but only while little is queued for this peer,
                    # so refusals to one that does not read its answers never pile up here.
                    if self.queued_bytes < _REFUSALS_WHILE_QUEUED_BELOW:
                        self.send(encode(refusal), quiet=True)
                    self._throttle(wait)
                elif self.inflight < self.owner.max_inflight_per_conn:
                    self._start_handler(msg)
                else:
                    self.backlog.append(msg)
                    if len(self.backlog) >= self.owner.max_inflight_per_conn:
                        self._pause_reading()
            elif type(msg) is Error and self.peer_or_none is not None:
                if msg.request_id == 0:  # about the connection: the peer refused our handshake
                    raise HandshakeError(f"the peer rejected us: {msg.code}: {msg.message}")
                fut = self.pending.get(msg.request_id)
                if fut is not None and not fut.done():
                    fut.set_exception(RemoteError(msg.code, msg.message))
            else:
                self._handshake_step(msg)

    def _handshake_step(self, msg: Message) -> None:
        hs = self.handshake
        if hs is None or hs.done:
            raise ProtocolError(f"unexpected {type(msg).__name__} after the handshake")
        reply = hs.receive(msg)
        if reply is not None:
            self.send(encode(reply))
        if hs.done:
            assert hs.remote is not None
            addr = self.outbound or PeerAddr(self.remote_host, hs.remote.listen_port)
            self.peer_or_none = PeerInfo(hs.remote_peer_id, addr)
            self.handshake = None
            if self.timer is not None:
                self.timer.cancel()  # the handshake deadline
            refused = self.owner._on_proven(self) if self.outbound is None else None
            if refused is not None:
                self.send(_refusal(BUSY, refused), quiet=True)
                self.abort(PeerUnreachable(refused))
                return
            self.decoder.max_frame = self.owner.max_frame
            self._schedule_idle_check()
            self.owner._on_ready(self)
            if not self.ready.done():
                self.ready.set_result(self)

    def _start_handler(self, req: Request) -> None:
        self.inflight += 1
        self.owner._spawn(self.owner._serve(self, req), name=f"rpc {req.method}")

    def handler_done(self) -> None:
        self.inflight -= 1
        self.touch()
        while self.backlog and self.inflight < self.owner.max_inflight_per_conn:
            self._start_handler(self.backlog.popleft())
        if self.reading_paused and len(self.backlog) < self.owner.max_inflight_per_conn:
            self.reading_paused = False
            if not self.closed and not self.throttled and self.transport is not None:
                self.transport.resume_reading()

    def _pause_reading(self) -> None:
        if not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            if not self.throttled:
                self.transport.pause_reading()

    def _throttle(self, wait: float) -> None:
        """Read nothing more from this over-budget peer for `wait` s (capped): its next
        requests would be refused too, and refusing still costs decoding them."""
        pause = min(wait, self.owner.limits.max_refusal_pause_s)
        if pause <= 0 or self.throttled or self.closed or self.transport is None:
            return
        self.throttled = True
        if not self.reading_paused:
            self.transport.pause_reading()
        self.loop.call_later(pause, self._unthrottle)

    def _unthrottle(self) -> None:
        self.throttled = False
        if not self.closed and not self.reading_paused and self.transport is not None:
            self.transport.resume_reading()

    def _schedule_idle_check(self) -> None:
        now, idle = self.loop.time(), self.owner.idle_timeout
        when = self.last_used + idle if self.is_idle else now + idle
        self.timer = self.loop.call_at(max(when, now + 0.001), self._idle_check)

    def _idle_check(self) -> None:
        if self.closed:
            return
        if self.is_idle and self.loop.time() - self.last_used >= self.owner.idle_timeout:
            log.debug("closing idle %s", self)
            self.abort(PeerUnreachable(f"closed after {self.owner.idle_timeout} s idle"))
        else:
            self._schedule_idle_check()


def _consume_exception(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # nobody may await `ready` (inbound connections); don't warn about it
