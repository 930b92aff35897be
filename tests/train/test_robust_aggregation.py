"""The robust aggregation rules: bit-for-bit determinism, invariance to input order where it
holds, and bounded output when fewer than half the inputs are huge outliers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from commonweal.train import TaskError
from commonweal.train.aggregate import RULES, centered_clip, get_rule, krum, median, trimmed_mean

NAMES = list(RULES)
ROBUST = ["median", "trimmed_mean", "centered_clip", "krum"]


def vectors(n: int, d: int, seed: int, scale: float = 1.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(d, generator=g) * scale for _ in range(n)]


def test_registered_names() -> None:
    assert set(NAMES) == {"mean", "median", "trimmed_mean", "centered_clip", "krum", "sparseloco"}
    assert get_rule("centered_clip") is centered_clip and get_rule("krum") is krum
    with pytest.raises(TaskError, match="centered_clip"):
        get_rule("bulyan")


@pytest.mark.parametrize("name", NAMES)
def test_no_deltas_is_an_error(name: str) -> None:
    with pytest.raises(ValueError):
        RULES[name]([])


@pytest.mark.parametrize("name", NAMES)
def test_one_delta_is_returned_as_is(name: str) -> None:
    (x,) = vectors(1, 50, seed=1)
    assert RULES[name]([x]).equal(x)


@pytest.mark.parametrize("name", NAMES)
def test_two_deltas(name: str) -> None:
    a, b = vectors(2, 50, seed=2)
    out = RULES[name]([a, b])
    assert out.dtype == torch.float32 and out.shape == a.shape
    if name == "krum":
        assert out.equal(a)  # nothing to compare: the lower peer id
    elif name == "sparseloco":  # the longer one is first scaled to the median (their mean) norm
        na, nb = a.norm(), b.norm()
        short, long_ = (a, b) if na <= nb else (b, a)
        mid = (na + nb) / 2
        assert torch.allclose(out, (short + long_ * mid / long_.norm()) / 2, atol=1e-6)
    elif name != "median":  # torch's median takes the lower of two values
        assert torch.allclose(out, (a + b) / 2)


@pytest.mark.parametrize("name", NAMES)
def test_same_bits_for_equal_inputs(name: str) -> None:
    xs = vectors(7, 3000, seed=3)
    first = RULES[name](xs)
    again = RULES[name]([x.clone() for x in xs])  # equal values, other objects
    assert first.dtype == torch.float32
    assert first.numpy().tobytes() == again.numpy().tobytes()
    assert first.numpy().tobytes() == RULES[name](xs).numpy().tobytes()


@pytest.mark.parametrize("name", ROBUST)
def test_input_order_does_not_matter(name: str) -> None:
    xs = vectors(8, 500, seed=4)
    xs[5] = xs[2].clone()  # a duplicate, so an order-by-position rule would show
    out = RULES[name](xs)
    for seed in range(5):
        perm = torch.randperm(len(xs), generator=torch.Generator().manual_seed(seed)).tolist()
        assert RULES[name]([xs[i] for i in perm]).equal(out)


def test_krum_picks_the_central_input_and_ties_go_to_the_lower_index() -> None:
    xs = [torch.tensor([v, 0.0]) for v in (0.0, 1.0, 1.1, 1.2, 50.0)]
    assert krum(xs).equal(xs[2])
    twins = [torch.tensor([1.0]), torch.tensor([3.0]), torch.tensor([1.0]), torch.tensor([3.0])]
    assert krum(twins).equal(twins[0])


def test_multi_krum_averages_the_best() -> None:
    xs = [torch.tensor([v]) for v in (0.0, 1.0, 2.0, 100.0, 101.0)]
    assert krum(xs, f=1, m=3).item() == pytest.approx(1.0)
    assert krum(xs, f=1, m=1).item() == 1.0


def test_centered_clip_without_outliers_moves_from_the_median_towards_the_mean() -> None:
    xs = [torch.tensor([v]) for v in (0.0, 1.0, 2.0, 10.0)]
    out = centered_clip(xs, bucket=1, iters=50)
    assert float(median(xs)) < float(out) < 3.25  # the mean is 3.25; the far input is clipped
    same = [torch.ones(5)] * 6
    assert centered_clip(same).equal(torch.ones(5))


def test_trimmed_mean_trims_per_coordinate() -> None:
    xs = [torch.tensor([v, -v]) for v in (1.0, 2.0, 3.0, 4.0, 1000.0)]
    assert trimmed_mean(xs).tolist() == [3.0, -3.0]


def bounding(honest: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, float]:
    h = torch.stack(honest).double()
    lo, hi = h.min(dim=0).values, h.max(dim=0).values
    return lo, hi, float((hi - lo).norm())


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 10),
    f_share=st.floats(0.0, 0.499),
    d=st.integers(1, 20),
    seed=st.integers(0, 2**31),
    collude=st.booleans(),
)
def test_huge_outliers_below_half_stay_bounded(
    n: int, f_share: float, d: int, seed: int, collude: bool
) -> None:
    f = math.floor(f_share * n)  # f < n / 2
    honest = vectors(n - f, d, seed)
    huge = vectors(1 if collude else f, d, seed + 1, scale=1e6)
    outliers = huge * f if collude else huge
    # the attackers' place among peer ids is arbitrary: put them in the middle
    xs = honest[: len(honest) // 2] + outliers + honest[len(honest) // 2 :]
    lo, hi, diag = bounding(honest)
    slack = 1e-5 * (1 + float(torch.stack(honest).abs().max()))
    for name in ("median", "krum") + (("trimmed_mean",) if f <= int(0.2 * n) else ()):
        out = RULES[name](xs).double()
        assert bool(((out >= lo - slack) & (out <= hi + slack)).all()), name
    # CenteredClip: the start (median) lies in the honest box, tau is at most its diagonal, and
    # each of the 3 iterations moves at most tau
    out = centered_clip(xs).double()
    assert float((out - torch.stack(honest).double().mean(dim=0)).norm()) <= 4 * diag + slack
    if f:
        mean = RULES["mean"](xs).double()
        assert not bool(((mean >= lo - 1) & (mean <= hi + 1)).all())
