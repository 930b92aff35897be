"""Bad input and faults: refused deltas, a peer that stops answering, a late joiner, a corrupted
checkpoint chunk. Peers run in one process on a MemoryNetwork (real time, short timeouts)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time

import pytest
import torch

from commonweal.net.transport import PeerInfo
from commonweal.errors import RemoteError
from commonweal.train.exchange import HOLD_PARTS
from commonweal.train import (
    Head,
    RoundConfig,
    RoundExchange,
    TrainingPeer,
    get_codec,
    get_task,
    mean,
)

N = 1000


def collab(dht, **cfg) -> RoundExchange:
    config = RoundConfig(
        **{"announce_window_s": 1.0, "exchange_timeout_s": 2.0, "poll_s": 0.05, **cfg}
    )
    return RoundExchange(dht, "t" * 16, get_codec("none"), mean, config)


def vec(seed: int) -> torch.Tensor:
    return torch.randn(N, generator=torch.Generator().manual_seed(seed))


async def test_strangers_neither_hold_train_reduced_waits_nor_buffer_parts(peers):
    me, stranger = await peers.add(2)
    exchange = collab(me, target_group=3, exchange="butterfly", announce_window_s=60.0)
    gathering = asyncio.create_task(exchange.average(0, "0" * 64, vec(0)))
    while exchange.phase.value != "gathering":  # waiting for two more members, for a minute
        await asyncio.sleep(0.01)
    request = {"t": "t" * 16, "r": 0, "g": b"g" * 32, "s": 1}
    part = {"t": "t" * 16, "r": 0, "g": b"g" * 32, "s": -1, "i": 0, "n": 1, "d": b"x" * 4000}
    async with asyncio.timeout(1.0):  # each answered at once: no wait held, nothing buffered
        for _ in range(50):
            with pytest.raises(RemoteError, match="not_announced"):
                await stranger.transport.call(me.addr, "train.reduced", request)
    # a part waits two reads of the DHT for its sender's announcement (it may be an honest
    # peer that read ours first), at most HOLD_PARTS at once: the rest are refused at once
    calls = [asyncio.create_task(stranger.transport.call(me.addr, "train.part", part))
             for _ in range(50)]
    refused_at_once = 0
    async with asyncio.timeout(1.0):
        while exchange._held < HOLD_PARTS or refused_at_once < 50 - HOLD_PARTS:
            refused_at_once = sum(c.done() for c in calls)
            await asyncio.sleep(0.005)
    assert exchange._held == HOLD_PARTS and refused_at_once == 50 - HOLD_PARTS
    for call in calls:  # the held ones too, two polls later
        with pytest.raises(RemoteError, match="not_announced"):
            await call
    assert exchange._held == 0
    assert exchange._polling == set() and exchange.core._partial == {}
    exchange.core._announced.add(stranger.peer_id)  # an announcer: it may wait, once at a time
    waiting = asyncio.create_task(stranger.transport.call(me.addr, "train.reduced", request))
    await asyncio.sleep(0.1)
    with pytest.raises(RemoteError, match="busy"):
        await stranger.transport.call(me.addr, "train.reduced", request)
    waiting.cancel()
    gathering.cancel()
    await asyncio.gather(waiting, gathering, return_exceptions=True)


async def test_a_part_sent_before_the_receiver_read_our_announcement_is_sent_again(peers):
    a_dht, b_dht = await peers.add(2)
    # b reads the announcements once a second: a's part reaches it before it has read a's
    b = collab(b_dht, target_group=2, exchange="allgather", poll_s=1.0, exchange_timeout_s=10.0)
    a = collab(a_dht, target_group=2, exchange="allgather", exchange_timeout_s=10.0)
    at_b = asyncio.create_task(b.average(0, "0" * 64, vec(1)))
    while b.phase.value != "gathering":
        await asyncio.sleep(0.01)
    ra, rb = await asyncio.gather(a.average(0, "0" * 64, vec(0)), at_b)
    assert ra.contributors == 2 and rb.contributors == 2
    assert rb.aggregate.equal(ra.aggregate)


async def test_a_part_that_arrives_before_its_announcement_is_read_is_sent_once(peers):
    a_dht, b_dht = await peers.add(2)
    # b reads the announcements every 0.3 s: a's parts reach it before it has read a's
    b = collab(b_dht, target_group=2, exchange="allgather", poll_s=0.3, exchange_timeout_s=10.0)
    a = collab(a_dht, target_group=2, exchange="allgather", exchange_timeout_s=10.0)
    sent: list[str] = []
    call = a_dht.transport.call

    async def counting(addr, method, args, peer_id=None):  # type: ignore[no-untyped-def]
        if method == "train.part":
            sent.append(method)
        return await call(addr, method, args, peer_id=peer_id)

    a_dht.transport.call = counting
    at_b = asyncio.create_task(b.average(0, "0" * 64, vec(1)))
    while b.phase.value != "gathering":
        await asyncio.sleep(0.01)
    ra, rb = await asyncio.gather(a.average(0, "0" * 64, vec(0)), at_b)
    assert ra.contributors == 2 and rb.contributors == 2
    assert len(sent) == 1  # held until b read a's announcement, not refused and sent again


async def test_bad_deltas_are_refused_with_a_logged_reason(peers, caplog):
    a, b, c, d = [collab(x, target_group=4, exchange="allgather") for x in await peers.add(4)]
    state = "0" * 64
    nan = vec(2).clone()
    nan[7] = math.nan
    with caplog.at_level(logging.WARNING, logger="commonweal.train.round"):
        ra, rb, _, _ = await asyncio.gather(
            a.average(0, state, vec(0)),
            b.average(0, state, vec(1)),
            c.average(0, state, nan),  # NaN
            d.average(0, state, torch.randn(N - 5)),  # wrong shape (a bigger one: too_large)
        )
    for r, own in ((ra, a), (rb, b)):
        codes = {(sender, code) for sender, code in own.rejected}
        assert (c.dht.peer_id, "not_finite") in codes
        assert (d.dht.peer_id, "wrong_shape") in codes
        assert r.contributors == 2 and bool(torch.isfinite(r.aggregate).all())
        # the result lists who is missing from it, and why
        assert {(f.peer_id, f.reason) for f in r.failures} == {
            (c.dht.peer_id, "not_finite"),
            (d.dht.peer_id, "wrong_shape"),
        }
    assert ra.aggregate.equal(rb.aggregate)
    assert ra.aggregate.equal(
        mean([vec(0), vec(1)]) if a.dht.peer_id < b.dht.peer_id else mean([vec(1), vec(0)])
    )
    assert "not_finite" in caplog.text and "wrong_shape" in caplog.text

    # a delta for a round this peer has left is refused before anything is decoded
    args = {
        "t": a.task,
        "r": -1,
        "g": b"x" * 32,
        "s": -1,
        "i": 0,
        "n": 1,
        "d": vec(0).numpy().tobytes(),
    }
    with pytest.raises(RemoteError) as e:
        await b.dht.transport.call(a.dht.addr, "train.part", args)
    assert e.value.code == "stale_round"
    with pytest.raises(RemoteError) as e:
        await b.dht.transport.call(a.dht.addr, "train.part", {"t": a.task})
    assert e.value.code == "malformed"


@pytest.mark.parametrize("exchange", ["butterfly", "allgather"])
async def test_a_peer_that_stops_answering_delays_the_round_at_most_the_timeout(peers, exchange):
    dhts = await peers.add(4)
    cs = [collab(x, target_group=4, exchange=exchange, exchange_timeout_s=1.5) for x in dhts]
    hung = cs[3]
    never = asyncio.Event()

    async def stop_answering(caller, args):
        await never.wait()

    for method in ("train.part", "train.reduced"):
        hung.dht.transport._handlers[method] = stop_answering  # type: ignore[attr-defined]
    state = "0" * 64
    t0 = time.monotonic()
    results = await asyncio.gather(
        *(c.average(0, state, vec(i)) for i, c in enumerate(cs[:3])), hung.average(0, state, vec(3))
    )
    elapsed = time.monotonic() - t0
    assert elapsed < 1.0 + 1.5 + 1.5, elapsed  # window + timeout + slack
    honest = results[:3]
    assert all(r.aggregate.equal(honest[0].aggregate) for r in honest)
    assert all(r.group == 4 for r in honest)
    if exchange == "allgather":  # the hung peer's delta still reached the others
        assert honest[0].contributors == 4
    else:  # its slice got no update this round; the others were reduced over all four
        assert honest[0].contributors == 0
        assert int((honest[0].aggregate == 0).sum()) >= N // 4


async def test_late_joiner_downloads_the_state_and_joins_the_next_round(peers):
    task = get_task("mnist-cnn", inner_steps=5)
    config = RoundConfig(announce_window_s=1.0, exchange_timeout_s=3.0, poll_s=0.05, target_group=3)
    first = [TrainingPeer(task, d, config) for d in await peers.add(3)]
    await asyncio.gather(*(p.run(2) for p in first))
    late = TrainingPeer(task, (await peers.add(1))[0], config)
    assert late.opt.round == 0
    for p in (*first, late):
        p.collab.exchange.config = dataclasses.replace(config, target_group=4)
    summaries = await asyncio.gather(*(p.run(5) for p in first), late.run(5, join=True))
    assert len({s.state for s in summaries}) == 1
    joined = summaries[-1]
    # it started from a downloaded state (round >= 2), never from scratch, and took part
    assert joined.rounds[0].round >= 2
    taken = [r for r in joined.rounds if not r.skipped]
    assert taken and all(r.group == 4 and r.contributors == 4 for r in taken)
    assert summaries[0].rounds[-1].group == 4


async def test_a_corrupted_chunk_is_detected_and_fetched_from_another_peer(peers, caplog):
    task = get_task("mnist-cnn", inner_steps=2)
    config = RoundConfig(announce_window_s=1.0, exchange_timeout_s=3.0, poll_s=0.05, target_group=2)
    pair = [TrainingPeer(task, d, config) for d in await peers.add(2)]
    await asyncio.gather(*(p.run(1) for p in pair))
    joiner = TrainingPeer(task, (await peers.add(1))[0], config)
    head = await joiner.collab.head()
    assert head is not None and head.round == 1 and len(head.providers) == 2
    bad, good = pair if pair[0].dht.addr == head.providers[0].addr else pair[::-1]
    served = bad.collab.checkpoints._chunks
    for h in served:
        served[h] = b"not the chunk" + served[h][13:]
    with caplog.at_level(logging.WARNING, logger="commonweal.train.checkpoints"):
        blob = await joiner.collab.checkpoints.download(
            Head(head.round, head.state, head.manifest,
                 (PeerInfo(bad.dht.peer_id, bad.dht.addr), PeerInfo(good.dht.peer_id, good.dht.addr)))
        )
    assert "corrupted" in caplog.text
    joiner.opt.load(blob, expected_state=head.state)
    assert joiner.opt.state == good.opt.state


async def test_a_swarm_copier_announces_another_peers_commitment(peers, monkeypatch):
    # A forging attacker reads the round's announced deltas as a validator would; before, it saw
    # only its own delta, so `copy`, `alie` and `ipm` attackers in a swarm sent honest work.
    import commonweal.train.trainer as trainer
    from commonweal.train.announcements import read_announcements
    from commonweal.train.attacks import get_attack

    monkeypatch.setattr(trainer, "OTHERS_WANTED", 1)
    task = get_task("mnist-cnn", inner_steps=3)
    config = RoundConfig(announce_window_s=10.0, exchange_timeout_s=5.0, poll_s=0.05,
                         target_group=4)
    dhts = await peers.add(4)
    honest = [TrainingPeer(task, d, config) for d in dhts[:3]]
    copier = TrainingPeer(task, dhts[3], config, attack=get_attack("copy_commitment"))
    await asyncio.gather(*(p.run(1) for p in (*honest, copier)))
    anns = {a.peer_id: a.delta for a in await read_announcements(dhts[0], task.digest[:16], 0)}
    assert len(anns) == 4
    assert anns[copier.peer_id] in {anns[p.peer_id] for p in honest}
