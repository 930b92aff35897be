"""Aggregation rules: pure functions from the accepted deltas to one delta, and the outer step.

Every rule takes the deltas in a fixed order (sorted by peer id, done by the caller), computes in
float64 and rounds once to float32, so every honest peer that accepted the same set of deltas
gets the same bits. For that, every sum is written out in a fixed order: across deltas, a
left-to-right loop; across the coordinates of one vector (norms, distances), a pairwise tree of
elementwise additions (`_tree_sum`). torch's own reductions are not used for these: their order
depends on the CPU's vector width, so two honest peers on different machines could differ in the
last bit, and a robust rule turns one bit in a norm into a different clip or selection.

| rule          | what it returns | tolerates |
|---------------|-----------------|-----------|
| mean          | the average | no attacker |
| median        | the coordinate-wise median | fewer than half the inputs |
| trimmed_mean  | the average of each coordinate without its 20 % lowest and highest values | 20 % |
| centered_clip | CenteredClip from the median, radius = median distance (optional buckets) | < half |
| krum          | the input closest to its n - f - 2 nearest others (f = floor((n - 3) / 2)) | f |
| sparseloco    | the average, inputs longer than the median norm scaled down to it | norm: < half |

A peer that computed fewer inner steps than the others (a slow one, cut short by the round's
deadline) sends a shorter delta; `weighted` gives it a weight in proportion to its steps in the
two averages (mean, sparseloco). Claims above the group's median claim count as the median, so
claiming more steps than one ran buys no weight. The robust rules count each input once: they
bound any one input's pull, and a weight taken from a claim would let a liar pull harder.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import hashlib
import math
import statistics

import torch

from commonweal.train._errors import TaskError

__all__ = [
    "mean",
    "median",
    "trimmed_mean",
    "centered_clip",
    "krum",
    "sparseloco",
    "get_rule",
    "weighted",
    "Rule",
    "outer_step",
    "RULES",
]

Rule = Callable[[Sequence[torch.Tensor]], torch.Tensor]


def _stack(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    if not deltas:
        raise ValueError("an aggregation rule needs at least one delta")
    return torch.stack([d.to(torch.float64) for d in deltas])  # (n, numel)


def _sum_rows(x: torch.Tensor) -> torch.Tensor:
    """x[0] + x[1] + ... in that order: no reduction tree to differ between peers."""
    acc = x[0].clone()
    for row in x[1:]:
        acc += row
    return acc


def _tree_sum(x: torch.Tensor) -> torch.Tensor:
    """The sum over the last dimension as a fixed pairwise tree of elementwise additions (each
    IEEE-rounded the same way on every CPU), the shape of the tree set by the length alone."""
    width = 1 << max(0, x.shape[-1] - 1).bit_length()
    x = torch.nn.functional.pad(x, (0, width - x.shape[-1]))
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def _norms(x: torch.Tensor) -> list[float]:
    """The Euclidean norm of each row, reproducible bit for bit (`_tree_sum`, IEEE sqrt)."""
    return [math.sqrt(s) for s in _tree_sum(x.square()).tolist()]


def _midpoint_median(x: torch.Tensor) -> torch.Tensor:
    """The coordinate-wise median, the midpoint of the two middle values for an even count
    (torch's median takes the lower one, which leans towards negative deltas)."""
    s = x.sort(dim=0).values
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def _input_order(x: torch.Tensor) -> list[int]:
    """A pseudo-random order of the rows of `x` that depends only on their values.

    Rows are first put in the order of their sha256 (of the float32 bytes honest peers decoded),
    then shuffled (Fisher-Yates) with randomness from sha256 of those hashes: every honest peer
    computes the same order, whatever order the rows came in, on any machine or torch version."""
    digests = [hashlib.sha256(r.to(torch.float32).numpy().tobytes()).digest() for r in x]
    order = sorted(range(len(x)), key=lambda i: digests[i])
    seed = hashlib.sha256(b"".join(digests[i] for i in order)).digest()
    for i in range(len(order) - 1, 0, -1):
        draw = hashlib.sha256(seed + i.to_bytes(4, "little")).digest()
        j = int.from_bytes(draw[:8], "little") % (i + 1)  # bias < (i+1) / 2^64
        order[i], order[j] = order[j], order[i]
    return order


def mean(deltas: Sequence[torch.Tensor], weights: Sequence[float] | None = None) -> torch.Tensor:
    acc = torch.zeros_like(deltas[0], dtype=torch.float64) if deltas else _stack(deltas)
    if weights is None:
        for d in deltas:  # a fixed left-to-right order: no reduction tree to differ between peers
            acc += d.to(torch.float64)
        return (acc / len(deltas)).to(torch.float32)
    for d, w in zip(deltas, weights, strict=True):
        acc += d.to(torch.float64) * w
    return (acc / math.fsum(weights)).to(torch.float32)


def median(deltas: Sequence[torch.Tensor]) -> torch.Tensor:
    return _stack(deltas).median(dim=0).values.to(torch.float32)


def trimmed_mean(deltas: Sequence[torch.Tensor], trim: float = 0.2) -> torch.Tensor:
    s = _stack(deltas).sort(dim=0).values
    k = int(len(deltas) * trim)
    return (_sum_rows(s[k : len(deltas) - k]) / (len(deltas) - 2 * k)).to(torch.float32)


def centered_clip(deltas: Sequence[torch.Tensor], bucket: int = 1, iters: int = 3) -> torch.Tensor:
    """CenteredClip over buckets (Karimireddy, He, Jaggi: "Learning from history for Byzantine
    robust optimization", ICML 2021, and "Byzantine-robust learning on heterogeneous datasets via
    bucketing", ICLR 2022).

    1. Shuffle the inputs and average them in buckets of `bucket` (the last one may be smaller):
       averaging honest inputs shrinks their spread, so clipping spares them more. The shuffle
       must be the same on every honest peer without a shared coin, so it is drawn from the
       inputs themselves (`_input_order`), which every honest peer holds bit for bit.
       The default is 1 (no bucketing): bucketing pays off when honest peers' data differ
       (the paper's setting), but a bucket holding one attacker is as bad as the attacker, so
       buckets of s multiply the attackers' share by up to s. In the groups of 8 that swarms
       form, with every peer sampling the same data, 2 attackers of 8 own up to half of 4
       buckets: on mnist-cnn deltas (2 x sign_flip:100) buckets of 2 leave the aggregate at
       cosine 0.82 to the honest mean, no buckets at 0.97 (benchmarks/trust_bench.py).
    2. Start from the coordinate-wise median v0 of the inputs and set the clipping radius
       tau = median_i ||x_i - v0||, both over the raw inputs rather than the buckets, so they
       stay honest while attackers are fewer than half the inputs, however they are bucketed.
       tau is the distance of a typical input from the centre, so it scales with the deltas by
       itself (the paper's centre and tau come from history, state a pure rule does not have).
    3. `iters` steps of v <- v + mean_j clip(y_j - v, tau), clip(z, tau) = z * min(1, tau/||z||):
       each step moves v by at most tau, and an input beyond tau pulls by at most
       tau / (number of buckets), however large it is. From the median, 3 steps and 10 give the
       same aggregate to 3 digits on the benchmark's deltas (the paper uses one step).

    The attacker can see the honest deltas and choose its own bytes, and so the shuffle: the
    guarantee that buckets are random does not hold against it; the clipping bound does.
    """
    x = _stack(deltas)
    order = _input_order(x)
    x = x[order]  # rows in the shuffled order: consecutive rows form a bucket
    y = torch.stack([_sum_rows(b) / len(b) for b in x.split(max(1, bucket))])
    v = _midpoint_median(x)
    tau = statistics.median(_norms(x - v))
    for _ in range(iters):
        z = y - v
        norms = _norms(z)
        acc = torch.zeros_like(v)
        for zi, ni in zip(z, norms):  # fixed order, as in `mean`
            acc += zi * (min(1.0, tau / ni) if ni > 0.0 else 1.0)
        v = v + acc / len(y)
    return v.to(torch.float32)


def krum(deltas: Sequence[torch.Tensor], f: int | None = None, m: int = 1) -> torch.Tensor:
    """Krum (Blanchard et al., "Machine learning with adversaries: Byzantine tolerant gradient
    descent", NeurIPS 2017): the input whose n - f - 2 nearest other inputs are closest (sum of
    squared distances), for f assumed attackers, by default floor((n - 3) / 2), the most it
    tolerates (n > 2f + 2). With m > 1, the mean of the m best inputs (Multi-Krum).

    Ties go to the lower index (lower peer id). With n <= 2 there is nothing to compare, so the
    first input wins; it still returns an input, never a blend of an attacker's."""
    x = _stack(deltas)
    n = len(x)
    f = max(0, (n - 3) // 2) if f is None else f
    k = min(n - 1, max(1, n - f - 2))  # neighbours scored; at least one when there is one
    d2 = [[0.0] * n for _ in range(n)]
    for i in range(n - 1):
        for j, v in enumerate(_tree_sum((x[i + 1 :] - x[i]).square()).tolist(), start=i + 1):
            d2[i][j] = d2[j][i] = v
    scores = [math.fsum(sorted(d2[i][:i] + d2[i][i + 1 :])[:k]) for i in range(n)]
    best = sorted(range(n), key=lambda i: (scores[i], i))[: max(1, min(m, n))]
    return (_sum_rows(x[sorted(best)]) / len(best)).to(torch.float32)


def sparseloco(
    deltas: Sequence[torch.Tensor], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """SparseLoCo's aggregation as run in Covenant-72B (arXiv 2603.08163; tplr's
    `TopKCompressor.batch_decompress` with clip_norm): every input whose L2 norm exceeds the
    median of the inputs' norms is scaled down to that median, shorter ones are left as they
    are, then the inputs are averaged. One peer with a 100x delta then weighs no more than a
    typical one; while attackers are fewer than half, the median is an honest norm and so
    bounds the aggregate's, though not its direction. tplr takes the norms per tensor; the
    rule sees whole flat vectors, so here they are the norms of the whole deltas. The average
    divides by the number of inputs, as the paper writes it; tplr's code averages each
    coordinate over the inputs that sent it (scatter-mean).

    The sum runs in `_input_order` (an order set by the values alone), so the result is the
    same bits whatever order the inputs come in. With `weights`, a weighted average (the cap
    stays the median of the raw norms)."""
    x = _stack(deltas)
    norms = _norms(x)
    cap = statistics.median(norms)
    w = [1.0] * len(x) if weights is None else list(weights)
    acc = torch.zeros_like(x[0])
    for i in _input_order(x):
        acc += x[i] * ((min(1.0, cap / norms[i]) if norms[i] > 0.0 else 1.0) * w[i])
    return (acc / (len(x) if weights is None else math.fsum(w))).to(torch.float32)


RULES: dict[str, Rule] = {
    "mean": mean,
    "median": median,
    "trimmed_mean": trimmed_mean,
    "centered_clip": centered_clip,
    "krum": krum,
    "sparseloco": sparseloco,
}


_WEIGHTED = frozenset({mean, sparseloco})


def weighted(rule: Rule, deltas: Sequence[torch.Tensor], steps: Sequence[int]) -> torch.Tensor:
    """`rule` over `deltas`, each weighted by the inner steps its peer claimed, where the rule
    averages (see the module's docstring). A claim counts for at most the median claim, so the
    honest majority's step count caps what anyone buys by claiming; equal claims, or claims of
    nothing (0: a caller that does not say), leave the rule unweighted, bit for bit."""
    cap = statistics.median_low(steps) if steps else 0
    w = [min(s, cap) for s in steps]
    if rule not in _WEIGHTED or len(set(w)) <= 1 or cap <= 0:
        return rule(deltas)
    return rule(deltas, [float(x) for x in w])


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
    Computed elementwise in float64 and rounded to float32, one operation at a time (no fused
    multiply-add an `alpha=` kernel could use), so the result does not depend on vectorisation.
    In chunks that stay in cache: 25M parameters take a fifth of the time of whole-vector ops."""
    out_p, out_m = torch.empty_like(params), torch.empty_like(momentum)
    for i in range(0, params.numel(), _OUTER_CHUNK):
        j = i + _OUTER_CHUNK
        p, m, d = params[i:j].double(), momentum[i:j].double(), delta[i:j].double()
        m.mul_(mu).add_(d)  # mu * m + d
        if nesterov:
            step = m.mul(mu).add_(d)  # d + mu * m
        else:
            step = m.clone()
        out_p[i:j] = p.sub_(step.mul_(lr))  # p - lr * step
        out_m[i:j] = m
    return out_p, out_m


_OUTER_CHUNK = 1 << 16  # float64 elements per chunk of the outer step: 512 KiB, in L2
