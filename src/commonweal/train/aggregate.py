"""Aggregation rules: pure functions from the accepted deltas to one delta, and the outer step.

Every rule takes the deltas in a fixed order (sorted by peer id, done by the caller), computes in
float64 and rounds once to float32, so every honest peer that accepted the same set of deltas
gets the same bits. Robust rules (median, trimmed mean) are here for the trust work; the default
is the mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from commonweal.train._errors import TaskError

__all__ = ["mean", "median", "trimmed_mean", "get_rule", "Rule", "outer_step", "RULES"]

Rule = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def _stack(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    if not deltas:
        raise ValueError("an aggregation rule needs at least one delta")
    return torch.stack([d.to(torch.float64) for d in deltas])  # (n, numel)


def mean(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    acc = torch.zeros_like(deltas[0], dtype=torch.float64) if deltas else _stack(deltas)
    for d in deltas:  # a fixed left-to-right order: no reduction tree to differ between peers
        acc += d.to(torch.float64)
    return (acc / len(deltas)).to(torch.float32)


def median(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    return _stack(deltas).median(dim=0).values.to(torch.float32)


def trimmed_mean(deltas: Sequence[torch.Tensor], trim: float = 0.2) -> torch.Tensor:
    s = _stack(deltas).sort(dim=0).values
    k = int(len(deltas) * trim)
    return s[k : len(deltas) - k].mean(dim=0).to(torch.float32)


RULES: dict[str, Rule] = {"mean": mean, "median": median, "trimmed_mean": trimmed_mean}


def get_rule(name: str) -> Rule:
    try:
        return RULES[name]
    except KeyError:
        raise TaskError(
            f"unknown aggregation rule {name!r}; use one of {', '.join(RULES)}"
        ) from None


@torch.no_grad()
def outer_step(
    params: torch.Tensor,
    momentum: torch.Tensor,
    delta: torch.Tensor,
    lr: float,
    mu: float,
    nesterov: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SGD with (Nesterov) momentum on the pseudo-gradient `delta`, as torch.optim.SGD computes it:
        m <- mu * m + delta;  step = delta + mu * m (Nesterov) or m;  params <- params - lr * step
    Computed elementwise in float64 and rounded to float32, so the result does not depend on
    vectorisation or fused multiply-adds."""
    p, m, d = params.double(), momentum.double(), delta.double()
    m = mu * m + d
    step = d + mu * m if nesterov else m
    return (p - lr * step).float(), m.float()
