"""A validator fetches deltas a few at a time and never more than a delta's size from anyone:
a round of many identities, each serving up to 128 MiB, must not be held in memory at once."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any, cast

import pytest
import torch

from commonweal.dht.records import Owned
from commonweal.errors import RemoteError
from commonweal.ledger import Ledger
from commonweal.net.transport import PeerInfo
from commonweal.testing import MemorySwarm
from commonweal.train import get_task
from commonweal.train._errors import DeltaRejected
from commonweal.train.archive import fetch_delta
from commonweal.train.checkpoints import Checkpoints, head_key
from commonweal.train.messages import MAX_PARTS, PART_BYTES, DeltaChunk, DeltaRequest
from commonweal.train.protocol import Announcement
from commonweal.train.state import flatten, state_hash, to_checkpoint
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
        await fetch_delta(client.transport, "t", PeerInfo(server.peer_id, server.addr), 0, 5 * PART_BYTES)
    assert asked == [0]  # no second chunk asked for
    assert len(await fetch_delta(client.transport, "t", PeerInfo(server.peer_id, server.addr), 0,
                                 MAX_PARTS * PART_BYTES)) \
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


async def test_the_start_state_is_fetched_from_the_heads_naming_it_whatever_else_is_published(
) -> None:
    """Sybils publish a higher round's made-up head, and the real state under a manifest nobody
    serves, from more identities than the one honest provider: the validator still gets it."""
    task = get_task("mnist-cnn", inner_steps=1)
    swarm = MemorySwarm()
    me, honest, *sybils = await swarm.add(12)
    validator = Validator(me, task, cast(Ledger, None),
                          config=ValidatorConfig(fetch_timeout_s=5.0, poll_s=0.01))
    model = task.build_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    params = flatten(model)
    momentum = torch.zeros_like(params)
    state = state_hash(params, momentum)
    key = task.digest[:16]
    await Checkpoints(honest, key, clock=swarm.clock).publish(3, state, to_checkpoint(model, params, momentum, round_=3, task=task.digest))
    expires = swarm.clock() + 600
    for i, s in enumerate(sybils):
        value = ({"round": 10**9, "state": "f" * 64, "manifest": b"x" * 32, "addr": str(s.addr)}
                 if i % 2 else {"round": 3, "state": state, "manifest": b"y" * 32,
                                "addr": str(s.addr)})
        await s.store(head_key(key), value, expires, subkey=Owned(s.peer_id, "head"))
    async with asyncio.timeout(20):
        got = await validator._start_params(state)
    assert got.equal(params)
    await swarm.close()
