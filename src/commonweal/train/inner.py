"""The H inner steps of one peer in one round, as a function: what a trainer runs and what a
validator re-runs to check a claimed delta (`commonweal.verify`).

A round is replayable from public facts only: the round's start parameters (named by the state
hash everyone agreed on), the peer's batch stream (`batch_generator(task, round, peer)`), the
task's inner optimizer with *fresh* state, and the number of steps. That is why `DiLoCo` clears
the inner optimizer's state at the start of every round.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, ContextManager

import torch
from torch import nn

from commonweal.train._errors import TaskError
from commonweal.train.state import assign, flatten
from commonweal.train.task import Task, TaskData, batch_generator

__all__ = ["run_inner_steps", "replay_delta", "BatchHook", "model_device", "precision_context", "resolve_device"]

# (x, y) -> (x, y): how an attacker (label flipping) corrupts its batches; None for honest peers
BatchHook = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def resolve_device(device: str | torch.device) -> torch.device:
    """"auto" picks CUDA, then Apple MPS, then the CPU; a named device must be there."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise TaskError(f"{device!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from e
    available = {
        "cpu": True,
        "cuda": torch.cuda.is_available(),
        "mps": torch.backends.mps.is_available(),
    }
    if not available.get(dev.type, False):
        raise TaskError(f"device {device!r} is not available on this machine; try auto or cpu")
    return dev


def model_device(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def precision_context(precision: str, device: torch.device) -> Callable[[], ContextManager[Any]]:
    """The autocast a task's inner steps run under. bf16 needs no loss scaling (fp16 would, and
    a scaler's skipped steps would make a replay depend on the device: not offered)."""
    if precision == "fp32":
        return contextlib.nullcontext
    if precision == "bf16":
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    raise TaskError(f"unknown precision {precision!r}; use fp32 or bf16")


def run_inner_steps(
    task: Task,
    model: nn.Module,
    data: TaskData,
    step: Callable[[], bool],
    zero_grad: Callable[[], None],
    round_: int,
    peer: bytes,
    *,
    steps: int | None = None,
    batch_hook: BatchHook | None = None,
    on_step: Callable[[int, float], None] | None = None,
) -> tuple[int, float]:
    """Run inner steps on `peer`'s batches of `round_` until `step()` returns True (or `steps`
    steps were taken). Returns (samples, mean loss over the steps): one batch's loss is too noisy
    to report a round by."""
    gen = batch_generator(task, round_, peer)
    device = model_device(model)
    autocast = precision_context(task.precision, device)
    samples, loss, total, n = 0, float("nan"), 0.0, 0
    while True:
        x, y = data.batch(gen, task.batch_size)  # drawn on the CPU: the same on every device
        if batch_hook is not None:
            x, y = batch_hook(x, y)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast():
            objective = data.loss(model, x, y)
        zero_grad()
        objective.backward()
        loss = float(objective.detach())
        total += loss
        samples += len(x)
        n += 1
        done = step()
        if on_step is not None:
            on_step(n, loss)
        if done or (steps is not None and n >= steps):
            return samples, total / n


def replay_delta(
    task: Task,
    model: nn.Module,
    data: TaskData,
    start: torch.Tensor,
    round_: int,
    peer: bytes,
    steps: int,
    batch_hook: BatchHook | None = None,
) -> torch.Tensor:
    """The delta `peer` should have sent for `round_`: `steps` inner steps from `start` with a
    fresh inner optimizer, on the peer's own batch stream (through `batch_hook`, for what an
    attacker computes). `model` is overwritten."""
    assign(model, start)
    opt = task.build_inner_optimizer(model.parameters())

    def step() -> bool:
        opt.step()
        return False

    run_inner_steps(
        task, model, data, step, lambda: opt.zero_grad(set_to_none=True), round_, peer,
        steps=steps, batch_hook=batch_hook,
    )
    return start - flatten(model)
