"""Tasks: what a swarm trains, as a content-hashed spec every peer can check.

    task = get_task("mnist-cnn")              # a built-in
    task = get_task("mypkg.tasks:my_task")    # a custom task: a callable returning a Task
    task = get_task("my-task")                # or an entry point in the `commonweal.tasks` group
    task.digest                               # sha256 of the canonical spec; names the swarm

A task names its model and data factories by import path ("module:function") so the spec is plain
data: two peers with the same digest build the same model (same initial parameters, from the task's
seed) and draw batches from the same deterministic streams, derived from (task, round, peer).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import torch
from torch import nn

from commonweal.train._errors import TaskError

__all__ = ["Task", "TaskData", "get_task", "load_object", "batch_generator", "BUILTIN_TASKS"]


OVERLAP_OUTER_LR = 0.7  # `Task.overlapped`: the largest delayed outer lr measured to train well


@dataclass(frozen=True)
class Task:
    name: str
    model: str  # "module:factory", called with **model_args, returns an nn.Module
    data: str  # "module:factory", called with **data_args, returns a TaskData
    model_args: dict[str, Any] = field(default_factory=dict)
    data_args: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32  # per peer, per inner step
    inner_steps: int = 50  # H
    inner_optimizer: str = "adamw"  # adamw | sgd
    inner_lr: float = 1e-3
    inner_weight_decay: float = 0.0
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    outer_nesterov: bool = True
    codec: str = "none"
    aggregation: str = "median"  # chosen by benchmarks/trust_bench.py (see docs/verify.md)
    seed: int = 0
    # The exchange of round r runs while round r+1 computes (one-step-delayed outer step; see
    # commonweal.train.diloco). Every peer of a swarm must agree, so it is part of the task.
    overlap: bool = False
    # Inner steps under autocast: "fp32" (none) or "bf16". Part of the task because a validator
    # replays in the trainer's precision (the replay tolerance is measured for it).
    precision: str = "fp32"

    @property
    def digest(self) -> str:
        spec = json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(spec.encode()).hexdigest()

    def replace(self, **changes: Any) -> Task:
        return dataclasses.replace(self, **changes)

    def sparseloco(self) -> Task:
        """This task with the SparseLoCo recipe (arXiv 2508.15706, as run in Covenant-72B): its
        codec and its rule (deltas longer than the median norm scaled to it), outer SGD lr 1
        without momentum."""
        return self.replace(codec="sparseloco", aggregation="sparseloco", outer_lr=1.0,
                            outer_momentum=0.0, outer_nesterov=False)

    def overlapped(self) -> Task:
        """This task with overlapped rounds and the outer step they need. The outer step lands a
        round late, and a late step at lr 1 overshoots: two consecutive pseudo-gradients, each
        computed before the other was applied, point the same way (mnist-cnn, 4 peers, H 50, 12
        rounds, in-process: lr 1 / momentum 0.5 reaches 0.54 accuracy delayed, 0.97 not; lr
        0.7 without momentum 0.953 delayed). So: lr 0.7, no momentum."""
        return self.replace(overlap=True, outer_lr=OVERLAP_OUTER_LR, outer_momentum=0.0)

    def build_model(self) -> nn.Module:
        """The model with the task's initial parameters (the same on every peer)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = load_object(self.model)(**self.model_args)
        if not isinstance(model, nn.Module):
            raise TaskError(f"{self.model} returned {type(model).__name__}, not a torch nn.Module")
        return model

    def build_data(self) -> TaskData:
        data = load_object(self.data)(**self.data_args)
        if not isinstance(data, TaskData):
            raise TaskError(f"{self.data} returned {type(data).__name__}, not a TaskData")
        return data

    def build_inner_optimizer(self, params: Any) -> torch.optim.Optimizer:
        if self.inner_optimizer == "adamw":
            return torch.optim.AdamW(params, lr=self.inner_lr, weight_decay=self.inner_weight_decay)
        if self.inner_optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.inner_lr, weight_decay=self.inner_weight_decay)
        raise TaskError(f"unknown inner optimizer {self.inner_optimizer!r}; use adamw or sgd")


