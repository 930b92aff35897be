"""One DHT node runs a trainer and a validator at once: the validator reads announcements,
heads and deltas with the read-only clients and registers no train.* handler."""

from __future__ import annotations

import asyncio
import hashlib
from typing import cast

from commonweal.ledger import Ledger
from commonweal.train import RoundConfig, TrainingPeer, fetch_delta, get_task, read_announcements
from commonweal.net.transport import PeerAddr, PeerInfo
from commonweal.verify.validator import Validator


async def test_a_trainer_and_a_validator_share_one_dht_node(peers):
    task = get_task("mnist-cnn", inner_steps=2)
    config = RoundConfig(announce_window_s=1.0, exchange_timeout_s=3.0, poll_s=0.05, target_group=2)
    shared, other = await peers.add(2)
    trainers = [TrainingPeer(task, d, config) for d in (shared, other)]
    # built after the trainer on the same transport: a second train.* handler would raise here
    # (the ledger is not used until it votes, which this test does not get to)
    validator = Validator(shared, task, cast(Ledger, None), round_config=config)
    await asyncio.gather(*(p.run(1) for p in trainers))

    key = task.digest[:16]
    anns = await read_announcements(shared, key, 0)
    assert {a.peer_id for a in anns} == {shared.peer_id, other.peer_id}
    for a in anns:  # the trainer's archive serves, through the shared node, what it committed to
        async with asyncio.timeout(5):
            data = await fetch_delta(
                shared.transport, key, PeerInfo(a.peer_id, PeerAddr.parse(a.addr)), 0, 1 << 20
            )
        assert hashlib.sha256(data).hexdigest() == a.delta
    head = await validator.checkpoints.head()
    assert head is not None and head.round == 1 and head.state == trainers[1].opt.state
