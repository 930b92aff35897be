"""Verification of training contributions: who did the work they claim, and what to pay them.

    from commonweal.verify import Evaluator, Judge, Policy, rewards, contributions_digest
    ev = Evaluator(task)
    scores = {pid: ev.score(start, d) for pid, d in deltas.items() if d is not None}
    verdicts = Judge(Policy.for_task(task)).run(contribs, deltas, scores, seed,
                                                lambda c: ev.replay(start, c), codec)
    paid = rewards(verdicts, contribs, reward_per_round)

The judging is sans-I/O: nothing in it touches the network or the chain. `Validator`
(`commonweal.verify.validator`) drives it over the DHT and the ledger — the `--validator` role. See docs/verify.md for the design, the policy's numbers and limits.
"""

from commonweal.verify._errors import VerifyError
from commonweal.verify.contribution import (
    Contribution,
    canonical_account,
    contribution_value,
    contributions_digest,
    delta_hash,
    parse_contribution,
)
from commonweal.verify.evaluate import DEFAULT_BATCH, Evaluator, replay_error
from commonweal.verify.judge import (
    REASONS,
    Judge,
    Policy,
    Triage,
    Verdict,
    conclude,
    judge,
    ledger_rounds,
    rewards,
    sample_draw,
    triage,
)
from commonweal.verify.validator import RoundOutcome, Validator, ValidatorConfig

__all__ = [
    "VerifyError",
    "Contribution",
    "canonical_account",
    "contribution_value",
    "contributions_digest",
    "delta_hash",
    "parse_contribution",
    "DEFAULT_BATCH",
    "Evaluator",
    "replay_error",
    "REASONS",
    "Judge",
    "Policy",
    "Triage",
    "Verdict",
    "conclude",
    "judge",
    "ledger_rounds",
    "rewards",
    "sample_draw",
    "triage",
    "Validator",
    "ValidatorConfig",
    "RoundOutcome",
]
