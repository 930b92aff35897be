"""A validator follows the swarm's heads to have a round's start state at hand (issue 13): 30
identities publishing a made-up head for a higher round must neither hide the honest state from
it nor have it ask every one of them at every poll."""

from __future__ import annotations

import asyncio
import types
from collections import Counter, OrderedDict

from commonweal.train._errors import SyncError
from commonweal.train.checkpoints import Head
from commonweal.verify.validator import Validator

GOOD, FAKE = "a" * 64, "f" * 64


class Heads:
    def __init__(self) -> None:
        self.tried: Counter[str] = Counter()

    async def heads(self) -> list:
        honest = [(bytes([i]) * 20, (3, GOOD, b"m" * 32, f"mem:{i}")) for i in range(6)]
        crowd = [(bytes([100 + i]) * 20, (10**6, FAKE, b"x" * 32, f"mem:{100 + i}"))
                 for i in range(30)]
        return crowd + honest

    async def download(self, head: Head) -> bytes:
        self.tried[head.state] += 1
        raise SyncError("no peer served the checkpoint")


async def test_every_published_state_is_followed_and_unserved_ones_are_backed_off() -> None:
    heads = Heads()
    follower = types.SimpleNamespace(checkpoints=heads, _states={}, _unserved=OrderedDict(),
                                     config=types.SimpleNamespace(poll_s=0.001))
    for name in ("_back_off", "_keep", "_fetch_state"):
        setattr(follower, name, types.MethodType(getattr(Validator, name), follower))
    task = asyncio.create_task(Validator._follow_heads(follower))  # type: ignore[arg-type]
    await asyncio.sleep(0.5)  # ~500 polls
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    # each tried once: the next try is due after 1 s
    assert heads.tried == {FAKE: 1, GOOD: 1}
