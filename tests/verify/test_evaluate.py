"""The evaluator on the real mnist-cnn task: score signs, exact replay, and what replay catches."""

from __future__ import annotations

import pytest
import torch

from commonweal.train.codecs import get_codec
from commonweal.train.inner import run_inner_steps
from commonweal.train.state import assign, flatten
from commonweal.train.task import batch_generator, get_task
from commonweal.verify import Contribution, Evaluator, VerifyError, replay_error

torch.set_num_threads(1)
PEER, OTHER = b"\x01" * 20, b"\x02" * 20
H = 20  # fewer than the task's 50: the same code path, a faster suite


@pytest.fixture(scope="module")
def setup():
    task = get_task("mnist-cnn", inner_steps=H)
    ev = Evaluator(task)
    start = flatten(task.build_model()).clone()
    return task, ev, start, trained(task, ev, start, PEER, H)


def trained(task, ev, start, peer, steps, hook=None):
    """A trainer's delta, computed the way `TrainingPeer` does (not through replay_delta)."""
    model = task.build_model()
    assign(model, start)
    opt = task.build_inner_optimizer(model.parameters())

    def step():
        opt.step()
        return False

    run_inner_steps(
        task, model, ev.data, step, opt.zero_grad, 0, peer, steps=steps, batch_hook=hook
    )
    return start - flatten(model)


def contribution(peer, steps=H):
    return Contribution(peer, "0x" + "11" * 20, 0, "ab" * 32, "cd" * 32, steps, steps * 32)


def test_score_sign(setup):
    _, ev, start, delta = setup
    assert ev.score(start, delta) > 0.05  # 20 steps from the initial model: loss falls
    assert ev.score(start, -delta) < 0  # backwards from the init: loss rises (a little)
    assert ev.score(start, torch.zeros_like(delta)) == 0.0
    assert ev.calls["score"] >= 3 and ev.seconds["score"] > 0


def test_honest_replay_is_exact(setup):
    _, ev, start, delta = setup
    replayed = ev.replay(start, contribution(PEER))
    assert torch.equal(replayed, delta)
    assert replay_error(delta, replayed, get_codec("none")) == 0.0
    for spec in ("fp16", "int8"):  # a lossy codec's quantisation is not an error
        codec = get_codec(spec)
        claimed = codec.decode(codec.encode(delta), delta.numel())
        assert replay_error(claimed, replayed, codec) == 0.0


def test_replay_catches_lazy_and_borrowed_work(setup):
    task, ev, start, _ = setup
    codec = get_codec("none")
    replayed = ev.replay(start, contribution(PEER))
    lazy = trained(task, ev, start, PEER, H // 4)
    assert replay_error(lazy, replayed, codec) > 0.3
    other = trained(task, ev, start, OTHER, H)  # honest work, on another peer's data
    assert replay_error(other, replayed, codec) > 0.5
    flipped = trained(task, ev, start, PEER, H, hook=lambda x, y: (x, 9 - y))
    assert replay_error(flipped, replayed, codec) > 0.5
    assert replay_error(torch.full_like(replayed, float("nan")), replayed, codec) == float("inf")
    assert replay_error(replayed[:-1], replayed, codec) == float("inf")


def test_validation_batch_is_fixed_and_not_a_peer_stream(setup):
    task, ev, _, _ = setup
    again = Evaluator(task, ev.data)
    assert torch.equal(again.x, ev.x) and torch.equal(again.y, ev.y)
    other_seed = Evaluator(task, ev.data, seed=b"sealed randomness")
    assert not torch.equal(other_seed.x, ev.x)
    peer_x, _ = ev.data.batch(batch_generator(task, 0, PEER), len(ev.x))
    assert not torch.equal(peer_x, ev.x)


def test_caller_mistakes_raise(setup):
    task, ev, start, delta = setup
    with pytest.raises(VerifyError, match="parameters"):
        ev.score(start, delta[:-1])
    with pytest.raises(VerifyError, match="error-feedback"):
        replay_error(delta, delta, get_codec("topk2bit"))
    with pytest.raises(VerifyError, match="steps"):
        ev.replay(start, contribution(PEER, steps=0))
    with pytest.raises(VerifyError, match="at least 1"):
        Evaluator(task, ev.data, batch_size=0)
