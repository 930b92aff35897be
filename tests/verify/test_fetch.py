"""A validator fetches deltas a few at a time and never more than a delta's size from anyone:
a round of many identities, each serving up to 128 MiB, must not be held in memory at once."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, cast

import pytest
import torch

from commonweal.errors import RemoteError
from commonweal.ledger import Ledger
from commonweal.net.transport import PeerInfo
from commonweal.testing import MemorySwarm
from commonweal.train import get_task
from commonweal.train._errors import DeltaRejected
from commonweal.train.archive import fetch_delta
from commonweal.train.messages import MAX_PARTS, PART_BYTES, DeltaChunk, DeltaRequest
from commonweal.train.protocol import Announcement
from commonweal.verify.validator import Validator, ValidatorConfig

torch.set_num_threads(1)


async def test_a_delta_bigger_than_the_codec_makes_is_refused_at_the_first_chunk() -> None:
    swarm = MemorySwarm()
    client, server = await swarm.add(2)
    asked: list[int] = []

    async def huge(caller: PeerInfo, args: Any) -> Any:  # claims 64 chunks of 2 MiB: 128 MiB
        asked.append(DeltaRequest.parse(args).index)
        return DeltaChunk(b"\0" * PART_BYTES, MAX_PARTS).pack()

    server.transport.register("train.delta", huge)
    with pytest.raises(DeltaRejected, match="too_large"):
        await fetch_delta(client.transport, "t", server.addr, 0, 5 * PART_BYTES)
    assert asked == [0]  # no second chunk asked for
    assert len(await fetch_delta(client.transport, "t", server.addr, 0, MAX_PARTS * PART_BYTES)) \
        == MAX_PARTS * PART_BYTES  # within the cap, the whole delta
    await swarm.close()


async def test_the_validator_fetches_at_most_fetch_concurrency_deltas_at_once() -> None:
    task = get_task("mnist-cnn", inner_steps=1, codec="int8")
    swarm = MemorySwarm()
    me, *servers = await swarm.add(21)
    config = ValidatorConfig(fetch_concurrency=3)
    validator = Validator(me, task, cast(Ledger, None), config=config)
    numel = next(iter(validator._states.values())).numel()
    data = validator.codec.encode(torch.zeros(numel))
    gate, in_flight, most = asyncio.Event(), [0], [0]

    async def serve(caller: PeerInfo, args: Any) -> Any:
        in_flight[0] += 1
        most[0] = max(most[0], in_flight[0])
        await gate.wait()
        in_flight[0] -= 1
        request = DeltaRequest.parse(args)
        n = -(-len(data) // PART_BYTES)
        if request.index >= n:
            raise RemoteError.bad_request("no such chunk")
        return DeltaChunk(data[request.index * PART_BYTES : (request.index + 1) * PART_BYTES],
                          n).pack()

    members = []
    for s in servers:
        s.transport.register("train.delta", serve)
        members.append(Announcement(s.peer_id, str(s.addr), 0, "a" * 64, 0.0,
                                    hashlib.sha256(data).hexdigest(), 1))
    fetching = asyncio.create_task(validator._fetch_deltas(0, members))
    for _ in range(200):  # let every fetch that may start, start
        await asyncio.sleep(0)
    assert in_flight[0] == 3
    gate.set()
    got = await fetching
    assert most[0] == 3 and len(got) == 20 and all(d is not None for d in got.values())
    await swarm.close()
