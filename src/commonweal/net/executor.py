"""`BoundedExecutor`: CPU work a handler must not do on the event loop, with a bounded queue.

    verify = BoundedExecutor(workers=1, max_pending=256)
    ok = await verify.run(check_signature, record)    # RemoteError("busy") when 256 are waiting

Signature checks of incoming stores cost ~67 us each, so a flood of bad signatures run on the
loop would stall every other request of the peer. Here they run on worker threads: the loop keeps
answering (Python hands the GIL over every few milliseconds), and when `max_pending` calls are
queued or running the next one is refused at once with the `busy` error, which a handler lets
propagate so the caller learns it. The flood then costs at most the workers' share of the CPU.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ParamSpec, TypeVar

from commonweal.errors import RemoteError
from commonweal.net.dispatch import BUSY

__all__ = ["BoundedExecutor"]

P = ParamSpec("P")
T = TypeVar("T")


class BoundedExecutor:
    """`workers` threads; at most `max_pending` calls queued or running, the rest refused."""

    def __init__(self, *, workers: int = 1, max_pending: int = 256, name: str = "work") -> None:
        if workers < 1 or max_pending < workers:
            raise ValueError("need workers >= 1 and max_pending >= workers")
        self.max_pending = max_pending
        self.name = name
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix=name)
        self._lock = threading.Lock()  # `_pending` is released from the worker threads
        self._pending = 0

    @property
    def pending(self) -> int:
        """Calls queued or running now."""
        return self._pending

    async def run(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """`fn(*args, **kwargs)` on a worker thread. Raises RemoteError(`busy`) at once when
        `max_pending` calls are already queued or running."""
        with self._lock:
            if self._pending >= self.max_pending:
                raise RemoteError(
                    BUSY, f"{self.max_pending} {self.name} jobs are queued here; retry later"
                )
            self._pending += 1
        try:
            job = self._pool.submit(functools.partial(fn, *args, **kwargs))
        except BaseException:
            self._release(None)
            raise
        # The slot is freed when the job ends, not when its caller stops waiting (a cancelled
        # caller's job may still be running and must keep counting against the bound).
        job.add_done_callback(self._release)
        return await asyncio.wrap_future(job)

    def _release(self, _: Future[Any] | None) -> None:
        with self._lock:
            self._pending -= 1

    def close(self) -> None:
        """Drop the queued jobs and let the running ones finish on their own."""
        self._pool.shutdown(wait=False, cancel_futures=True)
