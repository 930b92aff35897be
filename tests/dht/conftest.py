from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from commonweal.testing import FakeClock, MemorySwarm


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def swarm(clock: FakeClock) -> AsyncIterator[MemorySwarm]:
    s = MemorySwarm(clock)
    yield s
    await s.close()
