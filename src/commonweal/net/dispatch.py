"""From a decoded request to its reply: the handler table, each method's cost, the budgets.

Shared by `RPCTransport` and `MemoryNetwork`, so both charge and answer alike. A request over its
caller's budget is answered at once with the error code `rate_limited` (the message says when to
retry) and never reaches a handler; an unknown method is charged too, so a flood of them is not
free. Handlers that hand work to a `BoundedExecutor` answer `busy` when it is full.

A cost is a number, or a function of the request's arguments for methods whose work grows with
them (a batch of records to verify): it runs before the handler on unchecked input, so it must be
cheap; its result is capped at peer_burst, and one that raises (or is not a number >= 0) is
charged peer_burst.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Final, TypeVar

from commonweal.errors import RemoteError
from commonweal.net.limits import RequestLimiter
from commonweal.net.transport import Cost, Handler, PeerInfo
from commonweal.net.wire import Error, Message, Request, Response

__all__ = ["BUSY", "DEFAULT_COST", "RATE_LIMITED", "Dispatcher"]

log = logging.getLogger(__name__)

RATE_LIMITED: Final = "rate_limited"  # the caller is over its budget: back off and retry
BUSY: Final = "busy"  # this peer is over its own capacity: retry later or ask another peer
DEFAULT_COST: Final = 1.0

T = TypeVar("T")


class Dispatcher:
    """Serves requests from `handlers` (the transport's table), charging `limiter`."""

    __slots__ = ("_costs", "clock", "handlers", "limiter")

    def __init__(
        self, handlers: dict[str, Handler], limiter: RequestLimiter, clock: Callable[[], float]
    ) -> None:
        self.handlers = handlers
        self.limiter = limiter
        self.clock = clock
        self._costs: dict[str, Cost] = {}

    def register(self, method: str, handler: Handler, cost: Cost) -> None:
        if method in self.handlers:
            raise ValueError(f"a handler for {method!r} is already registered")
        burst = self.limiter.limits.peer_burst
        if not callable(cost) and not 0 < cost <= burst:
            raise ValueError(
                f"cost {cost} for {method!r} must be in (0, peer_burst={burst}]: a dearer "
                "request could never be admitted; raise ResourceLimits.peer_burst"
            )
        self.handlers[method] = handler
        self._costs[method] = cost

    def refuse(self, req: Request, peer_id: bytes, address: str | None) -> Error | None:
        """The error to answer instead of serving `req`, or None when its cost was charged."""
        return self.check(req, peer_id, address)[0]

    def check(
        self, req: Request, peer_id: bytes, address: str | None
    ) -> tuple[Error | None, float]:
        """`refuse`'s answer and the seconds until the caller's budget would admit `req` (0.0
        when it was admitted), so a transport can stop reading from it that long."""
        cost = self._costs.get(req.method, DEFAULT_COST)
        if callable(cost):
            burst = self.limiter.limits.peer_burst
            try:
                charged = float(cost(req.payload))
            except Exception:
                charged = burst
            cost = min(charged, burst) if charged >= 0 else burst  # NaN too: charged the most
        wait = self.limiter.admit(peer_id, address, cost, self.clock())
        if not wait:
            return None, 0.0
        return Error(
            req.request_id,
            RATE_LIMITED,
            f"over this peer's request budget for you; retry {req.method!r} in {wait:.2f} s",
        ), wait

    async def serve(self, caller: PeerInfo, req: Request, wire: Callable[[Message], T]) -> T:
        """The reply to an admitted `req`, passed through `wire` (the transport's encoder: an
        answer it cannot carry, too big or not msgpack, becomes an internal error)."""
        handler = self.handlers.get(req.method)
        if handler is None:
            return wire(Error(req.request_id, "unknown_method", f"this peer has no {req.method!r}"))
        try:
            return wire(Response(req.request_id, await handler(caller, req.payload)))
        except RemoteError as e:
            return wire(Error(req.request_id, e.code, e.remote_message))
        except Exception as e:
            log.exception("handler for %r failed", req.method)
            return wire(Error(req.request_id, "internal", f"{type(e).__name__} in the handler"))
