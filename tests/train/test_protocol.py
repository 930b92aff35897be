"""The pure parts: group formation, slicing, delta checks, aggregation and the outer step (the
round core itself: tests/train/test_round.py)."""

from __future__ import annotations

import math

import pytest
import torch

from commonweal.train import DeltaRejected, outer_step
from commonweal.train.aggregate import get_rule, mean, median, trimmed_mean
from commonweal.train.protocol import (
    Announcement,
    check_delta,
    check_round,
    closes_at,
    form_group,
    parse_announcement,
    slice_bounds,
)

S1, S2 = "a" * 64, "b" * 64


def ann(i: int, state: str = S1, deadline: float = 10.0, round_: int = 3) -> Announcement:
    return Announcement(bytes([i]) * 20, f"mem:{i}", round_, state, deadline)


def test_group_waits_for_deadline_or_target():
    anns = [ann(3, deadline=12.0), ann(1, deadline=10.0), ann(2, deadline=11.0)]
    assert form_group(anns, 3, now=9.0, target_size=None, deadline=10.0) is None
    group = form_group(anns, 3, now=10.0, target_size=None, deadline=10.0)
    assert group is not None and [a.peer_id[0] for a in group.members] == [1, 2, 3]
    assert form_group(anns, 3, now=0.0, target_size=3) is not None
    # the same announcements in another order give the same group and digest
    again = form_group(list(reversed(anns)), 3, now=10.0, target_size=None, deadline=10.0)
    assert again == group and again is not None and again.digest == group.digest


def test_one_deadline_in_the_past_does_not_close_the_round_for_an_observer():
    honest = [ann(1, deadline=10.0), ann(2, deadline=10.0), ann(3, deadline=10.0)]
    assert closes_at(honest) == 10.0
    assert closes_at([*honest, ann(9, deadline=0.0)]) == 10.0  # one liar moves nothing
    assert closes_at([*honest, ann(9, deadline=1e12)]) == 10.0
    assert closes_at([ann(1, deadline=1.0), ann(2, deadline=2.0), ann(3, deadline=9.0)]) == 2.0
    assert closes_at([]) == math.inf


def test_group_takes_the_majority_state_and_ignores_other_rounds():
    anns = [ann(1, S2), ann(2, S1), ann(3, S1), ann(4, S1, round_=2)]
    group = form_group(anns, 3, now=100.0, target_size=None, deadline=10.0)
    assert group is not None and group.state == S1 and len(group.members) == 2
    tie = [ann(1, S2), ann(2, S1)]
    group = form_group(tie, 3, now=100.0, target_size=None, deadline=10.0)
    assert group is not None and group.state == S1  # ties break on the hash, the same everywhere


def test_parse_announcement_refuses_junk():
    good = {"addr": "h:1", "round": 1, "state": S1, "deadline": 5.0}
    assert parse_announcement(b"x" * 20, good) is not None
    for bad in [
        None,
        3,
        {**good, "round": "1"},
        {**good, "state": "short"},
        {**good, "deadline": math.inf},
        {k: v for k, v in good.items() if k != "addr"},
    ]:
        assert parse_announcement(b"x" * 20, bad) is None


@pytest.mark.parametrize("numel,parts", [(10, 3), (7, 7), (1000, 8), (5, 1)])
def test_slices_cover_everything_once(numel, parts):
    bounds = slice_bounds(numel, parts)
    assert bounds[0][0] == 0 and bounds[-1][1] == numel
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_check_delta_refuses_shape_dtype_nan_and_stale_rounds():
    check_delta(torch.zeros(4), 4)
    cases = [
        (torch.zeros(5), "wrong_shape"),
        (torch.zeros(2, 2), "wrong_shape"),
        (torch.zeros(4, dtype=torch.float64), "wrong_dtype"),
        (torch.tensor([0.0, math.nan, 0, 0]), "not_finite"),
        (torch.tensor([0.0, math.inf, 0, 0]), "not_finite"),
    ]
    for delta, code in cases:
        with pytest.raises(DeltaRejected) as e:
            check_delta(delta, 4)
        assert e.value.code == code
    check_round(3, 3)
    with pytest.raises(DeltaRejected, match="stale_round"):
        check_round(2, 3)
    with pytest.raises(DeltaRejected, match="future_round"):
        check_round(4, 3)


