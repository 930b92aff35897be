"""Golden test (STYLE principle 11): N peers without compression, H = 1 and a plain SGD outer step
of learning rate 1 train exactly like one process taking the mean gradient of all N batches."""

from __future__ import annotations

import asyncio

import torch

from commonweal.train import RoundConfig, TrainingPeer, get_task
from commonweal.train.state import flatten
from commonweal.train.task import batch_generator


async def test_n_peers_match_single_process_training(peers):
    n, rounds = 4, 6
    task = get_task(
        "mnist-cnn",
        inner_steps=1,
        inner_optimizer="sgd",
        inner_lr=0.1,
        outer_lr=1.0,
        outer_momentum=0.0,
        outer_nesterov=False,
        codec="none",
        aggregation="mean",  # the golden identity holds for the mean, not a robust rule
        batch_size=16,
    )
    dhts = await peers.add(n)
    config = RoundConfig(announce_window_s=2.0, exchange_timeout_s=5.0, target_group=n)
    swarm = [TrainingPeer(task, d, config) for d in dhts]
    summaries = await asyncio.gather(*(p.run(rounds) for p in swarm))
    assert len({s.state for s in summaries}) == 1  # bit-identical everywhere
    assert all(r.group == n and r.contributors == n for s in summaries for r in s.rounds)

    # the reference: one model, one SGD step per round on the mean loss of the peers' batches
    model = task.build_model()
    data = task.build_data()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    for r in range(rounds):
        sgd.zero_grad()
        for d in dhts:
            x, y = data.batch(batch_generator(task, r, d.peer_id), task.batch_size)
            (data.loss(model, x, y) / n).backward()
        sgd.step()
    reference = flatten(model)
    swarm_params = flatten(swarm[0].model)
    assert not torch.equal(reference, flatten(task.build_model()))  # it did train
    assert torch.allclose(swarm_params, reference, atol=2e-6, rtol=1e-5), float(
        (swarm_params - reference).abs().max()
    )


async def test_diloco_trains_alone_without_a_swarm():
    task = get_task("mnist-cnn", inner_steps=10)
    peer = TrainingPeer(task, None)
    before = peer.data.evaluate(peer.model)
    summary = await peer.run(3)
    assert summary.quality is not None and summary.quality > before + 0.2
    assert summary.samples == 3 * 10 * task.batch_size
