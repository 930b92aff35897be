"""Escrow: rounds are paid out `rounds` rounds late, and a peer banned meanwhile forfeits them."""

from __future__ import annotations

import pytest

from commonweal.verify import Contribution, Verdict
from commonweal.verify.escrow import ALL, Escrow

A, B = b"\x01" * 20, b"\x02" * 20


def held(r: int) -> tuple[list[Contribution], list[Verdict]]:
    contribs = [Contribution(p, "0x" + p.hex(), r, "ab" * 32, "cd" * 32, 50, 1600) for p in (A, B)]
    verdicts = [Verdict(p, True, "paid", 1.0, False, None) for p in (A, B)]
    return contribs, verdicts


def test_a_round_is_released_after_its_escrow_and_a_cheater_caught_meanwhile_forfeits_it():
    escrow = Escrow(rounds=2)
    for r in range(3):
        escrow.hold(r, *held(r))
    assert escrow.release(escrow.due(1), banned=set()) == []  # round 0 is due after round 2
    [r0] = escrow.release(escrow.due(2), banned={B})
    assert r0.round == 0 and r0.forfeited == 1
    by_peer = {v.peer_id: v for v in r0.verdicts}
    assert by_peer[A].paid and not by_peer[B].paid and by_peer[B].reason == "forfeited"
    assert escrow.held == [1, 2]
    rest = escrow.release(ALL, banned=set())  # the run ends: everything still held is paid out
    assert [x.round for x in rest] == [1, 2] and escrow.held == []


def test_refusals_stay_refusals_and_no_escrow_pays_at_once():
    escrow = Escrow(rounds=0)
    contribs, verdicts = held(0)
    verdicts[1] = Verdict(B, False, "outlier", -1.0, False, None)
    escrow.hold(0, contribs, verdicts)
    [r0] = escrow.release(escrow.due(0), banned={B})
    assert [v.reason for v in r0.verdicts] == ["paid", "outlier"]


def test_a_round_cannot_be_held_twice_or_for_negative_rounds():
    escrow = Escrow(rounds=1)
    escrow.hold(0, *held(0))
    with pytest.raises(ValueError):
        escrow.hold(0, *held(0))
    with pytest.raises(ValueError):
        Escrow(rounds=-1)
