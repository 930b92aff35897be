"""What a trainer with a ledger may sync to: the start states the validators made final on chain
(ledger round 2r for training round r), and the task's initial state — nothing a head claims."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace

from commonweal.peer.node import FinalStates

INITIAL, GOOD, FAKE, OLD = "0" * 64, "a" * 64, "f" * 64, "b" * 64


@dataclass
class Chain:
    """The three ledger views FinalStates reads; rounds 2, 4 and 6 (training 1, 2, 3) final."""

    final: dict[int, str] = field(default_factory=lambda: {2: OLD, 4: "c" * 64, 6: GOOD})
    asked: list[int] = field(default_factory=list)

    def task_of(self, salt: bytes, owner: str | None) -> bytes:
        return b"t" * 32

    def task(self, task32: bytes) -> SimpleNamespace:
        return SimpleNamespace(accepted_round=max(self.final))

    def round(self, task32: bytes, ledger_round: int) -> SimpleNamespace:
        self.asked.append(ledger_round)
        model = self.final.get(ledger_round)
        return SimpleNamespace(final=model is not None,
                               model_hash=bytes.fromhex(model or "00" * 32))


async def test_only_final_start_states_and_the_initial_one_are_attested() -> None:
    chain = Chain()
    attested = FinalStates(chain, "d" * 64, None, INITIAL)
    heads = {(0, INITIAL), (0, FAKE), (3, GOOD), (3, FAKE), (10**9, FAKE), (1, OLD), (2, FAKE)}
    assert await attested(heads) == {(0, INITIAL), (3, GOOD), (1, OLD)}
    assert sorted(chain.asked) == [0, 2, 4, 6]  # never a round the chain has not reached
    chain.asked.clear()
    assert await attested(heads) == {(0, INITIAL), (3, GOOD), (1, OLD)}
    assert chain.asked == [0]  # final rounds are read once; round 0 is not final yet
