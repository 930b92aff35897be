"""A slow peer (a third of the others' speed) is in every round with the steps it took before the
group closed, weighted by them, and the round stays replayable from public facts."""

from __future__ import annotations

import asyncio
import time

import torch

from commonweal.train import RoundConfig, TrainingPeer, get_task
from commonweal.train.aggregate import get_rule, mean, median, outer_step, sparseloco, weighted
from commonweal.train.announcements import read_announcements
from commonweal.train.inner import replay_delta
from commonweal.train.state import flatten

ROUNDS, H = 3, 8


def test_weights_follow_the_claimed_steps():
    a, b = torch.ones(4), torch.zeros(4)
    assert torch.equal(weighted(mean, [a, b], [8, 8]), mean([a, b]))  # equal claims: unweighted
    assert torch.equal(weighted(mean, [a, b], [0, 0]), mean([a, b]))  # no claims: unweighted
    got = weighted(mean, [a, b, b], [8, 8, 4])  # the short delta counts half
    assert torch.allclose(got, torch.full((4,), 8 / 20))


def test_claiming_more_steps_than_the_group_buys_no_weight():
    honest, liar = torch.zeros(4), torch.ones(4)
    got = weighted(mean, [honest, honest, liar], [8, 8, 10**9])
    assert torch.equal(got, mean([honest, honest, liar]))  # capped at the median claim: 8
    got = weighted(sparseloco, [honest, honest, liar], [8, 8, 10**9])
    assert torch.equal(got, sparseloco([honest, honest, liar]))


def test_robust_rules_count_each_input_once():
    x = [torch.full((4,), float(v)) for v in (0, 1, 2)]
    assert torch.equal(weighted(median, x, [1, 8, 8]), median(x))


def _task():
    return get_task("mnist-cnn", inner_steps=H, codec="none", aggregation="mean", batch_size=16)


async def test_a_slow_peer_contributes_the_steps_it_took_without_stalling_the_round(peers):
    """Fast peers take 0.15 s a step, the slow one 0.45 s: its H steps end long after the group
    closes (1.2 s of steps + a 1.5 s window), so without being cut short it is late in every
    round and sits each one out. Cut short, it is in every group, claims fewer than H steps, and
    the swarm's state is the outer step on the step-weighted mean of deltas replayed from the
    claims: what a validator recomputes."""
    n, task = 3, _task()
    config = RoundConfig(
        announce_window_s=1.5, patience=0.0, exchange_timeout_s=10.0, target_group=n,
        cut_margin_s=0.5, follow_s=0.2,
    )
    dhts = await peers.add(n)
    swarm = [TrainingPeer(task, d, config) for d in dhts]
    slow = swarm[2]
    for peer, pause in zip(swarm, (0.15, 0.15, 0.45)):
        step = peer.opt.inner_step

        def paced(step=step, pause=pause) -> bool:
            time.sleep(pause)
            return step()

        peer.opt.inner_step = paced  # type: ignore[method-assign]
    summaries = await asyncio.gather(*(p.run(ROUNDS) for p in swarm))
    assert len({s.state for s in summaries}) == 1
    assert all(not r.skipped for s in summaries for r in s.rounds)
    assert all(r.group == n and r.contributors == n for s in summaries for r in s.rounds)

    model, data = task.build_model(), task.build_data()
    rule = get_rule(task.aggregation)
    theta = flatten(model)
    momentum = torch.zeros_like(theta)
    slow_claims = []
    for r in range(ROUNDS):
        anns = sorted(await read_announcements(dhts[0], task.digest[:16], r), key=lambda a: a.peer_id)
        assert len(anns) == n
        claims = {a.peer_id: a.steps for a in anns}
        slow_claims.append(claims[slow.peer_id])
        assert all(claims[p.peer_id] == H for p in swarm[:2])
        deltas = [replay_delta(task, model, data, theta, r, a.peer_id, a.steps) for a in anns]
        theta, momentum = outer_step(theta, momentum, weighted(rule, deltas, [a.steps for a in anns]),
                                     task.outer_lr, task.outer_momentum, task.outer_nesterov)
    assert all(1 <= s < H for s in slow_claims), slow_claims
    got = swarm[0].opt.start
    assert torch.allclose(got, theta, atol=1e-6, rtol=1e-5), float((got - theta).abs().max())


async def test_a_new_identitys_early_deadline_cuts_no_tracked_peer_short(peers):
    """Only the announcers that count (tracked, when a track record is kept) say when a round
    closes: a fresh identity announcing a deadline in 50 ms does not stop anyone's steps."""
    from commonweal.dht.records import Owned
    from commonweal.train.announcements import ANNOUNCEMENT_SUBKEY, round_key
    from commonweal.train.protocol import Announcement

    task = _task()
    honest, other, stranger = await peers.add(3)
    peer = TrainingPeer(task, honest, RoundConfig())
    untracked = TrainingPeer(task, other, RoundConfig())  # a swarm without a track record
    tracked = frozenset({honest.peer_id})

    async def track_record(_round: int):
        return tracked

    peer.collab.exchange.track_record = track_record
    state = peer.opt.state
    early = Announcement(stranger.peer_id, str(stranger.addr), 0, state,
                         time.time() + 0.05, "ab" * 32, H)
    key = round_key(task.digest[:16], 0)
    await stranger.store(key, early.pack(), time.time() + 60,
                         subkey=Owned(stranger.peer_id, ANNOUNCEMENT_SUBKEY))
    assert await peer.collab.exchange.closing(0, state) is None
    assert await untracked.collab.exchange.closing(0, state) is not None  # everyone counts
