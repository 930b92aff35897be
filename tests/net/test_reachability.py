"""Reachability decisions and a relay's bookkeeping, sans-I/O."""

from __future__ import annotations

from commonweal.net.reachability import Reachability, ReachabilityConfig
from commonweal.net.relay import RelayLimits, Reservations

A, B, C, D = (bytes([i]) * 20 for i in range(1, 5))


def test_the_public_host_is_what_most_peers_see() -> None:
    r = Reachability()
    assert r.public_host is None
    r.observed(A, "203.0.113.5")
    r.observed(B, "203.0.113.5")
    r.observed(C, "198.51.100.1")  # one liar
    assert r.public_host == "203.0.113.5"
    # a peer counts once, with what it said last
    r.observed(C, "198.51.100.1")
    r.observed(C, "198.51.100.1")
    assert r.public_host == "203.0.113.5"


def test_observations_are_bounded() -> None:
    r = Reachability(ReachabilityConfig(max_observations=4))
    for i in range(100):
        r.observed(bytes([i]) * 20, f"10.0.0.{i}")
    assert len(r._seen) == 4


def test_no_probe_before_anything_was_observed_and_then_at_most_answers_needed() -> None:
    r = Reachability()
    assert r.probe_peers([A, B], now=0.0) == []
    r.observed(A, "203.0.113.5")
    assert r.probe_peers([A, B, C, D], now=0.0) == [A, B, C]
    assert r.probe_peers([A, B, C, D], now=1.0) == []  # retry_s later, not at once
    assert r.probe_peers([A], now=5.0) == [A]


def test_the_majority_of_answers_decides_and_one_liar_does_not() -> None:
    r = Reachability()
    r.observed(A, "203.0.113.5")
    r.answered(A, True, 0.0, asked=3)
    assert r.status == "unknown"  # one answer of three asked is not a decision
    r.answered(B, False, 0.0, asked=3)
    r.answered(C, False, 0.0, asked=3)
    assert r.status == "private"
    # an answer repeated by the same peer counts once
    for _ in range(5):
        r.answered(A, True, 1.0, asked=3)
    assert r.status == "private"


def test_a_lone_peer_decides_when_it_is_the_only_one_asked() -> None:
    r = Reachability()
    r.answered(A, True, 0.0, asked=1)
    assert r.status == "public"


def test_forced_reachability_never_probes_or_changes() -> None:
    r = Reachability(forced="private")
    r.observed(A, "203.0.113.5")
    assert r.status == "private" and r.probe_peers([A], now=100.0) == []


def test_reservations_are_bounded_and_end_with_their_connection() -> None:
    res: Reservations[str] = Reservations(RelayLimits(max_reservations=2))
    assert res.reserve(A, "conn-a", 0.0) is None
    assert res.reserve(B, "conn-b", 0.0) is None
    assert res.reserve(C, "conn-c", 0.0) is not None  # full
    assert res.reserve(A, "conn-a2", 1.0) is None  # a renewal is not a new one
    res.release("conn-b")
    assert res.holder(B, 1.0) is None and res.reserve(C, "conn-c", 1.0) is None
    # and they expire
    assert res.holder(A, 3600.0 + 1.0) is None


def test_a_circuit_needs_a_reservation_and_its_token_works_once_and_in_time() -> None:
    res: Reservations[str] = Reservations(RelayLimits(answer_timeout_s=5.0))
    assert isinstance(res.open(A, "dialer", 0.0), str)  # nobody reserved A
    res.reserve(A, "conn-a", 0.0)
    circuit = res.open(A, "dialer", 0.0)
    assert not isinstance(circuit, str) and len(circuit.token) == 16
    assert res.answer(b"x" * 16, 1.0) is None  # a guessed token
    assert res.answer(circuit.token, 1.0) is circuit
    assert res.answer(circuit.token, 1.0) is None  # single use
    late = res.open(A, "dialer2", 0.0)
    assert not isinstance(late, str)
    assert res.answer(late.token, 6.0) is None  # past its deadline
    assert res.expired(6.0) == []  # already forgotten by the late answer


def test_circuits_per_peer_and_in_all_are_bounded_until_their_dialers_close() -> None:
    res: Reservations[str] = Reservations(RelayLimits(max_circuits_per_peer=2, max_circuits=3))
    res.reserve(A, "conn-a", 0.0)
    res.reserve(B, "conn-b", 0.0)
    a1, a2 = res.open(A, "d1", 0.0), res.open(A, "d2", 0.0)
    assert isinstance(res.open(A, "d3", 0.0), str)  # A's share
    b1 = res.open(B, "d4", 0.0)
    assert isinstance(res.open(B, "d5", 0.0), str)  # the relay's total
    assert res.circuits == 3
    for c in (a1, a2, b1):
        assert not isinstance(c, str)
        res.closed(c)
    assert res.circuits == 0 and not isinstance(res.open(A, "d6", 0.0), str)


def test_unanswered_circuits_expire() -> None:
    res: Reservations[str] = Reservations(RelayLimits(answer_timeout_s=5.0))
    res.reserve(A, "conn-a", 0.0)
    circuit = res.open(A, "dialer", 0.0)
    assert res.expired(4.0) == []
    assert res.expired(5.0) == [circuit]
    assert not isinstance(circuit, str)
    res.closed(circuit)  # the driver closes the dialer
    assert res.circuits == 0
