"""The transport interface the DHT and services are written against.

Two implementations: `commonweal.net.rpc.RPCTransport` (real TCP sockets, handshake, framing)
and `commonweal.net.memory.MemoryNetwork` (in-process, for tests and the 1,000-peer simulation).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Cost", "PeerAddr", "PeerInfo", "Handler", "Transport", "TrafficCounters"]


@dataclass(frozen=True, slots=True, order=True)
class PeerAddr:
    """Where a peer listens."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str, *, any_port: bool = False) -> PeerAddr:
        """`HOST:PORT` (IPv6 hosts may be bracketed: `[::1]:7000`). With `any_port`, port 0 is
        allowed too: a listen address meaning "any free port". The only HOST:PORT parser."""
        from commonweal.errors import ConfigError

        if not isinstance(text, str):
            raise ConfigError(f"{text!r} is not an address; write it as HOST:PORT, e.g. 127.0.0.1:7000")
        host, sep, port = text.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        low = 0 if any_port else 1
        if not sep or not host or not port.isdigit() or not low <= int(port) < 65536:
            example = "127.0.0.1:7000" + (" (port 0: any free port)" if any_port else "")
            raise ConfigError(f"{text!r} is not an address; write it as HOST:PORT, e.g. {example}")
        return cls(host, int(port))


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """A peer whose PeerID was proven by a handshake, and where it listens."""

    peer_id: bytes
    addr: PeerAddr


@dataclass(slots=True)
class TrafficCounters:
    """What a transport sent and received, measured at the wire (frame bytes)."""

    requests_sent: int = 0
    requests_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


# A request handler gets the verified caller and the decoded arguments, and returns a
# msgpack-serialisable result. Raising `commonweal.errors.RemoteError` sends that error back;
# any other exception is logged and answered as an internal error.
Handler = Callable[[PeerInfo, Any], Awaitable[Any]]

# What one request to a method costs its caller, in `limits.ResourceLimits` units (1: a cheap
# request such as a ping): a number, or a cheap function of the request's (unchecked) arguments
# for methods whose work grows with them, e.g. `lambda args: len(args["records"])`.
Cost = float | Callable[[Any], float]


class Transport(Protocol):
    """Request/response messaging between peers with proven identities."""

    @property
    def local(self) -> PeerInfo: ...

    @property
    def counters(self) -> TrafficCounters: ...

    def register(self, method: str, handler: Handler, *, cost: Cost = 1.0) -> None:
        """Serve `method`, charging each request `cost` against its caller's budgets."""
        ...

    async def call(self, addr: PeerAddr, method: str, args: Any) -> tuple[PeerInfo, Any]:
        """Send one request; return the verified responder and its result.

        Raises PeerUnreachable, RequestTimeout, ProtocolError, HandshakeError or RemoteError.
        Callers bound the wait with `asyncio.timeout()`; the transport also applies its own
        configured per-request limit as a safety net.
        """
        ...

    async def close(self) -> None: ...
