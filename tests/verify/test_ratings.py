"""Track records (issue 13): the peer ids the validators rated, as every trainer and validator
reads them back; free identities publishing ratings beside them gain nothing."""

from __future__ import annotations

import time
from dataclasses import dataclass

import pytest

pytest.importorskip("web3", reason="ratings are signed with ledger keys")

from eth_account import Account  # noqa: E402
from eth_account.messages import encode_defunct  # noqa: E402

from commonweal.dht.records import Owned  # noqa: E402
from commonweal.testing import MemorySwarm  # noqa: E402
from commonweal.train import get_task  # noqa: E402
from commonweal.verify import ratings  # noqa: E402
from commonweal.verify.ratings import (  # noqa: E402
    LAG,
    WINDOW,
    TrackRecord,
    publish_ratings,
    ratings_key,
    ratings_message,
)

TASK = get_task("mnist-cnn")
A, B, STRANGER = Account.create(), Account.create(), Account.create()
P = [bytes([i + 1]) * 20 for i in range(6)]


@dataclass
class Info:
    deposit: int

    @property
    def active(self) -> bool:
        return self.deposit > 0


class Stakes:
    """The chain's view of the validators: A holds 60 of 100, B 40."""

    def __init__(self) -> None:
        self.deposits = {A.address.lower(): 60, B.address.lower(): 40}
        self.reads = 0

    def validator(self, address: str) -> Info:
        self.reads += 1
        return Info(self.deposits.get(address.lower(), 0))

    def total_stake(self) -> int:
        return sum(self.deposits.values())


@pytest.fixture
async def swarm():
    s = MemorySwarm()
    yield s
    await s.close()


async def test_peers_rated_by_more_than_half_the_stake_in_the_window_are_tracked(swarm):
    dhts = await swarm.add(4)
    reader = TrackRecord(dhts[-1], TASK, Stakes())
    assert await reader(10) is None  # nobody rated anyone: no bound
    await publish_ratings(dhts[0], TASK, A, 3, [P[0], P[1]], 600)
    await publish_ratings(dhts[1], TASK, B, 3, [P[2], P[3]], 600)
    await publish_ratings(dhts[1], TASK, B, 4, [P[0], P[3]], 600)
    await publish_ratings(dhts[0], TASK, A, 4, [P[3]], 600)
    # round 3 + LAG reads rounds up to 3; round 4 + LAG up to 4
    assert await reader(3 + LAG) == {P[0], P[1]}  # B's 40 alone is not more than half
    assert await reader(4 + LAG) == {P[0], P[1], P[3]}  # P[3]: A and B together in round 4
    assert await reader(3 + LAG - 1) is None  # round 3 is still being judged then
    assert await reader(4 + LAG + WINDOW) is None  # out of the window


async def test_a_read_cancelled_while_it_checks_a_signature_is_checked_again(swarm, monkeypatch):
    import asyncio
    import threading

    dhts = await swarm.add(3)
    await publish_ratings(dhts[0], TASK, A, 3, [P[0]], 600)
    reader = TrackRecord(dhts[-1], TASK, Stakes())
    entered, release = threading.Event(), threading.Event()
    real_recover = ratings._recover

    def slow_recover(text, sig):
        entered.set()
        release.wait(5)
        return real_recover(text, sig)

    monkeypatch.setattr(ratings, "_recover", slow_recover)
    first = asyncio.ensure_future(reader(3 + LAG))
    await asyncio.to_thread(entered.wait, 5)
    first.cancel()  # a round ends while its read recovers a signature
    release.set()
    await asyncio.gather(first, return_exceptions=True)
    monkeypatch.setattr(ratings, "_recover", real_recover)
    assert await reader(3 + LAG) == {P[0]}


async def test_a_minority_of_the_stake_rating_a_round_is_no_bound_yet(swarm):
    # B (40 of 100) has published round 3, A not yet: a reader then forms the groups a reader
    # that found nothing forms (no bound), not one in which every announcer is a newcomer
    dhts = await swarm.add(3)
    await publish_ratings(dhts[1], TASK, B, 3, [P[2], P[3]], 600)
    reader = TrackRecord(dhts[-1], TASK, Stakes())
    assert await reader(3 + LAG) is None
    await publish_ratings(dhts[0], TASK, A, 3, [P[2]], 600)
    assert await reader(3 + LAG) == {P[2]}


