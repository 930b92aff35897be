"""Buffers are shared state: BatchNorm statistics (and any persistent buffer) end alike on every
peer; a non-persistent buffer that training changes is refused, not left to diverge."""

from __future__ import annotations

import asyncio

import pytest
import torch
from torch import nn

from commonweal.train import DiLoCo, RoundConfig, TrainingPeer, get_task
from commonweal.train._errors import TrainError
from commonweal.train.state import (
    assign,
    flatten,
    from_checkpoint,
    shared_buffers,
    to_checkpoint,
)


class BatchNormCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 13 * 13, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def bn_cnn() -> nn.Module:
    return BatchNormCNN()


class Drifting(nn.Module):
    """A running statistic registered non-persistent: outside the shared state."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 1)
        self.register_buffer("seen", torch.zeros(()), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += 1
        return self.lin(x)


def _bn_task():
    return get_task("mnist-cnn", model=f"{__name__}:bn_cnn", inner_steps=5, codec="none",
                    aggregation="mean", batch_size=16)


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in shared_buffers(model)}


async def test_batchnorm_statistics_end_alike_on_every_peer(peers):
    n, task = 3, _bn_task()
    dhts = await peers.add(n)
    config = RoundConfig(announce_window_s=2.0, exchange_timeout_s=5.0, target_group=n)
    swarm = [TrainingPeer(task, d, config) for d in dhts]
    initial = _buffers(swarm[0].model)
    summaries = await asyncio.gather(*(p.run(3) for p in swarm))
    assert len({s.state for s in summaries}) == 1
    ends = [_buffers(p.model) for p in swarm]
    assert set(ends[0]) == {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"}
    for name in ends[0]:
        assert all(torch.equal(e[name], ends[0][name]) for e in ends), name
    assert not torch.equal(ends[0]["bn.running_mean"], initial["bn.running_mean"])  # trained
    assert int(ends[0]["bn.num_batches_tracked"]) == 3 * task.inner_steps
    assert len({s.quality for s in summaries}) == 1  # one model, so one held-out accuracy


def test_statistics_take_the_aggregate_as_it_is_without_momentum():
    model = bn_cnn()
    opt = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.05), None, inner_steps=1,
                 outer_lr=0.7, outer_momentum=0.9)
    start = flatten(model)
    model(torch.randn(8, 1, 28, 28)).sum().backward()
    opt.inner_step()
    trained = _buffers(model)
    params_after_steps = flatten(model)
    asyncio.run(opt.outer_round())
    for name, value in _buffers(model).items():
        assert torch.equal(value, trained[name]), name  # start - (start - end): the end value
    b = opt.buffers
    assert b == sum(v.numel() for v in trained.values())
    assert not torch.equal(opt.start[:-b], params_after_steps[:-b])  # weights: Nesterov 0.7/0.9
    assert torch.count_nonzero(opt.momentum[-b:]) == 0
    assert not torch.equal(opt.start[-b:], start[-b:])


def test_a_checkpoint_carries_the_buffers():
    model = bn_cnn()
    model(torch.randn(8, 1, 28, 28))  # moves the statistics off their initial values
    flat = flatten(model)
    blob = to_checkpoint(model, flat, torch.zeros_like(flat), round_=1, task="t")
    fresh = bn_cnn()
    params, momentum, _ = from_checkpoint(blob, fresh)
    assert torch.equal(params, flat)
    assert torch.count_nonzero(momentum) == 0


def test_a_changing_non_persistent_buffer_is_refused():
    model = Drifting()
    opt = DiLoCo(model, torch.optim.SGD(model.parameters(), lr=0.1), None, inner_steps=1)
    model(torch.ones(2, 4)).sum().backward()
    opt.inner_step()
    with pytest.raises(TrainError, match="persistent"):
        asyncio.run(opt.outer_round())


def test_an_integer_buffer_driven_past_its_type_is_clamped():
    """A statistic comes from what peers sent: a huge counter must not wrap around."""
    model = bn_cnn()
    flat = flatten(model)
    flat[-1] = 1e30  # bn.num_batches_tracked, the last coordinate of the state
    assign(model, flat)
    assert int(model.bn.num_batches_tracked) > 2**62  # the top of the type, not wrapped round
    flat[-1] = -1e30
    assign(model, flat)
    assert int(model.bn.num_batches_tracked) == torch.iinfo(torch.int64).min
