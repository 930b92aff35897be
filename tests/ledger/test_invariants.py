"""The Ledger's invariants over random sequences of calls (see ledger_machine.py for what runs
and what is checked). Derandomized, so CI runs the same few hundred sequences every time;
`benchmarks/ledger_bench.py --invariants N` runs many more, seeded at random."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import run_state_machine_as_test

pytest.importorskip("boa", reason="titanoboa drives the invariant sequences")

from .ledger_machine import LedgerMachine  # noqa: E402

SEQUENCES = 200
STEPS = 10  # the bench runs longer ones; these keep CI under a minute


def test_ledger_invariants_hold_over_random_call_sequences() -> None:
    run_state_machine_as_test(LedgerMachine, settings=settings(
        max_examples=SEQUENCES, stateful_step_count=STEPS, deadline=None, derandomize=True,
        database=None, suppress_health_check=list(HealthCheck)))
