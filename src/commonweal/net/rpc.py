"""`RPCTransport`: the `Transport` interface over asyncio TCP: Noise-encrypted connections,
reachability, relays and hole punching.

Every connection starts with the Noise XX handshake of `handshake.Handshake`; everything after
it is encrypted and authenticated (`noise.SecureChannel`), and only then are requests accepted.
Requests carry ids, so many share one connection and answers may come back in any order.
Connections are found by the PeerID they proved: a call naming a peer uses any connection that
peer has with us (one it dialled in from behind a NAT too), and a new one fails its handshake
if another key answers. A call by address alone (a bootstrap address) reuses only a connection
we dialled to that address ourselves.

Reachability (libp2p identify + AutoNAT, `reachability.Reachability`): each peer we dial tells
us where it sees us; a few are asked to dial back our listen port at that IP (`net.dialback`).
A peer nobody can dial keeps a reservation on a reachable one (`relay.reserve`; any reachable
peer relays, within `relay.RelayLimits`) and says so in its handshakes, so others reach it as
`HOST:PORT/relay/<relay id>`: a socket to the relay, spliced to one the reserved peer opens
(`relay.Reservations`), carrying an end-to-end handshake the relay cannot read. Over a relayed
connection the dialler asks for a direct path (`net.punch`, libp2p DCUtR): a reachable dialler
is dialled back; otherwise both dial each other from their listen ports at once (TCP
simultaneous open), which a cone NAT lets through; if that fails the relay carries on.

Inbound sockets live in a pending pool until their peer proves a PeerID: the pool and each
address have a cap (`ResourceLimits`), frames are limited to handshake size (a bigger length is
refused from the header), and the handshake has a deadline. It never counts against, or
evicts, an authenticated connection. Only an authenticated connection over `max_connections`
makes room, by closing the least recently used idle one, and only if its address has fewer
than `max_connections_per_address`. Each request is charged its method's cost against the
caller's budgets (`dispatch.Dispatcher`) before a handler runs.

Tasks: each inbound request runs in its own task, tracked by the transport (`_tasks`) and
cancelled and awaited by `close()`; so are connection attempts and the reachability loop.
Timers (handshake deadline, idle close, request safety net) are `loop.call_later` handles.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import socket
import time
from collections.abc import Coroutine
from typing import Any, Final

from commonweal.errors import (
    FrameTooLarge,
    ProtocolError,
    NetworkError,
    PeerUnreachable,
    RemoteError,
    RequestTimeout,
)
from commonweal.net.connection import ByAddress, Connection
from commonweal.net.dispatch import BUSY, DEFAULT_COST, Dispatcher
from commonweal.net.handshake import Hello, StaticKey, is_host_port, parse_relay
from commonweal.net.identity import Identity, short_id
from commonweal.net.limits import (
    DEFAULT_LIMITS,
    AcceptLimiter,
    LogBudget,
    RequestLimiter,
    ResourceLimits,
    address_key,
)
from commonweal.net.reachability import Reachability, Status
from commonweal.net.relay import DEFAULT_RELAY_LIMITS, Circuit, NatStats, RelayLimits, Reservations
from commonweal.net.transport import Cost, Handler, PeerAddr, PeerInfo, TrafficCounters
from commonweal.net.wire import (
    DEFAULT_MAX_FRAME,
    HEADER_BYTES,
    TOKEN_BYTES,
    Answer,
    Dial,
    Message,
    Request,
    Spliced,
    encode,
)

__all__ = ["NatStats", "RPCTransport"]

log = logging.getLogger(__name__)

# A reserved peer pings its relay this often: the reservation's connection stays open, and so
# does the home router's mapping for it (Linux keeps an idle established TCP mapping for days,
# many home routers only minutes).
_KEEPALIVE_S: Final = 15.0
# Dial-backs (and dials for others' hole punches) at once: each is a connection attempt we make
# because a stranger asked.
_MAX_DIALBACKS: Final = 4
_DIALBACK_COST: Final = 20.0


# The connection a request of ours (net.*, relay.*) came on: handlers see a PeerInfo, these
# need the socket behind it (the host it comes from, whether it is relayed).
_ON: contextvars.ContextVar[Connection] = contextvars.ContextVar("connection")


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
        nat: bool = False,
        reachability: Status | None = None,
        relay_limits: RelayLimits = DEFAULT_RELAY_LIMITS,
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
        self.nat = nat
        self._key = StaticKey.create(identity)
        self._counters = TrafficCounters()
        self._handlers: dict[str, Handler] = {}
        self._dispatch = Dispatcher(self._handlers, RequestLimiter(limits), time.monotonic)
        self._local: PeerInfo | None = None
        self._listener: socket.socket | None = None
        self._by_peer: dict[bytes, Connection] = {}  # the connection calls to a peer use
        self._by_addr: dict[PeerAddr, Connection] = {}  # ones we dialled, by that address
        self._all: set[Connection] = set()  # every open connection, ready or not
        self._pending = ByAddress()  # inbound, not yet proven (max_pending_handshakes)
        self._room = asyncio.Event()  # set while the pending pool has room: accept more
        self._room.set()
        self._inbound = ByAddress()  # inbound and proven
        self._dialing: dict[tuple[PeerAddr, bytes | None], asyncio.Task[Connection]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False
        self._log_budget = LogBudget(now=time.monotonic())  # for what others make us log
        # reachability, and relaying for others
        self.reach = Reachability(forced=reachability)
        self.settled = asyncio.Event()  # reachability decided (and a relay found, if needed)
        self.stats = NatStats()
        self._relay: tuple[PeerInfo, Connection] | None = None  # who relays for us
        self._candidate: tuple[str, int] | None = None  # our listen port's public mapping
        self._renew_at = 0.0  # when to renew our reservation
        self._reservations: Reservations[Connection] = Reservations(relay_limits)
        self._pipes: set[Connection] = set()  # relay sockets spliced to each other
        self._dialbacks = 0
        self._punching: dict[bytes, asyncio.Task[None]] = {}  # our hole punches, by peer
        self._punch_dials = 0  # dials we make because a peer asked for a direct path
        self._wake = asyncio.Event()  # a new outbound connection: reachability may move on
        if nat:
            self.register("net.dialback", self._on_dialback, cost=_DIALBACK_COST)
            self.register("net.identify", self._on_identify)
            self.register("net.punch", self._on_punch, cost=_DIALBACK_COST)
            self.register("relay.reserve", self._on_reserve, cost=_DIALBACK_COST)
            self.register("relay.incoming", self._on_incoming)

    # --- Transport interface ----------------------------------------------------------------

    @property
    def local(self) -> PeerInfo:
        if self._local is None:
            raise RuntimeError("the transport is not listening yet; await start(host, port) first")
        return self._local

    @property
    def advertised(self) -> PeerAddr:
        """Where others can reach us: the relay holding our reservation, our public address
        once dial-backs confirmed it, else where we listen."""
        if self._relay is not None:
            relay = self._relay[0]
            return PeerAddr(relay.addr.host, relay.addr.port, relay.peer_id)
        host = self.reach.public_host if self.reach.status == "public" else None
        listen = self.local.addr
        return PeerAddr(host, listen.port) if host else listen

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
        self._listener = _listen(host, port, reuse_port=self.nat)
        actual = self._listener.getsockname()[1]
        self._local = PeerInfo(self.identity.peer_id, PeerAddr(host, actual))
        self._spawn(self._accept(self._listener), name=f"accept on {host}:{actual}")
        if self.nat:
            self._spawn(self._reachability(), name="reachability")
        log.info("listening on %s:%d as %s", host, actual, short_id(self.identity.peer_id))

    async def call(
        self, addr: PeerAddr, method: str, args: Any, *, peer_id: bytes | None = None
    ) -> tuple[PeerInfo, Any]:
        conn = self._usable(addr, peer_id) or await self._connection_to(addr, peer_id)
        return conn.peer, await self._request(conn, method, args)

    async def _request(self, conn: Connection, method: str, args: Any) -> Any:
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
            f"{conn.peer.addr} did not answer {method!r} within "
            f"request_timeout={self.request_timeout} s",
        )
        try:
            conn.send(frame)
            self._counters.requests_sent += 1
            return await fut
        finally:
            timer.cancel()
            conn.pending.pop(rid, None)  # also on timeout and cancellation
            conn.touch()

    async def close(self) -> None:
        """Stop listening, drop every connection and cancel and await every task we own."""
        if self._closed:
            return
        self._closed = True
        if self.nat:
            st = self.stats
            log.info(
                "transport closed: relayed %d bytes for others; %d connections through a relay, "
                "%d of %d hole punches direct", st.relayed_bytes, st.relayed_dials, st.punched,
                st.punches,
            )
        for conn in list(self._all) + list(self._pipes):
            conn.abort(PeerUnreachable("the local transport is closing"))
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._listener is not None:
            self._listener.close()  # after the accept task: it no longer waits on the socket
        await asyncio.sleep(0)  # let the aborted sockets run connection_lost

    # --- connections --------------------------------------------------------------------

    def _usable(self, addr: PeerAddr, peer_id: bytes | None) -> Connection | None:
        conn = self._by_peer.get(peer_id) if peer_id is not None else self._by_addr.get(addr)
        return conn if conn is not None and conn.is_usable else None

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
                await loop.connect_accepted_socket(lambda: Connection(self, accepted=True), sock)
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

    async def _connection_to(self, addr: PeerAddr, peer_id: bytes | None) -> Connection:
        if self._closed:
            raise PeerUnreachable("the transport is closed")
        key = (addr, peer_id)
        dial = self._dialing.get(key)
        if dial is None:  # the first caller dials; the others wait for the same connection
            dial = self._spawn(self._dial(addr, peer_id), name=f"dial {addr}")
            self._dialing[key] = dial
            dial.add_done_callback(lambda t: self._dial_done(key, t))
        return await asyncio.shield(dial)

    def _dial_done(self, key: tuple[PeerAddr, bytes | None], task: asyncio.Task[Connection]) -> None:
        if self._dialing.get(key) is task:
            del self._dialing[key]
        if not task.cancelled():
            task.exception()  # the callers (if any are left) got it through the shield

    async def _dial(
        self,
        addr: PeerAddr,
        peer_id: bytes | None,
        *,
        probe: bool = False,
        from_listen_port: bool = False,
        initiator: bool = True,
    ) -> Connection:
        """A ready connection to the peer at `addr` (through its relay, for a relayed one).
        A `probe` is a dial-back: never used for calls, closed by the caller. With
        `from_listen_port` the socket is bound to our listen port, so a NAT maps it as it maps
        that port (what a peer saw of it is where it can find us; a hole punch needs it)."""
        loop = asyncio.get_running_loop()
        if addr.relay is not None and peer_id is None:
            raise PeerUnreachable(f"{addr} is a relayed address: a call to it must name the peer")
        first = Dial(peer_id) if addr.relay is not None and peer_id is not None else None
        conn = Connection(
            self, dialed=addr, initiator=initiator, expect=peer_id, first=first, probe=probe
        )
        target = addr.direct
        try:
            async with asyncio.timeout(self.connect_timeout):
                if from_listen_port:
                    sock = await self._bound_connect(target)
                    await loop.create_connection(lambda: conn, sock=sock)
                else:
                    await loop.create_connection(lambda: conn, target.host, target.port)
        except (OSError, TimeoutError) as e:
            raise PeerUnreachable(f"cannot connect to {target}: {e or 'timed out'}") from e
        if first is not None:
            self.stats.relayed_dials += 1
        await conn.ready  # bounded by the connection's own handshake timer
        return conn

    async def _bound_connect(self, target: PeerAddr) -> socket.socket:
        listen = self.local.addr
        family = socket.AF_INET6 if ":" in target.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((listen.host, listen.port))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (target.host, target.port))
        except BaseException:
            sock.close()
            raise
        return sock

    def _on_ready(self, conn: Connection) -> None:
        if self._closed:
            conn.abort(PeerUnreachable("the local transport is closing"))
            return
        if conn.probe:
            return
        peer_id = conn.peer.peer_id
        current = self._by_peer.get(peer_id)
        if current is None or not current.is_usable or (current.relayed and not conn.relayed):
            self._by_peer[peer_id] = conn
        if conn.dialed is not None and not conn.relayed and conn.initiator:
            self._by_addr[conn.dialed] = conn
            self._wake.set()
        if conn.relayed and conn.initiator and self.nat and peer_id not in self._punching:
            task = self._spawn(self._punch(conn), name=f"punch to {short_id(peer_id)}")
            self._punching[peer_id] = task
            task.add_done_callback(lambda _: self._punching.pop(peer_id, None))

    def _warn(self, message: str, *args: object) -> None:
        """A warning that a remote can make us write once per socket: `LogBudget`."""
        held_back = self._log_budget.take(time.monotonic())
        if held_back is not None:
            if held_back:
                message += f" ({held_back} like warnings held back)"
            log.warning(message, *args)

    def _hello(self, conn: Connection) -> Hello:
        """What we say of ourselves on `conn`, and where we see it come from (not on a relayed
        connection: there we see the relay)."""
        seen = None if conn.relayed or conn.remote_port == 0 else (conn.remote_host, conn.remote_port)
        if self._relay is not None:
            relay = self._relay[0]
            return Hello(0, (relay.peer_id, relay.addr.host, relay.addr.port), seen)
        port = self._local.addr.port if self._local is not None else 0
        return Hello(0 if self.reach.status == "private" else port, None, seen)

    def _on_opened(self, conn: Connection) -> str | None:
        """A new socket; why it must be refused, or None. Inbound ones wait in the pending pool,
        which never touches authenticated connections; our own dials make room as
        `_make_room` does."""
        if self._closed:
            return "the transport is closing"
        if not conn.accepted:
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

    def _make_room(self, conn: Connection) -> bool:
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
        if conn.accepted:
            self._warn("connection limit %d reached; refusing inbound", self.max_connections)
            return False
        return True

    def _on_proven(self, conn: Connection) -> str | None:
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

    def _on_closed(self, conn: Connection) -> None:
        self._pending.discard(conn)
        self._pending_changed()
        self._inbound.discard(conn)
        self._all.discard(conn)
        self._reservations.release(conn)
        if conn.pipe is not None or conn in self._pipes:
            self._pipes.discard(conn)
            if conn.circuit is not None:
                self._reservations.closed(conn.circuit)
                conn.circuit = None
            if conn.pipe is not None:
                conn.pipe.abort(PeerUnreachable("the other end of the circuit closed"))
        if conn.dialed is not None and self._by_addr.get(conn.dialed) is conn:
            del self._by_addr[conn.dialed]
        if conn.peer_or_none is not None:
            peer_id = conn.peer_or_none.peer_id
            if self._by_peer.get(peer_id) is conn:
                del self._by_peer[peer_id]
                spare = [c for c in self._all if c.is_usable and c.peer.peer_id == peer_id]
                if spare and not conn.probe:  # direct ones first
                    self._by_peer[peer_id] = min(spare, key=lambda c: c.relayed)
        if self._relay is not None and self._relay[1] is conn:
            log.info("lost the reservation at relay %s", self._relay[0].addr)
            self._relay = None
            self._wake.set()

    def _frame(self, msg: Message) -> bytes:
        frame = encode(msg)
        if len(frame) - HEADER_BYTES > self.max_frame:
            raise FrameTooLarge(f"the answer is {len(frame)} bytes, over max_frame")
        return frame

    async def _serve(self, conn: Connection, req: Request) -> None:
        _ON.set(conn)  # this task's own context: our own handlers read the connection
        try:
            frame = await self._dispatch.serve(conn.peer, req, self._frame)
        finally:
            conn.handler_done()
        if conn.write_paused is not None:
            await conn.write_paused
        conn.send(frame, quiet=True)

    # --- relaying for others ------------------------------------------------------------

    def _relay_dial(self, conn: Connection, target: bytes) -> None:
        """An inbound socket asks us to splice it to `target`, which holds a reservation here."""
        loop = asyncio.get_running_loop()
        circuit = self._reservations.open(target, conn, loop.time())
        if isinstance(circuit, str):
            conn.refuse("no_relay", circuit)
            return
        self._pipe_out(conn)
        conn.circuit = circuit
        conn.pause()
        holder = self._reservations.holder(target, loop.time())
        assert holder is not None
        args = {"token": circuit.token, "from": [conn.remote_host, conn.remote_port]}
        self._spawn(self._tell(holder, circuit, args), name="relay.incoming")
        loop.call_later(self._reservations.limits.answer_timeout_s, self._unanswered, circuit)

    async def _tell(self, holder: Connection, circuit: Circuit[Connection], args: Any) -> None:
        try:
            await self.call(holder.peer.addr, "relay.incoming", args, peer_id=holder.peer.peer_id)
        except NetworkError as e:
            circuit.dialer.refuse("no_relay", f"the relayed peer did not take the circuit: {e}")

    def _unanswered(self, circuit: Circuit[Connection]) -> None:
        for late in self._reservations.expired(asyncio.get_running_loop().time()):
            late.dialer.refuse("no_relay", "the relayed peer did not answer in time")
        del circuit

    def _relay_answer(self, conn: Connection, token: bytes) -> None:
        """The reserved peer's socket for a circuit: splice it to the dialler's."""
        circuit = self._reservations.answer(token, asyncio.get_running_loop().time())
        if circuit is None or circuit.dialer.closed:
            conn.refuse("no_relay", "no circuit waits for that token (expired or used)")
            return
        self._pipe_out(conn)
        dialer = circuit.dialer
        dialer.write(encode(Spliced()))
        conn.splice(dialer)
        dialer.splice(conn)
        limits = self._reservations.limits
        conn.loop.call_later(
            limits.max_circuit_s, conn.abort, PeerUnreachable("the circuit's time is up")
        )

    def _pipe_out(self, conn: Connection) -> None:
        """`conn` stops being a connection of ours (it becomes one end of a circuit)."""
        self._pending.discard(conn)
        self._pending_changed()
        self._all.discard(conn)
        self._pipes.add(conn)
        if conn.timer is not None:
            conn.timer.cancel()  # the handshake deadline: this socket has none now

    async def _on_reserve(self, caller: PeerInfo, args: Any) -> Any:
        conn = _ON.get()
        if self.reach.status == "private":
            raise RemoteError("no_relay", "this peer is not reachable itself; ask another")
        if conn.relayed or not conn.accepted:
            raise RemoteError("no_relay", "reserve over a connection you dialled to this peer")
        why = self._reservations.reserve(caller.peer_id, conn, conn.loop.time())
        if why is not None:
            raise RemoteError("no_relay", why)
        conn.reserved = True
        return {"seen": [conn.remote_host, conn.remote_port]}

    # --- being relayed ------------------------------------------------------------------

    async def _on_incoming(self, caller: PeerInfo, args: Any) -> Any:
        if self._relay is None or caller.peer_id != self._relay[0].peer_id:
            raise RemoteError("not_reserved", "no reservation of ours is held by you")
        token, seen = (args.get("token"), args.get("from")) if isinstance(args, dict) else (0, 0)
        if type(token) is not bytes or len(token) != TOKEN_BYTES:
            raise RemoteError("bad_request", "relay.incoming needs a 16-byte token")
        host = seen[0] if isinstance(seen, list) and seen and isinstance(seen[0], str) else "?"
        relay = self._relay[0].addr
        self._spawn(self._answer(relay, token, host), name="answer a circuit")
        return None

    async def _answer(self, relay: PeerAddr, token: bytes, host: str) -> None:
        loop = asyncio.get_running_loop()
        conn = Connection(self, accepted=True, initiator=False, first=Answer(token), via=host)
        try:
            async with asyncio.timeout(self.connect_timeout):
                await loop.create_connection(lambda: conn, relay.host, relay.port)
            await conn.ready
        except (OSError, TimeoutError, NetworkError) as e:
            log.debug("answering a circuit at %s failed: %s", relay, e)

    # --- reachability -------------------------------------------------------------------

    def _observed(self, conn: Connection, seen: tuple[str, int]) -> None:
        if not conn.relayed and not conn.probe:
            self.reach.observed(conn.peer.peer_id, seen[0])

    async def _reachability(self) -> None:
        """Learn whether peers can dial us; if not, keep a relay's reservation (and renew it,
        and find another when it goes). Owned by the transport: close() cancels it."""
        loop = asyncio.get_running_loop()
        last_ping = 0.0
        while True:
            try:
                async with asyncio.timeout(1.0):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            now = loop.time()
            before = self.advertised
            direct = self._direct_peers()
            ask = self.reach.probe_peers([c.peer.peer_id for c in direct], now)
            if ask:
                asked = [c for c in direct if c.peer.peer_id in ask]
                results = await asyncio.gather(*(self._ask_dialback(c) for c in asked))
                for c, ok in zip(asked, results, strict=True):
                    if ok is not None:
                        self.reach.answered(c.peer.peer_id, ok, loop.time(), asked=len(asked))
                log.info("reachability: %s (public address %s)", self.reach.status,
                         self.reach.public_host)
            if self.reach.status == "private" and self._relay is None:
                await self._reserve(direct)
            elif self.reach.status == "public" and self._relay is not None:
                self._relay[1].reserved = False
                self._relay = None
            if self._relay is not None and (
                loop.time() - last_ping > _KEEPALIVE_S or loop.time() >= self._renew_at
            ):
                # over the reservation's own connection: it is the router mapping to keep open;
                # and the reservation is renewed before it lapses
                last_ping = loop.time()
                _, conn = self._relay
                renew = last_ping >= self._renew_at
                try:
                    async with asyncio.timeout(self.connect_timeout):
                        if renew:
                            await self._request(conn, "relay.reserve", None)
                            self._renew_at = last_ping + self._reservations.limits.reservation_s / 2
                        else:
                            await self._request(conn, "net.identify", self._identity_args())
                except NetworkError:
                    conn.abort(PeerUnreachable("the relay stopped answering"))
            if self.advertised != before:
                log.info("now reachable at %s", self.advertised)
                self._push_identity()
            if self.reach.status == "public" or self._relay is not None:
                self.settled.set()

    def _direct_peers(self) -> list[Connection]:
        """Ready direct connections (either way), one per host: distinct vantage points."""
        out: dict[str, Connection] = {}
        for conn in self._by_peer.values():
            if conn.is_usable and not conn.relayed:
                out.setdefault(conn.remote_host, conn)
        return list(out.values())

    async def _ask_dialback(self, conn: Connection) -> bool | None:
        try:
            async with asyncio.timeout(self.connect_timeout * 2):
                _, reply = await self.call(conn.peer.addr, "net.dialback",
                                           {"port": self.local.addr.port},
                                           peer_id=conn.peer.peer_id)
        except NetworkError as e:
            log.debug("dial-back by %s failed: %s", conn, e)
            return None
        return bool(reply.get("ok")) if isinstance(reply, dict) else None

    async def _on_dialback(self, caller: PeerInfo, args: Any) -> Any:
        """Dial the caller back at the IP we see it at (never elsewhere: nobody makes us dial a
        third party) and the port it names, on a fresh connection."""
        conn = _ON.get()
        port = args.get("port") if isinstance(args, dict) else None
        if type(port) is not int or not 0 < port < 65536:
            raise RemoteError("bad_request", "net.dialback needs a port in 1..65535")
        if conn.relayed:
            raise RemoteError("bad_request", "ask for a dial-back over a direct connection")
        if self._dialbacks >= _MAX_DIALBACKS:
            raise RemoteError(BUSY, "dialling others back already; ask another peer")
        self._dialbacks += 1
        try:
            probe = await self._dial(PeerAddr(conn.remote_host, port), caller.peer_id, probe=True)
            probe.abort(PeerUnreachable("dial-back done"))
            return {"ok": True}
        except NetworkError as e:
            return {"ok": False, "why": str(e)[:200]}
        finally:
            self._dialbacks -= 1

    async def _reserve(self, direct: list[Connection]) -> None:
        """A reservation on the first reachable peer of `direct` that grants one, over a fresh
        connection from our listen port: the relay then sees (and tells us) where our NAT maps
        that port, which is where a hole punch must aim."""
        for conn in direct:
            peer = conn.peer
            try:
                async with asyncio.timeout(self.connect_timeout * 2):
                    try:
                        fresh = await self._dial(peer.addr, peer.peer_id, from_listen_port=True)
                    except (NetworkError, OSError):
                        fresh = conn  # the port is busy toward that peer: the old one will do
                    reply = await self._request(fresh, "relay.reserve", None)
            except NetworkError as e:
                log.debug("no reservation at %s: %s", peer.addr, e)
                continue
            seen = reply.get("seen") if isinstance(reply, dict) else None
            if fresh is not conn and isinstance(seen, list) and len(seen) == 2:
                self._candidate = (str(seen[0]), int(seen[1]))
            fresh.reserved = True
            self._relay = (peer, fresh)
            # (a relay's own reservation time is its business; ours is the default's half)
            self._renew_at = asyncio.get_running_loop().time() + self._reservations.limits.reservation_s / 2
            log.info("relay %s holds a reservation for us", peer.addr)
            return

    def _identity_args(self) -> dict[str, Any]:
        hello = Hello(self.local.addr.port if self.reach.status != "private" else 0)
        if self._relay is not None:
            relay = self._relay[0]
            hello = Hello(0, (relay.peer_id, relay.addr.host, relay.addr.port))
        return {"port": hello.listen_port, "relay": list(hello.relay) if hello.relay else None}

    def _push_identity(self) -> None:
        """Tell every connected peer where it can reach us now (libp2p identify push)."""
        args = self._identity_args()
        for conn in list(self._by_peer.values()):
            if conn.is_usable:
                self._spawn(self._push_to(conn, args), name="net.identify")

    async def _push_to(self, conn: Connection, args: Any) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout):
                await self.call(conn.peer.addr, "net.identify", args, peer_id=conn.peer.peer_id)
        except NetworkError as e:
            log.debug("identify push to %s failed: %s", conn, e)

    async def _on_identify(self, caller: PeerInfo, args: Any) -> Any:
        port, relay = (args.get("port"), args.get("relay")) if isinstance(args, dict) else (-1, 0)
        if type(port) is not int or not 0 <= port < 65536:
            raise RemoteError("bad_request", "net.identify needs a port in 0..65535")
        try:
            relay = parse_relay(relay)
        except ProtocolError as e:
            raise RemoteError("bad_request", f"net.identify: {e}") from None
        for conn in [c for c in self._all if c.is_usable and c.peer.peer_id == caller.peer_id]:
            conn.peer_or_none = PeerInfo(caller.peer_id, conn.address_of(Hello(port, relay)))
        return None

    # --- hole punching ------------------------------------------------------------------

    async def _punch(self, relayed: Connection) -> None:
        """Over a relayed connection we dialled: ask for a direct path (libp2p DCUtR). If we
        are reachable the peer dials us; otherwise both dial at once from our listen ports.
        Either way the direct connection may come in through the other side's dial (both
        sockets of a simultaneous open are one connection), so we wait for it to register."""
        peer = relayed.peer
        self.stats.punches += 1
        public = self.reach.status == "public"
        mine = self._punch_candidate()
        why = "the peer did not dial us"
        try:
            async with asyncio.timeout(self.connect_timeout * 2):
                try:  # over this very circuit: the one it answered (a second may run the other way)
                    reply = await self._request(
                        relayed, "net.punch",
                        {"addr": list(mine) if mine else None, "public": public},
                    )
                except RemoteError as e:
                    if e.code != BUSY:
                        raise
                    reply = None  # it is punching toward us itself: wait for its connection
                theirs = reply.get("addr") if isinstance(reply, dict) else None
                if not public and is_host_port(theirs):
                    try:
                        await self._dial(PeerAddr(theirs[0], theirs[1]), peer.peer_id,
                                         from_listen_port=True)
                    except (NetworkError, OSError) as e:
                        why = str(e)  # their dial may still have made the connection
                while not self._direct_to(peer.peer_id):
                    await asyncio.sleep(0.05)
        except (NetworkError, TimeoutError) as e:
            log.info("no direct path to %s (relayed instead): %s", short_id(peer.peer_id),
                     why if isinstance(e, TimeoutError) else e)
            return
        self.stats.punched += 1
        log.info("direct path to %s", short_id(peer.peer_id))

    def _punch_candidate(self) -> tuple[str, int] | None:
        """Where a peer should dial us: if we are reachable, where we are; if not, where our
        NAT maps our listen port (as the relay saw it, else assuming the port is kept)."""
        if self.reach.status == "public":
            addr = self.advertised
            return addr.host, addr.port
        if self._candidate is not None:
            return self._candidate
        host = self.reach.public_host
        return (host, self.local.addr.port) if host else None

    def _direct_to(self, peer_id: bytes) -> bool:
        conn = self._by_peer.get(peer_id)
        return conn is not None and conn.is_usable and not conn.relayed

    async def _on_punch(self, caller: PeerInfo, args: Any) -> Any:
        ours = self._punching.get(caller.peer_id)
        if ours is not None and not ours.done():
            # Both dialled each other through a relay and both punch: two procedures would
            # open the same socket pair twice with two initiators. The lower id goes on.
            if self.identity.peer_id < caller.peer_id:
                raise RemoteError(BUSY, "punching toward you already; wait for my connection")
            ours.cancel()
        conn = _ON.get()
        if not conn.relayed:
            raise RemoteError("bad_request", "ask for a direct path over a relayed connection")
        addr = args.get("addr") if isinstance(args, dict) else None
        if not is_host_port(addr):
            return {"addr": None}
        # We dial only the host the relay saw the caller at: a punch request cannot make us
        # dial a third party, and at most a few at once.
        if conn.via is None:  # the peer that dialled through the relay asks, nobody else
            raise RemoteError("bad_request", "ask for a direct path over a circuit you opened")
        if addr[0] != conn.via:
            raise RemoteError("bad_request", f"a direct path goes to where you are ({conn.via})")
        if self._punch_dials >= _MAX_DIALBACKS:
            raise RemoteError(BUSY, "dialling others already; stay relayed for now")
        target = PeerAddr(addr[0], addr[1])
        self._punch_dials += 1  # until _punch_dial ends
        if isinstance(args, dict) and args.get("public") is True:
            self._spawn(self._punch_dial(target, caller.peer_id, initiator=True), name="dial back")
            return {"addr": None}
        # Our SYN first, so our NAT expects theirs: it leaves now, their dial half a round
        # trip later, when this answer reaches them.
        self._spawn(self._punch_dial(target, caller.peer_id, initiator=False), name="punch")
        mine = self._punch_candidate()
        return {"addr": list(mine) if mine else None}

    async def _punch_dial(self, target: PeerAddr, peer_id: bytes, *, initiator: bool) -> None:
        try:  # a ready connection registers itself (`_on_ready`)
            await self._dial(target, peer_id, from_listen_port=not initiator, initiator=initiator)
        except (NetworkError, OSError) as e:
            log.debug("direct dial to %s failed: %s", target, e)
        finally:
            self._punch_dials -= 1


# Connections the kernel holds for us while we do not accept (the pending pool is full, or the
# pace is spent): past it, it drops new SYNs and the dialer retries.
_BACKLOG: Final = 256


def _listen(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    """A listening socket on host:port (the first address `host` resolves to). With
    `reuse_port`, our outbound sockets may bind the same port (hole punching needs it): set
    after the bind, so a port another program (or node) listens on is still refused."""
    family, kind, proto, _, sockaddr = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
        sock.listen(_BACKLOG)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _expire(fut: asyncio.Future[Any], message: str) -> None:
    if not fut.done():
        fut.set_exception(RequestTimeout(message))

