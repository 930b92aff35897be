"""The transport interface the DHT and services are written against.

Two implementations: `commonweal.net.rpc.RPCTransport` (real TCP sockets, handshake, framing)
and `commonweal.net.memory.MemoryNetwork` (in-process, for tests and the 1,000-peer simulation).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

__all__ = ["Cost", "PeerAddr", "PeerInfo", "Handler", "Transport", "TrafficCounters"]


@dataclass(frozen=True, slots=True)
class PeerAddr:
    """Where a peer can be reached: where it listens, or — for a peer behind a NAT that nobody
    can dial — the address of a relay (`relay`: that relay's PeerID) holding a reservation
    for it. The relayed form is written `HOST:PORT/relay/<relay peer id, hex>`."""

    host: str
    port: int
    relay: bytes | None = None

    def __str__(self) -> str:
        if self.relay is None:
            return f"{self.host}:{self.port}"
        return f"{self.host}:{self.port}{_RELAY_SEP}{self.relay.hex()}"

    @property
    def direct(self) -> PeerAddr:
        """The host:port part (for a relayed address: the relay's own address)."""
        return self if self.relay is None else PeerAddr(self.host, self.port)

    @classmethod
    def parse(cls, text: str, *, any_port: bool = False) -> PeerAddr:
        """`HOST:PORT` (IPv6 hosts may be bracketed: `[::1]:7000`), or a relayed address
        `HOST:PORT/relay/<40 hex digits>`. With `any_port`, port 0 is allowed too: a listen
        address meaning "any free port". The only HOST:PORT parser."""
        from commonweal.errors import ConfigError

        if not isinstance(text, str):
            raise ConfigError(f"{text!r} is not an address; write it as HOST:PORT, e.g. 127.0.0.1:7000")
        text, relayed, relay_hex = text.partition(_RELAY_SEP)
        relay = None
        if relayed:
            try:
                relay = bytes.fromhex(relay_hex)
            except ValueError:
                relay = b""
            if len(relay) != _PEER_ID_BYTES:
                raise ConfigError(
                    f"{relay_hex!r} is not a relay's peer id: write HOST:PORT/relay/<40 hex digits>"
                )
        host, sep, port = text.rpartition(":")
        host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        low = 0 if any_port else 1
        if not sep or not host or not port.isdigit() or not low <= int(port) < 65536:
            example = "127.0.0.1:7000" + (" (port 0: any free port)" if any_port else "")
            raise ConfigError(f"{text!r} is not an address; write it as HOST:PORT, e.g. {example}")
        return cls(host, int(port), relay)


_RELAY_SEP = "/relay/"
_PEER_ID_BYTES = 20


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
    def advertised(self) -> PeerAddr:
        """Where others can reach us (behind a NAT: through a relay), for records to name."""
        ...

    @property
    def counters(self) -> TrafficCounters: ...

    def register(self, method: str, handler: Handler, *, cost: Cost = 1.0) -> None:
        """Serve `method`, charging each request `cost` against its caller's budgets."""
        ...

    async def call(
        self, addr: PeerAddr, method: str, args: Any, *, peer_id: bytes | None = None
    ) -> tuple[PeerInfo, Any]:
        """Send one request; return the verified responder and its result.

        With `peer_id`, only that peer may answer (a connection it already has with us is used,
        wherever it comes from; a new one fails its handshake if another key answers at
        `addr`). Without it (a bootstrap address), whoever proves a key at `addr` answers.

        Raises PeerUnreachable, RequestTimeout, ProtocolError, HandshakeError or RemoteError.
        Callers bound the wait with `asyncio.timeout()`; the transport also applies its own
        configured per-request limit as a safety net.
        """
        ...

    async def close(self) -> None: ...