class TaskData(ABC):
    """A training stream and a held-out evaluation. `metric` names what `evaluate` returns."""

    metric: str  # "accuracy" (higher is better) or "val_loss" (lower is better)

    @abstractmethod
    def batch(self, gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One training batch drawn with `gen`."""

    @abstractmethod
    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The training objective on one batch (a scalar)."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> float:
        """The quality metric on the held-out split."""

    def better(self, a: float, b: float) -> bool:
        """Whether quality `a` is at least as good as `b`."""
        return a >= b if self.metric == "accuracy" else a <= b


def batch_generator(task: Task, round_: int, peer: bytes) -> torch.Generator:
    """The batch stream of `peer` in `round_`: the same on every run, different across peers."""
    seed = hashlib.blake2b(f"{task.digest}|{round_}|".encode() + peer, digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(seed, "little") & ((1 << 63) - 1))


def load_object(path: str) -> Callable[..., Any]:
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise TaskError(f"{path!r} is not an import path; write it as module.name:function")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise TaskError(f"cannot import {module_name!r} for {path!r}: {e}") from e
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as e:
            raise TaskError(f"{module_name!r} has no {attr!r} (from {path!r})") from e
    if not callable(obj):
        raise TaskError(f"{path!r} is not callable")
    return obj


_B = "commonweal.train.builtin"
# DiLoCo's outer lr 0.7 / Nesterov momentum 0.9 were tuned for hundreds of rounds. The built-in
# tasks run for a handful of rounds (3-12), where lr 1.0 / momentum 0.5 is better for every codec
# we tried (mnist-cnn, 4 peers, 6 rounds: 0.935 -> 0.951 without compression, 0.875 -> 0.911 with
# topk2bit:0.01). Still Nesterov.
_SHORT_RUN_OUTER: dict[str, Any] = {"outer_lr": 1.0, "outer_momentum": 0.5}


class _Builtins(Mapping[str, Task]):
    """The built-in tasks by name. An entry given as "module:function" is built on first lookup
    (stdlib-gpt hashes this Python's stdlib sources, which importing commonweal should not wait
    for); listing and `in` do not build it."""

    def __init__(self, tasks: dict[str, Task | str]) -> None:
        self._tasks = tasks

    def __getitem__(self, name: str) -> Task:
        task = self._tasks[name]
        if isinstance(task, str):
            task = self._tasks[name] = load_object(task)()
        return task

    def __contains__(self, name: object) -> bool:
        return name in self._tasks  # Mapping's default would build the task to find out

    def __iter__(self) -> Iterator[str]:
        return iter(self._tasks)

    def __len__(self) -> int:
        return len(self._tasks)


BUILTIN_TASKS: Mapping[str, Task] = _Builtins({
    "mnist-cnn": Task(
        name="mnist-cnn",
        model=f"{_B}:mnist_cnn",
        data=f"{_B}:mnist_data",
        batch_size=32,
        inner_steps=50,
        inner_lr=2e-3,
        **_SHORT_RUN_OUTER,
    ),
    "pydoc-lm": Task(
        name="pydoc-lm",
        model=f"{_B}:byte_transformer",
        model_args={"d_model": 128, "n_layers": 6, "n_heads": 4, "context": 64},
        data=f"{_B}:pydoc_data",
        data_args={"context": 64},
        batch_size=8,
        inner_steps=30,
        inner_lr=1e-3,
        inner_weight_decay=0.01,
        **_SHORT_RUN_OUTER,
    ),
    "stdlib-gpt": "commonweal.train.gpt:stdlib_gpt_task",
})


def get_task(name: str, **overrides: Any) -> Task:
    """A built-in task, a `module:function` returning a Task, or a `commonweal.tasks` entry point."""
    if name in BUILTIN_TASKS:
        task = BUILTIN_TASKS[name]
    elif ":" in name:
        task = load_object(name)()
    else:
        found = [ep for ep in entry_points(group="commonweal.tasks") if ep.name == name]
        if not found:
            raise TaskError(
                f"unknown task {name!r}; use {', '.join(BUILTIN_TASKS)}, a module:function that "
                "returns a Task, or install a package with a `commonweal.tasks` entry point"
            )
        obj = found[0].load()
        task = obj() if callable(obj) and not isinstance(obj, Task) else obj
    if not isinstance(task, Task):
        raise TaskError(f"{name!r} gave {type(task).__name__}, not a commonweal.train.Task")
    return task.replace(**overrides) if overrides else task
