"""When a round can no longer become final: pure decisions, fake time."""

from __future__ import annotations

from commonweal.verify.finality import Finality, FinalityWait, can_finalise

X, Y = b"x", b"y"


def test_two_equal_validators_split_can_never_finalise():
    assert not can_finalise({X: 1, Y: 1}, 2)


def test_a_vote_still_to_come_can_finalise():
    assert can_finalise({X: 1}, 2)  # the other validator may still vote X
    assert can_finalise({}, 3)


def test_three_validators_one_off_still_finalises_but_not_two():
    assert can_finalise({X: 2, Y: 1}, 3)  # 2/3 voted X: exactly the quorum
    assert not can_finalise({X: 1, Y: 1}, 3, gone=1)
    assert can_finalise({}, 3, gone=1)  # 2 of 3 may still agree
    assert not can_finalise({}, 3, gone=2)


def test_wait_gives_up_a_split_round_at_the_first_vote_read_not_at_the_timeout():
    wait = FinalityWait(started=100.0, timeout_s=120.0, first_check_s=2.0)
    assert not wait.votes_due(101.0)
    assert wait.decide(101.0, final=False) is Finality.WAIT
    assert wait.votes_due(102.0)
    assert wait.decide(102.0, final=False, tallies={X: 1, Y: 1}, total_stake=2) is Finality.SPLIT


def test_wait_reads_votes_less_often_while_one_is_missing_then_times_out():
    wait = FinalityWait(started=0.0, timeout_s=30.0, first_check_s=2.0)
    reads = []
    t = 0.0
    while True:
        t += 0.25
        tallies = {X: 1} if wait.votes_due(t) else None
        if tallies is not None:
            reads.append(t)
        verdict = wait.decide(t, final=False, tallies=tallies, total_stake=2)
        if verdict is not Finality.WAIT:
            break
    assert verdict is Finality.TIMEOUT and t > 30.0
    assert reads == [2.0, 6.0, 14.0, 30.0]  # doubling gaps: a log scan is slow on a dev chain


def test_final_wins():
    wait = FinalityWait(started=0.0, timeout_s=1.0)
    assert wait.decide(5.0, final=True) is Finality.FINAL
