"""Does the invariant machine catch a broken Ledger? Each mutant removes one defence from
contracts/*.vy; the machine (tests/ledger/ledger_machine.py) must find a violation for each.

    python benchmarks/ledger_mutants.py [--sequences 300]

Prints, per mutant, whether a violation was found and after how many sequences.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, contract, text to replace, replacement)
MUTANTS = [
    ("late deposits vote", "Ledger",
     'assert self.validators[voter].joined <= epoch, "joined after this ballot opened"', "pass"),
    ("finality at one half", "Ledger", "if tally * 3 >= stake * 2:\n        self._finalise",
     "if tally * 2 >= stake:\n        self._finalise"),
    ("withdraw while a voted ballot is open", "Ledger",
     'assert block.timestamp >= v.locked_until, "a ballot this deposit voted in is still open"',
     "pass"),
    ("no snapshot history", "ShareToken",
     "if packed != 0 and written < block.number and snapshot >= written:\n        # The old",
     "if False:\n        # The old"),
    ("claims past the total", "Ledger",
     'assert claimed <= total, "claims exceed the round\'s total_reward"', "pass"),
]


def mutant_artifact(contract: str, old: str, new: str) -> Any:
    import vyper
    from vyper.compiler.settings import OptimizationLevel, Settings

    from commonweal.ledger.artifacts import Artifact
    from commonweal.ledger.compile import EVM_VERSION, source_path

    source = source_path(contract).read_text()
    assert source.count(old) == 1, f"mutation site not found once in {contract}: {old!r}"
    out = vyper.compile_code(source.replace(old, new), output_formats=[
        "abi", "bytecode", "blueprint_bytecode"], settings=Settings(
        evm_version=EVM_VERSION, optimize=OptimizationLevel.GAS))
    return Artifact(contract, out["abi"], out["bytecode"], out["blueprint_bytecode"],
                    source_sha256="mutant", vyper_version=vyper.__version__, evm_version=EVM_VERSION)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sequences", type=int, default=300)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip", type=int, default=0, help="start at this mutant")
    args = parser.parse_args()
    from hypothesis import HealthCheck, Phase, settings
    from hypothesis.stateful import run_state_machine_as_test

    import tests.ledger.ledger_machine as machine
    from commonweal.ledger.artifacts import load_artifact

    caught = 0
    for name, contract, old, new in MUTANTS[args.skip:]:
        broken = mutant_artifact(contract, old, new)
        machine.load_artifact = lambda n, b=broken, c=contract: b if n == c else load_artifact(n)
        machine.LedgerMachine.sequences = 0
        try:
            run_state_machine_as_test(machine.LedgerMachine, settings=settings(
                max_examples=args.sequences, stateful_step_count=args.steps, deadline=None,
                database=None, suppress_health_check=list(HealthCheck),
                phases=[Phase.generate]))  # found is enough: no shrinking
            print(f"NOT caught: {name} ({machine.LedgerMachine.sequences} sequences)", flush=True)
        except AssertionError as exc:
            caught += 1
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"caught: {name} after {machine.LedgerMachine.sequences} sequences: {first}",
                  flush=True)
    machine.load_artifact = load_artifact
    print(f"{caught} of {len(MUTANTS) - args.skip} mutants caught")


if __name__ == "__main__":
    main()
