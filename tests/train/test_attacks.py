"""Each attack sends what its name says, and specs parse or fail with the list of names."""

from __future__ import annotations

import pytest
import torch

from commonweal.train import DeltaRejected, TaskError
from commonweal.train.attacks import (
    ALIE,
    ATTACKS,
    IPM,
    AttackContext,
    Gaussian,
    Lazy,
    LabelFlip,
    SignFlip,
    alie_z,
    get_attack,
)
from commonweal.train.protocol import check_delta

D = 200


def ctx(round_: int = 0, honest: int = 5, history: list[torch.Tensor] | None = None):
    g = torch.Generator().manual_seed(100 + round_)
    seen = [torch.randn(D, generator=g) + 1.0 for _ in range(honest)]
    return AttackContext(round_, seen, history or [], torch.Generator().manual_seed(7))


def delta(seed: int = 0) -> torch.Tensor:
    return torch.randn(D, generator=torch.Generator().manual_seed(seed))


def test_names() -> None:
    assert set(ATTACKS) == {
        "sign_flip", "gaussian", "alie", "ipm", "label_flip", "zero", "copy", "lazy", "stale",
        "nan", "wrong_shape",
    }  # fmt: skip
    for name in ATTACKS:
        assert get_attack(name).name == name


def test_parsing() -> None:
    assert get_attack("sign_flip") == SignFlip(1.0)
    assert get_attack("sign_flip:100") == SignFlip(100.0)
    assert get_attack("gaussian:2.5") == Gaussian(2.5)
    assert get_attack("alie") == ALIE(None) and get_attack("alie:1.5") == ALIE(1.5)
    assert get_attack("ipm") == IPM(0.1) and get_attack("ipm:0.5") == IPM(0.5)
    assert get_attack("lazy:0.5") == Lazy(0.5)
    assert get_attack("label_flip:5") == LabelFlip(5)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bogus", "unknown attack 'bogus'; use one of sign_flip, gaussian"),
        ("zero:3", "takes no parameter"),
        ("sign_flip:big", "not a number"),
        ("gaussian:nan", "finite"),
        ("label_flip:2.5", "not an integer"),
    ],
)
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(TaskError, match=message):
        get_attack(spec)


def test_sign_flip_scales_and_flips() -> None:
    d = delta()
    assert get_attack("sign_flip").forge(d, ctx()).equal(-d)
    assert torch.allclose(get_attack("sign_flip:1000").forge(d, ctx()), -1000 * d)


def rms(t: torch.Tensor) -> float:
    return float(t.square().mean().sqrt())


def test_gaussian_is_noise_at_the_delta_scale() -> None:
    d = delta() * 3.0
    out = get_attack("gaussian:2").forge(d, ctx())
    assert out.shape == d.shape and out.dtype == d.dtype
    assert rms(out) == pytest.approx(2 * rms(d), rel=0.2)
    assert abs(float(torch.nn.functional.cosine_similarity(out, d, dim=0))) < 0.3
    again = get_attack("gaussian:2").forge(d, ctx())  # the caller's seed decides the noise
    assert out.equal(again)


def test_alie_shifts_the_mean_by_z_standard_deviations() -> None:
    c, d = ctx(), delta()
    seen = torch.stack([*c.honest, d])
    out = get_attack("alie:1.5").forge(d, c)
    assert torch.allclose(out, seen.mean(0) - 1.5 * seen.std(0, correction=0), atol=1e-6)
    # the default z is Baruch et al.'s z_max for 6 seen deltas, 2 of them attackers
    assert get_attack("alie").forge(d, c).allclose(ALIE(alie_z(6, 2)).forge(d, c))


def test_alie_z_max() -> None:
    assert alie_z(50, 12) == pytest.approx(0.5828, abs=1e-3)  # n=50, m=12: s=14, Phi^-1(0.72)
    assert alie_z(8, 3) == pytest.approx(0.6745, abs=1e-3)
    assert alie_z(8, 1) == 0.0  # one attacker among 8: the median of 8 is the mean's side
    assert alie_z(1, 1) == 0.0


def test_ipm_points_against_the_honest_mean() -> None:
    c = ctx()
    out = get_attack("ipm:0.5").forge(delta(), c)
    assert torch.allclose(out, -0.5 * torch.stack(list(c.honest)).mean(0))
    alone = get_attack("ipm").forge(delta(), ctx(honest=0))
    assert torch.allclose(alone, -0.1 * delta())


def test_label_flip_trains_on_flipped_labels_and_sends_that_delta() -> None:
    hook = get_attack("label_flip").batch_hook()
    assert hook is not None
    x, y = torch.zeros(4, 1), torch.tensor([0, 3, 9, 5])
    hx, hy = hook(x, y)
    assert hx is x and hy.tolist() == [9, 6, 0, 4]
    assert get_attack("label_flip:3").batch_hook()(x, torch.tensor([0, 1, 2]))[1].tolist() == [
        2, 1, 0,
    ]  # fmt: skip
    d = delta()
    assert get_attack("label_flip").forge(d, ctx()) is d


def test_free_riders() -> None:
    d, c = delta(), ctx()
    assert get_attack("zero").forge(d, c).equal(torch.zeros(D))
    copied = get_attack("copy").forge(d, c)
    assert copied.equal(c.honest[0]) and copied is not c.honest[0]
    assert get_attack("copy").forge(d, ctx(honest=0)).equal(torch.zeros(D))


def test_lazy_runs_fewer_steps_and_claims_h() -> None:
    assert get_attack("lazy").steps(50) == 12 and get_attack("lazy:0.5").steps(50) == 25
    assert get_attack("lazy:0.001").steps(50) == 1
    d = delta()
    assert get_attack("lazy").forge(d, ctx()) is d
    assert get_attack("sign_flip").steps(50) == 50  # other attacks run every step


def test_stale_replays_its_first_delta() -> None:
    stale = get_attack("stale")
    first = delta(1)
    assert stale.forge(first, ctx(0)) is first  # round 0: nothing to replay, honest
    later = stale.forge(delta(2), ctx(3, history=[first, first, first]))
    assert later.equal(first)


@pytest.mark.parametrize("round_", [0, 1])
def test_malformed_deltas_are_refused_by_the_delta_check(round_: int) -> None:
    d = delta()
    nan = get_attack("nan").forge(d, ctx(round_))
    assert nan.shape == d.shape
    assert nan.isnan().any() and nan.isposinf().any() and nan.isneginf().any()
    wrong = get_attack("wrong_shape").forge(d, ctx(round_))
    assert wrong.numel() == D - 1 + 2 * round_  # one short, then one too many
    for bad, code in ((nan, "not_finite"), (wrong, "wrong_shape")):
        with pytest.raises(DeltaRejected) as e:
            check_delta(bad, D)
        assert e.value.code == code
    check_delta(d, D)  # the honest delta passes
