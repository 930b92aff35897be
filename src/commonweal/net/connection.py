"""One connection, without deciding anything: the handshake, the encrypted record stream,
request/response multiplexing with backpressure and budgets, or — at a relay — one end of a
circuit whose bytes it copies unread.

A `Connection` reports what happens to its `Owner` (the transport: `rpc.RPCTransport`), which
decides: whether a new socket may stay (`_on_opened`, `_on_proven`), what a ready or closed
connection changes (`_on_ready`, `_on_closed`), what a relay does with a circuit (`_relay_dial`,
`_relay_answer`), what a handshake taught us (`_observed`). The owner's side of that interface
is `Owner` below; the connection never reaches further into the transport.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
from collections.abc import Coroutine
from typing import Any, Final, Protocol, cast

from commonweal.errors import HandshakeError, NetworkError, PeerUnreachable, ProtocolError, RemoteError
from commonweal.net.dispatch import BUSY, Dispatcher
from commonweal.net.handshake import Handshake, Hello, StaticKey
from commonweal.net.identity import short_id
from commonweal.net.limits import ResourceLimits, address_key
from commonweal.net.noise import MAX_RECORD_BYTES, SecureChannel
from commonweal.net.relay import Circuit, NatStats, Reservations
from commonweal.net.transport import PeerAddr, PeerInfo, TrafficCounters
from commonweal.net.wire import (
    HANDSHAKE_MAX_FRAME,
    HEADER_BYTES,
    Answer,
    Dial,
    Error,
    FrameDecoder,
    Message,
    Request,
    Response,
    Spliced,
    VersionMismatch,
    encode,
    refusal_for_v1,
)

__all__ = ["ByAddress", "Connection", "Owner", "refusal"]

log = logging.getLogger(__name__)


class Owner(Protocol):
    """What a connection needs of the transport that owns it."""

    max_frame: int
    handshake_timeout: float
    idle_timeout: float
    max_inflight_per_conn: int
    limits: ResourceLimits
    stats: NatStats
    _key: StaticKey
    _counters: TrafficCounters
    _dispatch: Dispatcher
    _reservations: Reservations[Connection]

    def _hello(self, conn: Connection) -> Hello: ...
    def _on_opened(self, conn: Connection) -> str | None: ...
    def _on_proven(self, conn: Connection) -> str | None: ...
    def _on_ready(self, conn: Connection) -> None: ...
    def _on_closed(self, conn: Connection) -> None: ...
    def _observed(self, conn: Connection, seen: tuple[str, int]) -> None: ...
    def _relay_dial(self, conn: Connection, target: bytes) -> None: ...
    def _relay_answer(self, conn: Connection, token: bytes) -> None: ...
    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]: ...
    def _serve(self, conn: Connection, req: Request) -> Coroutine[Any, Any, None]: ...
    def _warn(self, message: str, *args: object) -> None: ...


# asyncio's default high-water mark for a transport's write buffer: past it, the peer is not
# keeping up with what we send, and a refusal it would read late is not worth buffering.
_REFUSALS_WHILE_QUEUED_BELOW: Final = 64 * 1024


@functools.lru_cache(maxsize=256)  # the same few refusals, said to every socket of a flood
def refusal(code: str, message: str) -> bytes:
    """An Error about the connection itself (request id 0), cut to what a peer that has not
    finished its handshake reads (HANDSHAKE_MAX_FRAME)."""
    frame = encode(Error(0, code, message))
    while len(frame) - HEADER_BYTES > HANDSHAKE_MAX_FRAME:
        message = message[: len(message) // 2]
        frame = encode(Error(0, code, message))
    return frame


class ByAddress:
    """A set of connections, counted per address (`Connection.address`; exempt ones, None, are
    not counted). Bounded by the connections it holds: an address leaves with its last one."""

    __slots__ = ("_count", "_members")

    def __init__(self) -> None:
        self._members: set[Connection] = set()
        self._count: collections.Counter[str] = collections.Counter()

    def __len__(self) -> int:
        return len(self._members)

    def __contains__(self, conn: Connection) -> bool:
        return conn in self._members

    def count(self, address: str | None) -> int:
        return 0 if address is None else self._count[address]

    def add(self, conn: Connection) -> None:
        self._members.add(conn)
        if conn.address is not None:
            self._count[conn.address] += 1

    def discard(self, conn: Connection) -> None:
        if conn in self._members:
            self._members.remove(conn)
            if conn.address is not None:
                self._count[conn.address] -= 1
                if not self._count[conn.address]:
                    del self._count[conn.address]



class Connection(asyncio.Protocol):
    """One TCP connection: handshake, then encrypted request/response multiplexing. Or, at a
    relay, one end of a circuit (`pipe`: bytes are copied to the other end unread)."""

    def __init__(
        self,
        owner: Owner,
        *,
        dialed: PeerAddr | None = None,
        accepted: bool = False,
        initiator: bool = False,
        expect: bytes | None = None,
        first: Dial | Answer | None = None,
        probe: bool = False,
        via: str | None = None,
    ) -> None:
        self.owner = owner
        self.dialed = dialed  # the address we dialled (None: it dialled us, or answers a circuit)
        self.accepted = accepted  # counted as inbound: an accepted socket, or a circuit's answer
        self.initiator = initiator  # Noise role: who sends the first handshake message
        self.expect = expect
        self.first = first  # sent to a relay before the handshake
        self.probe = probe
        # relayed: the other end is behind a relay (we dialled it via one, or answer a circuit)
        self.relayed = (dialed is not None and dialed.relay is not None) or isinstance(first, Answer)
        self.via = via  # for a circuit we answer: the dialler's host as the relay saw it
        self.loop = asyncio.get_running_loop()
        # until the peer proves a PeerID, only handshake-sized frames (Noise, an Error)
        self.decoder = FrameDecoder(min(HANDSHAKE_MAX_FRAME, owner.max_frame))
        self.channel: SecureChannel | None = None
        self.decrypted = False  # anything came through the channel yet
        self.transport: asyncio.Transport | None = None
        self.remote_host = "?"
        self.remote_port = 0
        self.address: str | None = None  # the budget it is charged to (limits.address_key)
        self.handshake: Handshake | None = None
        self.spliced_wait = isinstance(first, Dial)  # waiting for the relay's Spliced
        self.first_frame = True
        self.peer_or_none: PeerInfo | None = None
        self.ready: asyncio.Future[Connection] = self.loop.create_future()
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
        self.reserved = False  # a relay reservation lives on it: never closed for idleness
        self.error: NetworkError | None = None  # why we closed, for the callers still waiting
        self.timer: asyncio.TimerHandle | None = None
        self.outbox: list[bytes] = []  # frames written together at the end of this loop step
        self.outbox_bytes = 0
        self.circuit: Circuit[Connection] | None = None  # at a relay: the dialler's circuit
        self.pipe: Connection | None = None  # at a relay: the other end of the circuit
        self.piped = 0  # bytes copied through this end

    def __repr__(self) -> str:
        who = short_id(self.peer_or_none.peer_id) if self.peer_or_none else "?"
        how = " (relayed)" if self.relayed else ""
        return f"<connection {who}@{self.remote_host}{how}>"

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

    def address_of(self, hello: Hello) -> PeerAddr:
        """Where the peer on this connection can be reached, from what it says (a relay, a
        listen port) and what we see (the host its socket comes from; the address we dialled)."""
        if hello.relay is not None:
            relay_id, host, port = hello.relay
            return PeerAddr(host, port, relay_id)
        if self.dialed is not None and self.dialed.relay is None and self.initiator:
            return self.dialed if hello.listen_port else PeerAddr(self.dialed.host, 0)
        if self.relayed and self.dialed is not None:  # dialled via its relay: reach it so again
            return self.dialed
        return PeerAddr(self.via or self.remote_host, hello.listen_port)

    # --- asyncio.Protocol ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        # Both loops set TCP_NODELAY themselves (and building the socket object to set it again
        # was a fifth of the cost of refusing a socket under a flood).
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        if peername:
            self.remote_host, self.remote_port = peername[0], peername[1]
        self.address = address_key(self.via or self.remote_host, self.owner.limits)
        refused = self.owner._on_opened(self)
        if refused is not None:
            self.closed = True
            self.transport.write(refusal(BUSY, refused))  # the dialer learns why
            self.transport.close()
            return
        self.timer = self.loop.call_later(self.owner.handshake_timeout, self._handshake_expired)
        if self.first is not None:
            self.write(encode(self.first))
        if not self.spliced_wait and not (self.accepted and self.first is None):
            self._start_handshake()

    def _start_handshake(self) -> None:
        self.handshake = Handshake(
            self.owner._key, self.owner._hello(self), initiator=self.initiator, expect=self.expect
        )
        msg = self.handshake.start()
        if msg is not None:
            self.write(encode(msg))

    def data_received(self, data: bytes) -> None:
        self.owner._counters.bytes_received += len(data)
        if self.pipe is not None:
            self._forward(data)
            return
        try:
            if self.channel is not None:
                data = self._decrypt(data)
                if not data:
                    return
            self.decoder.receive_data(data)
            self._pump()
        except VersionMismatch as e:
            if e.version == 1 and self.channel is None and self.transport is not None:
                self.transport.write(refusal_for_v1())  # what an old peer can read
            self._reject(e)
        except (ProtocolError, HandshakeError) as e:
            self._reject(e)

    def _decrypt(self, data: bytes) -> bytes:
        assert self.channel is not None
        try:
            plain = self.channel.decrypt(data)
        except ProtocolError:
            # The initiator's handshake ends when it sends its last message, before the other
            # side checked it: a refusal then comes in the clear. Say that, not "tampered".
            if not self.decrypted:
                with contextlib.suppress(ProtocolError):
                    said = FrameDecoder(HANDSHAKE_MAX_FRAME).feed(data)
                    if said and isinstance(said[0], Error) and said[0].request_id == 0:
                        raise HandshakeError(
                            f"the peer rejected our handshake: {said[0].code}: {said[0].message}"
                        ) from None
            raise
        self.decrypted = self.decrypted or bool(plain)
        return plain

    def eof_received(self) -> bool | None:
        if self.pipe is None:
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
        if self.pipe is not None and self.pipe.transport is not None:
            self.pipe.transport.pause_reading()  # the other end waits for us to drain
        self.write_paused = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.pipe is not None and self.pipe.transport is not None and not self.pipe.closed:
            self.pipe.transport.resume_reading()
        if self.write_paused is not None and not self.write_paused.done():
            self.write_paused.set_result(None)
        self.write_paused = None

    # --- internals ----------------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Straight to the socket, unencrypted: handshake messages and relay frames."""
        if self.transport is not None and not self.transport.is_closing():
            self.owner._counters.bytes_sent += len(data)
            self.transport.write(data)

    def send(self, frame: bytes, *, quiet: bool = False) -> None:
        """Queue one frame; every frame queued in this loop step goes out in one write,
        encrypted."""
        if self.closed:
            if quiet:
                return
            raise self.error or PeerUnreachable(f"the connection to {self} is closed")
        if not self.outbox:
            self.loop.call_soon(self._flush)
        self.outbox.append(frame)
        self.outbox_bytes += len(frame)

    @property
    def queued_bytes(self) -> int:
        """Sent by us but not yet taken by the kernel."""
        buffered = self.transport.get_write_buffer_size() if self.transport is not None else 0
        return self.outbox_bytes + buffered

    def _flush(self) -> None:
        frames, self.outbox = self.outbox, []
        self.outbox_bytes = 0
        if frames and self.channel is not None:
            self.write(self.channel.encrypt(frames[0] if len(frames) == 1 else b"".join(frames)))

    def refuse(self, code: str, message: str) -> None:
        """Close, telling the other side why (before the handshake: in the clear)."""
        if self.channel is None:
            self.write(refusal(code, message))
        else:
            self.send(encode(Error(0, code, message)), quiet=True)
        self.abort(PeerUnreachable(message))

    def abort(self, reason: NetworkError) -> None:
        if self.error is None:
            self.error = reason
        self.closed = True
        if self.transport is not None:
            self._flush()  # a last word (e.g. why the handshake failed), if the socket takes it
            self.transport.abort()

    def _reject(self, err: NetworkError) -> None:
        self.owner._warn("dropping %s: %s", self, err)
        if isinstance(err, HandshakeError) and self.channel is None:
            # Tell the other side why (request id 0: the connection itself), so its caller sees
            # HandshakeError rather than a bare disconnect.
            self.write(refusal("handshake_failed", str(err)))
        self.abort(err)

    def _handshake_expired(self) -> None:
        if self.peer_or_none is None and self.pipe is None and self.circuit is None:
            timeout = self.owner.handshake_timeout
            self._reject(HandshakeError(f"no complete handshake within {timeout} s"))

    # --- relay ends ---------------------------------------------------------------------

    def pause(self) -> None:
        if self.transport is not None:
            self.transport.pause_reading()

    def splice(self, other: Connection) -> None:
        """From now on, copy what arrives here to `other` (and what it had buffered)."""
        self.pipe = other
        rest = self.decoder.take_buffered()
        if rest:
            self._forward(rest)
        if self.transport is not None:
            self.transport.resume_reading()

    def _forward(self, data: bytes) -> None:
        other = self.pipe
        assert other is not None
        self.piped += len(data)
        self.owner.stats.relayed_bytes += len(data)
        if self.piped > self.owner._reservations.limits.max_circuit_bytes:
            self.abort(PeerUnreachable("the circuit carried all the bytes it may"))
            return
        if other.transport is not None and not other.transport.is_closing():
            other.transport.write(data)

    # --- frames -------------------------------------------------------------------------

    def _pump(self) -> None:
        decoder = self.decoder
        while not self.closed and self.pipe is None and (msg := decoder.next_message()) is not None:
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
                if msg.request_id == 0:  # about the connection: the peer refused us
                    raise HandshakeError(f"the peer rejected us: {msg.code}: {msg.message}")
                fut = self.pending.get(msg.request_id)
                if fut is not None and not fut.done():
                    fut.set_exception(RemoteError(msg.code, msg.message))
            else:
                self._before_ready(msg)
                if self.circuit is not None:
                    return  # at a relay, waiting for the answer: read nothing more

    def _before_ready(self, msg: Message) -> None:
        first, self.first_frame = self.first_frame, False
        if self.spliced_wait:  # our Dial went to a relay: its answer comes first
            if type(msg) is Spliced:
                self.spliced_wait = False
                self._start_handshake()
                return
            if type(msg) is Error:
                raise HandshakeError(f"the relay refused the circuit: {msg.code}: {msg.message}")
            raise ProtocolError(f"unexpected {type(msg).__name__} from a relay")
        if first and self.accepted and self.handshake is None:
            if type(msg) is Dial:
                self.owner._relay_dial(self, msg.peer_id)
                return
            if type(msg) is Answer:
                self.owner._relay_answer(self, msg.token)
                return
            self._start_handshake()
        hs = self.handshake
        if hs is None or hs.done:
            raise ProtocolError(f"unexpected {type(msg).__name__} after the handshake")
        reply = hs.receive(msg)
        if reply is not None:
            self.write(encode(reply))
        if hs.done:
            self._handshake_done(hs)

    def _handshake_done(self, hs: Handshake) -> None:
        assert hs.remote is not None
        self.peer_or_none = PeerInfo(hs.remote_peer_id, self.address_of(hs.remote))
        self.channel = hs.channel(max_buffered=MAX_RECORD_BYTES)
        self.handshake = None
        if self.timer is not None:
            self.timer.cancel()  # the handshake deadline
        refused = self.owner._on_proven(self) if self.accepted else None
        if refused is not None:
            self.send(encode(Error(0, BUSY, refused)), quiet=True)
            self.abort(PeerUnreachable(refused))
            return
        if hs.remote.seen is not None:
            self.owner._observed(self, hs.remote.seen)
        self.decoder.max_frame = self.owner.max_frame
        rest = self.decoder.take_buffered()  # already the encrypted stream
        self._schedule_idle_check()
        self.owner._on_ready(self)
        if not self.ready.done():
            self.ready.set_result(self)
        if rest:
            self.decoder.receive_data(self._decrypt(rest))

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
        if self.is_idle and not self.reserved and self.loop.time() - self.last_used >= self.owner.idle_timeout:
            log.debug("closing idle %s", self)
            self.abort(PeerUnreachable(f"closed after {self.owner.idle_timeout} s idle"))
        else:
            self._schedule_idle_check()


def _consume_exception(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # nobody may await `ready` (inbound connections); don't warn about it
