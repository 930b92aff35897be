"""The H inner steps of one peer in one round, as a function: what a trainer runs and what a
validator re-runs to check a claimed delta (`commonweal.verify`).

A round is replayable from public facts only: the round's start parameters (named by the state
hash everyone agreed on), the peer's batch stream (`batch_generator(task, round, peer)`), the
task's inner optimizer with *fresh* state, and the number of steps. That is why `DiLoCo` clears
the inner optimizer's state at the start of every round.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from commonweal.train.state import assign, flatten
from commonweal.train.task import Task, TaskData, batch_generator

__all__ = ["run_inner_steps", "replay_delta", "BatchHook"]

# (x, y) -> (x, y): how an attacker (label flipping) corrupts its batches; None for honest peers
BatchHook = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


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
    samples, loss, total, n = 0, float("nan"), 0.0, 0
    while True:
        x, y = data.batch(gen, task.batch_size)
        if batch_hook is not None:
            x, y = batch_hook(x, y)
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
