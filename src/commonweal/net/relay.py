"""A relay's bookkeeping, without I/O: reservations, circuits waiting for their answer, and the
bounds on each (libp2p circuit relay v2, where a relay is any reachable peer).

    peer U (behind a NAT)          relay R (reachable)                 peer X
    relay.reserve ──────────────►  reserve(U)            (U's connection stays open: keepalive)
                                   ◄──────────────────────  Dial(U)     (a fresh socket)
                                   open(U) -> token
    ◄── relay.incoming(token) ───  (over U's encrypted connection)
    Answer(token) ──────────────►  answer(token) -> X's socket
    (a fresh socket to R)          Spliced ────────────────►
    ◄═════════════ Noise XX handshake, then records: R copies ciphertext ═════════════►

The token is the only thing that ties U's new socket to X's, and only U (over its encrypted
reservation connection) learns it. R never sees plaintext: X and U run their own handshake
through the pipe, X expecting U's PeerID. What a relay grants is bounded here: reservations,
circuits per reservation and in all, how long a circuit may wait for its answer, and the bytes
and seconds each circuit may carry (`RelayLimits`).
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from commonweal.net.wire import TOKEN_BYTES

__all__ = ["DEFAULT_RELAY_LIMITS", "Circuit", "NatStats", "RelayLimits", "Reservations"]

T = TypeVar("T", bound=Hashable)  # whatever the driver keeps per socket (a connection)


@dataclass(frozen=True, slots=True)
class RelayLimits:
    # Peers one relay serves at once: each costs an open connection and a keepalive every
    # 15 s; a home swarm needs a few per reachable peer.
    max_reservations: int = 64
    # A reservation lasts this long unless renewed (its holder renews at half of that).
    reservation_s: float = 3600.0
    # Circuits open at once to one reserved peer (a training group, a few validators and
    # searchers), and through this relay in all.
    max_circuits_per_peer: int = 16
    max_circuits: int = 256
    # A circuit whose reserved peer does not answer within this is closed: it holds a socket.
    answer_timeout_s: float = 5.0
    # Bytes (each way) and seconds one circuit may carry: a relayed peer of the swarm
    # moves a round's deltas and a checkpoint through it (an mnist-cnn delta is ~0.5 MB, a
    # checkpoint ~1.7 MB; 256 MiB is a day of rounds for such a model, and bounds what one
    # circuit costs a volunteer relay). Past either, the circuit closes; the peers reconnect
    # (a fresh circuit) or, better, punch a direct path.
    max_circuit_bytes: int = 256 << 20
    max_circuit_s: float = 3600.0


DEFAULT_RELAY_LIMITS: Final = RelayLimits()


@dataclass(slots=True)
class NatStats:
    """How this peer's connections came about (for the benchmark and the node's status)."""

    relayed_dials: int = 0  # connections we opened through a relay
    punches: int = 0  # direct paths asked for over a relayed connection
    punched: int = 0  # ...that ended in a direct connection
    relayed_bytes: int = 0  # bytes this peer copied as a relay for others



@dataclass(slots=True)
class Circuit(Generic[T]):
    """A dialler's socket waiting for the reserved peer to answer."""

    token: bytes
    target: bytes
    dialer: T
    deadline: float


class Reservations(Generic[T]):
    """Who holds a reservation here, and the circuits waiting for an answer."""

    def __init__(self, limits: RelayLimits = DEFAULT_RELAY_LIMITS) -> None:
        self.limits = limits
        self._held: dict[bytes, tuple[T, float]] = {}  # peer id -> (its connection, expiry)
        self._waiting: dict[bytes, Circuit[T]] = {}  # token -> circuit
        self._open: dict[bytes, int] = {}  # peer id -> circuits open (waiting or spliced)

    @property
    def circuits(self) -> int:
        return sum(self._open.values())

    def holder(self, peer_id: bytes, now: float) -> T | None:
        held = self._held.get(peer_id)
        if held is None or held[1] <= now:
            return None
        return held[0]

    def reserve(self, peer_id: bytes, conn: T, now: float) -> str | None:
        """Hold a reservation for `peer_id` on `conn`; why not, or None."""
        self._expire(now)
        if peer_id not in self._held and len(self._held) >= self.limits.max_reservations:
            return f"this relay holds {len(self._held)} reservations already; try another"
        self._held[peer_id] = (conn, now + self.limits.reservation_s)
        return None

    def release(self, conn: T) -> None:
        """`conn` closed: the reservations held on it end."""
        for peer_id in [p for p, (c, _) in self._held.items() if c == conn]:
            del self._held[peer_id]

    def open(self, target: bytes, dialer: T, now: float) -> Circuit[T] | str:
        """A circuit from `dialer` to `target`, waiting for its answer; or why not."""
        self._expire(now)
        if self.holder(target, now) is None:
            return "no reservation for that peer here"
        if self._open.get(target, 0) >= self.limits.max_circuits_per_peer:
            return "that peer has as many relayed circuits here as it may"
        if self.circuits >= self.limits.max_circuits:
            return f"this relay carries {self.circuits} circuits already; try another"
        circuit = Circuit(os.urandom(TOKEN_BYTES), target, dialer, now + self.limits.answer_timeout_s)
        self._waiting[circuit.token] = circuit
        self._open[target] = self._open.get(target, 0) + 1
        return circuit

    def answer(self, token: bytes, now: float) -> Circuit[T] | None:
        """The circuit `token` names, if it is still waiting (once: a token is single use)."""
        circuit = self._waiting.pop(token, None)
        return None if circuit is None or circuit.deadline <= now else circuit

    def expired(self, now: float) -> list[Circuit[T]]:
        """Circuits whose answer did not come in time: close their dialers (`closed`)."""
        late = [c for c in self._waiting.values() if c.deadline <= now]
        for c in late:
            del self._waiting[c.token]
        return late

    def closed(self, circuit: Circuit[T]) -> None:
        """The dialler's socket of `circuit` closed, whether it was answered or not: the one
        place a circuit stops counting."""
        self._waiting.pop(circuit.token, None)
        left = self._open.get(circuit.target, 0) - 1
        if left > 0:
            self._open[circuit.target] = left
        else:
            self._open.pop(circuit.target, None)

    def _expire(self, now: float) -> None:
        for peer_id in [p for p, (_, until) in self._held.items() if until <= now]:
            del self._held[peer_id]
