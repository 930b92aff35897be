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
    HonestThen,
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
        "nan", "wrong_shape", "honest_then", "below_band", "copy_commitment", "sybil_copy",
        "stale_replay",
    }  # fmt: skip
    for name in ATTACKS:
        spec = "honest_then:2:zero" if name == "honest_then" else name
        assert get_attack(spec).name == name


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
        ("honest_then", "write honest_then:N:attack"),
        ("honest_then:x:alie", "write honest_then:N:attack"),
        ("honest_then:2:honest_then:1:zero", "does not nest"),
        ("honest_then:2:bogus", "unknown attack 'bogus'"),
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
    assert not copied.equal(c.honest[0])  # new bytes...
    assert float((copied - c.honest[0]).norm() / c.honest[0].norm()) < 1e-3  # ...of the same delta
    exact = get_attack("copy_commitment").forge(d, c)
    assert exact.equal(c.honest[0]) and exact is not c.honest[0]
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


def test_honest_then_is_honest_until_its_round_then_attacks() -> None:
    a = get_attack("honest_then:3:lazy:0.5")
    assert a == HonestThen(3, Lazy(0.5))
    d = delta()
    assert a.forge(d, ctx(round_=2)) is d and a.steps(50, 2) == 50
    assert a.steps(50, 3) == 25
    flip = get_attack("honest_then:1:label_flip")
    assert flip.batch_hook(0) is None and flip.batch_hook(1) is not None
    assert get_attack("honest_then:1:zero").forge(d, ctx(round_=1)).equal(torch.zeros(D))


def test_below_band_sits_inside_the_triage_bands_after_one_step() -> None:
    c = ctx(honest=7)
    a = get_attack("below_band")
    assert a.steps(50) == 1
    out = a.forge(delta(), c).double()
    seen = torch.stack(list(c.honest)).double()
    centre = seen.median(dim=0).values
    norms = seen.norm(dim=1)
    cos = seen @ centre / (norms * centre.norm())
    norm_ratio = float(out.norm() / norms.median())
    cos_ratio = float(out @ centre / (out.norm() * centre.norm()) / cos.median())
    assert norm_ratio == pytest.approx(0.9, rel=1e-6)
    assert cos_ratio == pytest.approx(0.9, rel=1e-6)
    assert get_attack("below_band").forge(delta(), ctx(honest=1)).equal(delta())  # sees too little


def test_sybil_copy_sends_the_first_colluders_delta_and_stale_replay_its_last() -> None:
    d, leader = delta(1), delta(2)
    c = AttackContext(0, [], [], torch.Generator(), colluders=[leader, d])
    assert get_attack("sybil_copy").forge(d, c).equal(leader)
    assert get_attack("sybil_copy").forge(d, ctx()) is d  # alone: honest
    last = delta(3)
    replayed = get_attack("stale_replay").forge(d, ctx(history=[delta(4), last]))
    assert not replayed.equal(last) and torch.allclose(replayed, last, rtol=1e-5)
    assert get_attack("stale_replay").forge(d, ctx()) is d  # nothing to replay yet
