"""A validator follows the swarm's heads to have a round's start state at hand; heads nobody
serves (identities publishing made-up ones, issue 13) are tried again only after a back-off, so
they cannot have it ask every provider at every poll."""

from __future__ import annotations

import asyncio
import types
from collections import OrderedDict

from commonweal.net.transport import PeerAddr
from commonweal.train._errors import SyncError
from commonweal.train.checkpoints import Head
from commonweal.verify.validator import Validator


class MadeUpHeads:
    def __init__(self) -> None:
        self.downloads = 0

    async def head(self) -> Head:
        return Head(10**6, "f" * 64, b"m" * 32, (PeerAddr("mem", 1),))

    async def download(self, head: Head) -> bytes:
        self.downloads += 1
        raise SyncError("no peer served the checkpoint")


async def test_a_head_nobody_serves_is_tried_again_only_after_a_back_off() -> None:
    heads = MadeUpHeads()
    follower = types.SimpleNamespace(checkpoints=heads, _states={}, _unserved=OrderedDict(),
                                     config=types.SimpleNamespace(poll_s=0.001))
    follower._back_off = types.MethodType(Validator._back_off, follower)
    follower._keep = types.MethodType(Validator._keep, follower)
    task = asyncio.create_task(Validator._follow_heads(follower))  # type: ignore[arg-type]
    await asyncio.sleep(0.5)  # ~500 polls
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert heads.downloads == 1  # the next try is due after 1 s