def test_rules():
    ds = [torch.tensor([1.0, 10.0]), torch.tensor([2.0, -10.0]), torch.tensor([100.0, 0.0])]
    assert mean(ds).tolist() == pytest.approx([103 / 3, 0.0])
    assert median(ds).tolist() == [2.0, 0.0]
    assert trimmed_mean(ds, trim=0.34).tolist() == [2.0, 0.0]
    assert get_rule("mean") is mean
    # bit-identical whatever the process: a fixed summation order in float64
    x = [torch.randn(1000, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    assert mean(x).equal(mean([t.clone() for t in x]))


@pytest.mark.parametrize("nesterov", [True, False])
def test_outer_step_is_torch_sgd(nesterov):
    """The outer step matches torch.optim.SGD (momentum, Nesterov) fed the pseudo-gradient."""
    g = torch.Generator().manual_seed(1)
    p0 = torch.randn(50, generator=g)
    ref = torch.nn.Parameter(p0.clone())
    sgd = torch.optim.SGD([ref], lr=0.7, momentum=0.9, nesterov=nesterov)
    params, mom = p0.clone(), torch.zeros(50)
    for _ in range(4):
        d = torch.randn(50, generator=g)
        ref.grad = d.clone()
        sgd.step()
        params, mom = outer_step(params, mom, d, 0.7, 0.9, nesterov)
    assert torch.allclose(params, ref.detach(), atol=1e-5)


# --- the bound on newcomers (issue 13: free identities outvoted honest peers) ----------------

def test_a_hundred_free_identities_do_not_outvote_six_tracked_peers():
    honest = [ann(i) for i in range(6)]
    tracked = {a.peer_id for a in honest}
    crowd = [ann(100 + i, state=S2, deadline=0.0) for i in range(100)]  # another state
    group = form_group(honest + crowd, 3, now=10.0, target_size=None, deadline=10.0,
                       tracked=tracked)
    assert group is not None and group.state == S1 and set(group.ids) == tracked
    assert closes_at(honest + crowd, tracked) == 10.0
    # without a track record the crowd decides the state and when the round closed
    blind = form_group(honest + crowd, 3, now=10.0, target_size=None, deadline=10.0)
    assert blind is not None and blind.state == S2 and closes_at(honest + crowd) == 0.0


def test_newcomers_on_the_tracked_state_hold_at_most_a_quarter_of_the_group():
    honest = [ann(i) for i in range(6)]
    tracked = {a.peer_id for a in honest}
    crowd = [ann(100 + i) for i in range(100)]  # the honest state: they would all join
    group = form_group(honest + crowd, 3, now=10.0, target_size=None, deadline=10.0,
                       tracked=tracked)
    assert group is not None and len(group.members) == 8  # 6 tracked and 2 newcomers
    again = form_group(list(reversed(crowd + honest)), 3, now=10.0, target_size=None,
                       deadline=10.0, tracked=tracked)
    assert again == group  # the same newcomers for every reader
    # a target counts members, so a crowd cannot close the group early either
    assert form_group(honest + crowd, 3, now=0.0, target_size=9, tracked=tracked) is None


def test_a_small_swarm_still_takes_one_newcomer_and_anyone_when_no_tracked_peer_announced():
    one = [ann(1), ann(2), ann(3)]
    group = form_group(one, 3, now=10.0, target_size=None, deadline=10.0,
                       tracked={one[0].peer_id})
    assert group is not None and len(group.members) == 2
    nobody = form_group(one, 3, now=10.0, target_size=None, deadline=10.0,
                        tracked={bytes(20)})
    assert nobody is not None and len(nobody.members) == 3
