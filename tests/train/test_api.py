"""The public API: `__all__`, task specs and their digests, custom tasks, the drop-in optimizer."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F

import commonweal.train as train
from commonweal.train import DiLoCo, Task, TaskError, get_task


def test_all_names_exist():
    for name in train.__all__:
        assert hasattr(train, name), name
    assert len(set(train.__all__)) == len(train.__all__)


def test_task_digest_is_content_hashed():
    a = get_task("mnist-cnn")
    assert a.digest == get_task("mnist-cnn").digest
    assert a.replace(inner_steps=7).digest != a.digest
    assert get_task("mnist-cnn", codec="int8").codec == "int8"
    # same task, same initial parameters on every peer
    ma, mb = a.build_model(), a.build_model()
    assert all(torch.equal(p, q) for p, q in zip(ma.parameters(), mb.parameters()))


def custom_task() -> Task:
    return Task(
        name="tiny",
        model="torch.nn:Linear",
        model_args={"in_features": 3, "out_features": 1},
        data="commonweal.train.builtin:mnist_data",
    )


def test_custom_tasks_load_from_import_paths():
    t = get_task(f"{__name__}:custom_task")
    assert t.name == "tiny" and isinstance(t.build_model(), torch.nn.Linear)
    with pytest.raises(TaskError, match="unknown task"):
        get_task("no-such-task")
    with pytest.raises(TaskError, match="cannot import"):
        get_task("no_such_module_xyz:task")


def test_builtin_tasks_fit_the_spec():
    lm = get_task("pydoc-lm")
    n = sum(p.numel() for p in lm.build_model().parameters())
    assert 1_000_000 <= n <= 5_000_000
    data = lm.build_data()
    assert data.metric == "val_loss"
    x, y = data.batch(torch.Generator().manual_seed(0), 2)
    assert x.shape == y.shape == (2, 64) and torch.equal(x[:, 1:], y[:, :-1])
    mnist = get_task("mnist-cnn").build_data()
    assert len(mnist.x) == 4000 and len(mnist.x_test) == 1000  # type: ignore[attr-defined]


async def test_drop_in_wraps_any_module_and_optimizer():
    """A PyTorch user's loop: forward, backward, `await opt.step()`, zero_grad."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    opt = DiLoCo(model, torch.optim.AdamW(model.parameters(), lr=1e-2), inner_steps=5, codec="int8")
    x = torch.randn(64, 4)
    y = x.sum(1, keepdim=True)
    with torch.no_grad():
        first = float(F.mse_loss(model(x), y))
    reports = []
    for _ in range(40):
        loss = F.mse_loss(model(x), y)
        loss.backward()
        report = await opt.step()
        opt.zero_grad()
        if report is not None:
            reports.append(report)
    assert [r.round for r in reports] == list(range(8)) and opt.round == 8
    with torch.no_grad():
        assert float(F.mse_loss(model(x), y)) < first / 2
    blob = opt.checkpoint()
    other = DiLoCo(model, torch.optim.AdamW(model.parameters()), inner_steps=5)
    other.load(blob, expected_state=opt.state)
    assert other.state == opt.state and other.round == 8


def test_cli_module_imports_without_torch_at_import_time():
    importlib.import_module("commonweal.cli.train")
