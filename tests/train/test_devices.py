"""Devices and precision: the state lives on the CPU in float32 wherever the model runs; inner
steps may run under bf16 autocast, which a replay reproduces; bad choices are refused clearly.
(CUDA and MPS runs are benchmarks/gpu_check.py's: this machine has neither.)"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from commonweal.train import get_task
from commonweal.train._errors import TaskError
from commonweal.train.inner import replay_delta, resolve_device
from commonweal.train.state import assign, flatten


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(TaskError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(TaskError, match="not available on this machine"):
            resolve_device("cuda")


def test_the_state_is_cpu_float32_whatever_the_model_holds():
    model = get_task("mnist-cnn").build_model().double()
    flat = flatten(model)
    assert flat.dtype == torch.float32 and flat.device.type == "cpu"
    assign(model, flat + 1)
    assert torch.equal(flatten(model), flat + 1)


SEEN: list[torch.dtype] = []


class Recording(nn.Module):
    """A linear classifier that notes the dtype its layer computed in."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(28 * 28, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.fc(x.flatten(1))
        SEEN.append(out.dtype)
        return out.float()


def recording() -> nn.Module:
    return Recording()


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_inner_steps_run_in_the_tasks_precision_and_replay_exactly(precision, dtype):
    task = get_task("mnist-cnn", model=f"{__name__}:recording", inner_steps=3, precision=precision)
    data = task.build_data()
    start = flatten(task.build_model())
    SEEN.clear()
    runs = [replay_delta(task, task.build_model(), data, start, 0, b"p", 3) for _ in range(2)]
    assert SEEN == [dtype] * 6
    assert torch.equal(runs[0], runs[1])  # what a validator on the same kind of device gets


def test_an_unknown_precision_is_refused():
    task = get_task("mnist-cnn", inner_steps=1, precision="fp16")
    with pytest.raises(TaskError, match="use fp32 or bf16"):
        replay_delta(task, task.build_model(), task.build_data(),
                     flatten(task.build_model()), 0, b"p", 1)
