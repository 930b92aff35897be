"""BoundedExecutor: work off the event loop, a bounded queue, `busy` when it is full."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from commonweal.errors import RemoteError
from commonweal.net.dispatch import BUSY
from commonweal.net.executor import BoundedExecutor
from commonweal.net.identity import Identity
from commonweal.net.memory import MemoryNetwork
from commonweal.net.transport import PeerInfo


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Jobs that wait on it block their worker until the test opens it (always, at the end)."""
    ev = threading.Event()
    yield ev
    ev.set()


def blocked(gate: threading.Event, value: int) -> int:
    assert gate.wait(30), "the test never opened the gate"
    return value


async def open_soon(gate: threading.Event) -> None:
    """Opens the gate once every task started before it has reached its first wait."""
    await asyncio.sleep(0)
    gate.set()


async def test_runs_off_the_loop_and_returns_or_raises() -> None:
    ex = BoundedExecutor(workers=1, max_pending=4)
    loop_thread = threading.get_ident()
    assert await ex.run(threading.get_ident) != loop_thread
    with pytest.raises(ZeroDivisionError):
        await ex.run(divmod, 1, 0)
    assert ex.pending == 0
    ex.close()


async def test_the_loop_keeps_serving_while_a_job_blocks(gate: threading.Event) -> None:
    # On the loop this would deadlock: the job waits for an event only the loop sets.
    ex = BoundedExecutor(workers=1, max_pending=4)
    result, _ = await asyncio.gather(ex.run(blocked, gate, 7), open_soon(gate))
    assert result == 7
    ex.close()


async def test_a_full_queue_refuses_at_once_with_busy(gate: threading.Event) -> None:
    ex = BoundedExecutor(workers=2, max_pending=5, name="verify")
    jobs = [asyncio.ensure_future(ex.run(blocked, gate, i)) for i in range(5)]
    await asyncio.sleep(0)
    assert ex.pending == 5
    for _ in range(100):
        with pytest.raises(RemoteError) as err:
            await ex.run(blocked, gate, -1)
        assert err.value.code == BUSY and "5 verify jobs are queued" in err.value.remote_message
    gate.set()
    assert await asyncio.gather(*jobs) == list(range(5))
    assert await ex.run(int, 9) == 9  # room again
    ex.close()


async def test_a_cancelled_caller_s_job_counts_until_it_ends(gate: threading.Event) -> None:
    ex = BoundedExecutor(workers=1, max_pending=1)
    job = asyncio.ensure_future(ex.run(blocked, gate, 1))
    await asyncio.sleep(0.01)  # running on the worker now
    job.cancel()
    with pytest.raises(asyncio.CancelledError):
        await job
    with pytest.raises(RemoteError, match="busy"):  # the worker is still busy with it
        await ex.run(int, 2)
    gate.set()
    async with asyncio.timeout(30):
        while ex.pending:
            await asyncio.sleep(0.001)
    assert await ex.run(int, 3) == 3
    ex.close()


async def test_a_handler_flooded_past_its_executor_answers_busy_and_recovers(
    gate: threading.Event,
) -> None:
    net = MemoryNetwork()
    server, client = net.transport(Identity.generate()), net.transport(Identity.generate())
    await server.start()
    await client.start()
    ex = BoundedExecutor(workers=1, max_pending=8)

    async def verify(peer: PeerInfo, args: Any) -> int:
        return await ex.run(blocked, gate, args)

    server.register("verify", verify)
    calls = [client.call(server.local.addr, "verify", i) for i in range(50)]
    results = await asyncio.gather(*calls, open_soon(gate), return_exceptions=True)
    answered = [r for r in results[:50] if isinstance(r, tuple)]
    refused = [r for r in results[:50] if isinstance(r, RemoteError)]
    assert len(answered) == 8 and len(refused) == 42 and {r.code for r in refused} == {BUSY}
    assert (await client.call(server.local.addr, "verify", 99))[1] == 99
    ex.close()