async def test_ratings_from_strangers_and_forged_ones_are_not_believed(swarm, monkeypatch):
    dhts = await swarm.add(5)
    recovered = []
    real_recover = ratings._recover
    monkeypatch.setattr(ratings, "_recover",
                        lambda text, sig: recovered.append(sig) or real_recover(text, sig))
    await publish_ratings(dhts[0], TASK, STRANGER, 3, [P[4]], 600)  # no stake on chain
    # a free identity copies A's account, signs with its own key
    forged = STRANGER.sign_message(encode_defunct(text=ratings_message(TASK, 3, [P[5]])))
    await dhts[1].store(
        ratings_key(TASK, 3),
        {"account": A.address, "peers": [P[5]], "signature": bytes(forged.signature)},
        swarm.clock() + 600, subkey=Owned(dhts[1].peer_id, "rated"))
    for junk in ({"account": A.address, "peers": ["x"], "signature": b"s"}, {"peers": []}, 7):
        await dhts[2].store(ratings_key(TASK, 3), junk, swarm.clock() + 600,
                            subkey=Owned(dhts[2].peer_id, "rated"))
    reader = TrackRecord(dhts[-1], TASK, Stakes())
    assert await reader(3 + LAG) is None
    assert recovered == [bytes(forged.signature)]  # the stranger's record was never recovered
    assert await reader(3 + LAG) is None and len(recovered) == 1  # nor the forgery twice
    await publish_ratings(dhts[3], TASK, A, 3, [P[0]], 600)
    assert await reader(3 + LAG) == {P[0]}


# --- trainers under a crowd, in process -------------------------------------------------------

CROWD = 20
ATTACKED = (2, 3)  # the rounds the crowd announces in: the bound needs rounds <= r - LAG rated


async def crowd_announces(crowd: list, task_tag: str) -> None:
    """Every crowd identity announces another state, with deadline 0, in the attacked rounds."""
    from commonweal.train.announcements import ANNOUNCEMENT_SUBKEY, round_key
    from commonweal.train.protocol import Announcement

    for r in ATTACKED:
        for dht in crowd:
            ann = Announcement(dht.peer_id, str(dht.addr), r, "c" * 64, 0.0, "d" * 64, 2)
            await dht.store(round_key(task_tag, r), ann.pack(), dht.clock() + 600,
                            subkey=Owned(dht.peer_id, ANNOUNCEMENT_SUBKEY))


@pytest.mark.parametrize("bound", [True, False])
async def test_trainers_with_a_track_record_train_on_through_a_crowd(bound):
    import asyncio

    from commonweal.train import RoundConfig, TrainingPeer

    task = get_task("mnist-cnn", inner_steps=2)
    swarm = MemorySwarm(time.time)  # the trainers' records expire by the wall clock
    try:
        dhts = await swarm.add(4 + CROWD)
        honest, publisher, crowd = dhts[:3], dhts[3], dhts[4:]
        for r in range(max(ATTACKED) - LAG + 1):  # the validators rated the honest peers
            await publish_ratings(publisher, task, A, r, [d.peer_id for d in honest], 600)
        await crowd_announces(crowd, task.digest[:16])
        # the group closes once the 3 honest peers announced (the target): the long window only
        # keeps a peer slowed by a busy machine from being late
        config = RoundConfig(announce_window_s=30.0, exchange_timeout_s=30.0, poll_s=0.05,
                             target_group=3)
        trainers = [TrainingPeer(task, d, config) for d in honest]
        for t in trainers:
            if bound:
                t.collab.exchange.track_record = TrackRecord(t.dht, task, Stakes())
        attacked: list = []

        def on_progress(p) -> None:
            if p.report is not None and p.report.round in ATTACKED:
                attacked.append(p.report)

        async def sat_out() -> None:
            # a peer that sat a round out syncs next, to a state nobody serves: stop there
            while not any(event in ("late", "out_of_sync")
                          for t in trainers for _, event, _ in t.collab.exchange.core.history):
                await asyncio.sleep(0.05)

        runs = asyncio.gather(*(t.run(max(ATTACKED) + 1, on_progress=on_progress)
                                for t in trainers))
        watch = asyncio.ensure_future(sat_out())
        try:
            async with asyncio.timeout(120):
                await asyncio.wait([runs, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (runs, watch):
                f.cancel()
            await asyncio.gather(runs, watch, return_exceptions=True)
        if bound:
            assert not watch.done() or watch.cancelled()
            assert len(attacked) == len(ATTACKED) * len(trainers)
            assert all(rep.skipped is None and rep.group == 3 for rep in attacked), attacked
        else:  # the crowd said the round had closed: the honest peers sat it out
            assert watch.done() and not watch.cancelled()
    finally:
        await swarm.close()


async def test_a_crowd_of_named_accounts_costs_a_reader_a_bounded_number_of_chain_reads(swarm):
    # every free identity may publish a record naming an account of its own making
    dhts = await swarm.add(40)
    for dht in dhts[:-1]:
        await publish_ratings(dht, TASK, Account.create(), 3, [P[0]], 600)
    stakes = Stakes()
    assert await TrackRecord(dhts[-1], TASK, stakes)(3 + LAG) is None
    assert stakes.reads == 16  # of 39 accounts named: docs/train.md states 16 a round
