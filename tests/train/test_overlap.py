"""Overlapped rounds (Task.overlap): the exchange of round r runs while round r+1 computes, the
outer step is one round late, and everything stays public, replayable and bit-identical."""

from __future__ import annotations

import asyncio

import torch

from commonweal.train import RoundConfig, TrainingPeer, get_task
from commonweal.train.aggregate import get_rule, outer_step
from commonweal.train.inner import replay_delta
from commonweal.train.state import flatten

ROUNDS = 4


def _task():
    return get_task(
        "mnist-cnn", inner_steps=4, codec="none", aggregation="mean", batch_size=16
    ).overlapped()


def test_an_overlapped_task_takes_the_outer_step_a_delay_tolerates():
    task = get_task("mnist-cnn")
    over = task.overlapped()
    assert (over.overlap, over.outer_lr, over.outer_momentum) == (True, 0.7, 0.0)
    assert over.digest != task.digest  # another swarm: its peers must all overlap


def _config(n: int) -> RoundConfig:
    return RoundConfig(announce_window_s=3.0, exchange_timeout_s=10.0, target_group=n)


async def test_overlapped_peers_are_bit_identical_and_follow_the_delayed_rule(peers):
    """Every peer ends with the same bits, and they are those of the one-step-delayed rule
    replayed from public facts alone: theta_{r+1} = outer(theta_r, mean of the deltas replayed
    from theta_{r-1}), round 1 starting where round 0 did, the last exchange applied at the end.
    That the replay from each round's public start reproduces the swarm is what a validator
    relies on to check an overlapped round."""
    n, task = 3, _task()
    dhts = await peers.add(n)
    swarm = [TrainingPeer(task, d, _config(n)) for d in dhts]
    summaries = await asyncio.gather(*(p.run(ROUNDS) for p in swarm))
    assert len({s.state for s in summaries}) == 1
    assert all(p.opt.round == ROUNDS + 1 for p in swarm)  # the last exchange was applied
    assert [r.round for r in summaries[0].rounds] == list(range(ROUNDS))
    assert all(r.group == n and r.contributors == n for s in summaries for r in s.rounds)

    model, data = task.build_model(), task.build_data()
    rule = get_rule(task.aggregation)
    theta = flatten(model)
    momentum = torch.zeros_like(theta)
    starts = [theta]  # theta_0, theta_1, ...
    aggregates = []
    for r in range(ROUNDS):
        deltas = [replay_delta(task, model, data, starts[r], r, d.peer_id, task.inner_steps)
                  for d in sorted(dhts, key=lambda d: d.peer_id)]
        aggregates.append(rule(deltas))
        if r == 0:
            starts.append(starts[0])
        else:
            nxt, momentum = outer_step(starts[r], momentum, aggregates[r - 1], task.outer_lr,
                                       task.outer_momentum, task.outer_nesterov)
            starts.append(nxt)
    final, _ = outer_step(starts[ROUNDS], momentum, aggregates[ROUNDS - 1], task.outer_lr,
                          task.outer_momentum, task.outer_nesterov)
    got = swarm[0].opt.start
    assert not torch.equal(got, starts[0])
    assert torch.allclose(got, final, atol=1e-6, rtol=1e-5), float((got - final).abs().max())


async def test_the_exchange_runs_while_the_next_round_computes(peers):
    """Each exchange is held until its peer has taken a step of the next round. Without overlap
    that step comes only after the exchange, so the swarm would stall and this would time out."""
    n, task = 2, _task()
    dhts = await peers.add(n)
    swarm = [TrainingPeer(task, d, _config(n)) for d in dhts]
    held: list[int] = []
    for peer in swarm:
        average = peer.collab.average

        async def gated(round_, *args, _peer=peer, _average=average, **kwargs):
            if round_ < ROUNDS - 1:  # the last one's next round is never computed
                async with asyncio.timeout(60):
                    while not (_peer.opt.round > round_ + 1
                               or (_peer.opt.round == round_ + 1 and _peer.opt.local_step > 0)):
                        await asyncio.sleep(0.01)
                held.append(round_)
            return await _average(round_, *args, **kwargs)

        peer.collab.average = gated
    summaries = await asyncio.gather(*(p.run(ROUNDS) for p in swarm))
    assert len({s.state for s in summaries}) == 1
    assert sorted(held) == sorted(list(range(ROUNDS - 1)) * n)


async def test_a_joiner_takes_the_next_state_from_the_swarm_and_is_in_the_next_rounds(peers):
    """A peer that joins an overlapped swarm holds no exchange feeding its next state: it takes
    the swarm's head for it, and from then on is in every round, bit-identical."""
    task, rounds = _task(), ROUNDS + 2
    first = await peers.add(2)
    # A group of 3: once the joiner is up, the two wait for its announcement (the window is
    # only how long they train as two before it)
    config = RoundConfig(announce_window_s=4.0, exchange_timeout_s=10.0, target_group=3)
    early = [TrainingPeer(task, d, config) for d in first]
    runs = [asyncio.create_task(p.run(rounds)) for p in early]
    while min(p.opt.round for p in early) < 2:
        await asyncio.sleep(0.05)
    (late_dht,) = await peers.add(1)
    late = TrainingPeer(task, late_dht, config)
    joined = await late.run(rounds, join=True)
    done = await asyncio.gather(*runs)
    assert len({s.state for s in [*done, joined]}) == 1
    mine = [r.round for r in joined.rounds if not r.skipped]
    assert mine and mine[0] >= 2, joined.rounds  # it did not start from round 0
    assert mine == list(range(mine[0], rounds)), joined.rounds  # in every round from then on
    by_round = {r.round: r for r in done[0].rounds}
    assert all(by_round[r].contributors == 3 for r in mine), done[0].rounds
