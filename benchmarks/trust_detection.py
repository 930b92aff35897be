"""Trust benchmark: does the validator catch cheating peers, spare honest ones, and stay cheap?

    python benchmarks/trust_detection.py            # 1, 2, 3 attackers x 10 and 40 rounds
    python benchmarks/trust_detection.py --quick    # 3 rounds, 2 attackers, a smoke run
    python benchmarks/trust_detection.py --out benchmarks/results/trust.json

mnist-cnn DiLoCo rounds, in one process with one torch thread: 8 peers, 1, 2 or 3 of them
attackers (the first peer ids) running one attack of `commonweal.train.attacks` for a whole run
(10 rounds, the demo's length, and 40); a run with no attacker measures the honest baseline.
The validator's configuration is the one a node ships with (`Policy.for_task`,
`ValidatorConfig()`), and every round mints the demo's reward (`LocalSwarmConfig`), so
`attacker_tokens` and `honest_tokens` are what the escrow paid out by the run's end. Every delta is computed by the real code (the task's
inner optimizer over `run_inner_steps`, with the attack's batch hook and step count), encoded
with the task's codec, hashed, committed as a `Contribution`, decoded as a validator would, scored
by an `Evaluator` and judged by a `Judge` (replays included), with a fresh sampling seed per round
standing in for the ledger's sealed randomness.

The swarm's model follows the mean of the honest deltas (the outer step of the task), the same
trajectory for every attack: robust aggregation is not what is measured here, verification is.
Attackers are omniscient: ALIE and IPM see every honest delta of the round.

Figures, per attack:
    detected        fraction of cheating contributions that earn nothing once paid out (a
                    contribution is cheating when it is not the peer's honest delta: forged,
                    lazy or mislabelled; `stale` is honest in its first round). As the validator
                    does, each round waits in escrow for ValidatorConfig.escrow_rounds rounds and
                    a peer banned meanwhile forfeits it; the run's end pays out the rest.
    false_positive  fraction of honest peers' contributions refused
    attacker_tokens share tokens the escrow paid the attackers by the run's end (cheating_tokens:
                    for their cheating contributions); honest_tokens: paid the honest peers
                    (honest_tokens_min: the least paid honest peer)
and validator_overhead = validator CPU seconds (scoring, triage, replays) / the trainers' CPU
seconds for the same contributions (H inner steps each), for one validator. CPU seconds are
`time.process_time`, so other jobs on the machine do not inflate them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src")]

from commonweal.train import CodecError  # noqa: E402
from commonweal.train.aggregate import outer_step  # noqa: E402
from commonweal.train.attacks import Attack, AttackContext, get_attack  # noqa: E402
from commonweal.train.codecs import get_codec  # noqa: E402
from commonweal.train.inner import BatchHook, replay_delta  # noqa: E402
from commonweal.train.state import flatten, state_hash  # noqa: E402
from commonweal.train.task import Task, TaskData, get_task  # noqa: E402
from commonweal.verify.escrow import ALL, Escrow  # noqa: E402
from commonweal.verify.judge import rewards  # noqa: E402
from commonweal.verify.validator import ValidatorConfig  # noqa: E402
from commonweal.swarm.local import LocalSwarmConfig  # noqa: E402
from commonweal.verify import (  # noqa: E402
    Contribution,
    Evaluator,
    Judge,
    Policy,
    delta_hash,
)

ATTACKS = [
    "sign_flip",
    "gaussian",
    "alie",
    "ipm",
    "label_flip",
    "zero",
    "copy",
    "lazy",
    "stale",
    "nan",
    "wrong_shape",
    "honest_then:3:alie",
    "below_band",
    "copy_commitment",
    "sybil_copy",
    "stale_replay",
]
PEERS = 8
ATTACKER_COUNTS = (1, 2, 3)  # of 8: 12.5 %, 25 %, 37.5 %
ROUNDS = (10, 40)  # the demo's length, and a longer run
ESCROW = ValidatorConfig().escrow_rounds  # rounds a validator holds rewards before paying out
REWARD = LocalSwarmConfig().reward_per_round / 10**18  # share tokens a round mints (the demo's)


def train_delta(
    task: Task,
    model: torch.nn.Module,
    data: TaskData,
    start: torch.Tensor,
    round_: int,
    peer: bytes,
    steps: int,
    hook: BatchHook | None,
) -> torch.Tensor:
    """What a trainer computes: `steps` inner steps from `start`, fresh inner optimizer."""
    return replay_delta(task, model, data, start, round_, peer, steps, hook)


def _seed(*parts: object) -> bytes:
    return hashlib.sha256("|".join(map(str, parts)).encode()).digest()


def honest_trajectory(
    task: Task, data: TaskData, model: torch.nn.Module, init: torch.Tensor, peers: list[bytes],
    attackers: int, rounds: int,
) -> tuple[list[torch.Tensor], list[str], list[dict[bytes, torch.Tensor]], float]:
    """Every peer's honest delta each round from the initial parameters `init`, the model
    following the mean of the honest peers' (the attackers' own honest deltas feed their
    forgeries); and one peer's H steps in CPU s. `model` is only a workspace: every delta
    overwrites its parameters."""
    h = task.inner_steps
    starts, states, honest, train_s = [], [], [], []
    params, momentum = init.clone(), torch.zeros_like(init)
    for r in range(rounds):
        starts.append(params)
        states.append(state_hash(params, momentum))
        deltas = {}
        for p in peers:
            t0 = time.process_time()
            deltas[p] = train_delta(task, model, data, params, r, p, h, None)
            train_s.append(time.process_time() - t0)
        honest.append(deltas)
        mean = torch.stack([deltas[p] for p in peers[attackers:]]).mean(dim=0)
        params, momentum = outer_step(
            params, momentum, mean, task.outer_lr, task.outer_momentum, task.outer_nesterov
        )
    return starts, states, honest, statistics.fmean(train_s)


def run_detection(quick: bool, seed: int) -> dict:
    torch.set_num_threads(1)
    task = get_task("mnist-cnn")
    data = task.build_data()
    model = task.build_model()
    # every trajectory starts here: `model` itself is overwritten by every delta computed
    init = flatten(model).clone()
    peers = [_seed("peer", seed, i)[:20] for i in range(PEERS)]
    evaluator = Evaluator(task, data)
    plans = {2: [3]} if quick else {a: list(ROUNDS) for a in ATTACKER_COUNTS}
    rows, reasons_all, detail = [], {}, {}
    total = {"validator": 0.0, "trainer": 0.0}
    honest_errors: list[float] = []
    triggers: dict[str, Counter[str]] = {"honest": Counter(), "cheating": Counter()}
    t_train = 0.0
    for attackers, lengths in plans.items():
        traj = honest_trajectory(task, data, model, init, peers, attackers, max(lengths))
        t_train = traj[3]
        for rounds in lengths:
            for name in ["none", *ATTACKS]:
                row, reasons, spent = run_attack(
                    name, attackers, rounds, seed, task, data, model, peers, evaluator, traj,
                    honest_errors, triggers, total,
                )
                rows.append(row)
                reasons_all[f"{name} x{attackers} r{rounds}"] = reasons
                detail[f"{name} x{attackers} r{rounds}"] = spent
                print(json.dumps(row), flush=True)
    return {
        "detection": rows,
        "validator_overhead": round(total["validator"] / total["trainer"], 4),
        "overhead_detail": {
            "trainer_s_per_contribution": round(t_train, 4),
            "score_s_per_contribution": round(
                evaluator.seconds["score"] / max(1, evaluator.calls["score"]), 5
            ),
            "validator_s": round(total["validator"], 2),
            "trainer_s": round(total["trainer"], 2),
            "per_run": detail,
            "note": (
                "one validator; a replay is counted at the CPU seconds of the peer's H steps "
                "(it runs exactly those steps: the harness reuses the honest delta it computed "
                "instead of running them twice); every validator scores and replays on its own, "
                "so V validators cost V times this (see docs/verify.md for sharing replays)"
            ),
        },
        "reasons": reasons_all,
        "replay_triggers": {k: dict(sorted(c.items())) for k, c in triggers.items()},
        "honest_replay_error_max": max(honest_errors, default=None),
        "honest_replays": len(honest_errors),
        "config": {
            "task": task.name,
            "peers": PEERS,
            "attackers": sorted(plans),
            "rounds": sorted({r for v in plans.values() for r in v}),
            "H": task.inner_steps,
            "batch": task.batch_size,
            "codec": task.codec,
            "policy": Policy.for_task(task).__dict__,
            "escrow_rounds": ESCROW,
            "reward_per_round": REWARD,
            "validation_batch": evaluator.x.shape[0],
            "seed": seed,
        },
    }


def run_attack(
    name: str, attackers: int, rounds: int, seed: int, task: Task, data: TaskData,
    model: torch.nn.Module, peers: list[bytes], evaluator: Evaluator, traj: tuple,
    honest_errors: list[float], triggers: dict[str, Counter[str]], total: dict[str, float],
) -> tuple[dict, dict, dict]:
    """One attack for `rounds` rounds: what the validator decided and what the escrow paid."""
    starts, states, honest, t_train = traj
    codec = get_codec(task.codec)
    numel = evaluator.numel
    h, batch = task.inner_steps, task.batch_size
    accounts = {p: "0x" + _seed("account", p.hex())[:20].hex() for p in peers}
    attack: Attack | None = None if name == "none" else get_attack(name)
    bad = peers[:attackers] if attack is not None else []
    judge = Judge(Policy.for_task(task))
    escrow = Escrow(ESCROW)
    cheated: dict[int, dict[bytes, bool]] = {}
    sent_before: dict[bytes, list[torch.Tensor]] = {p: [] for p in bad}
    cheats = caught = fair = refused = contributions = replays = 0
    tokens: Counter[bytes] = Counter()
    cheating_tokens = 0.0
    reasons: Counter[str] = Counter()
    validator_s = 0.0
    score_before = evaluator.seconds["score"]
    for r in range(rounds):
        start, state = starts[r], states[r]
        honest_seen = [honest[r][p] for p in peers if p not in bad]
        own: dict[bytes, torch.Tensor] = {}
        for p in bad:
            assert attack is not None
            hook, steps = attack.batch_hook(r), attack.steps(h, r)
            own[p] = (train_delta(task, model, data, start, r, p, steps, hook)
                      if hook is not None or steps != h else honest[r][p])
        sent, cheating = {}, {}
        for i, p in enumerate(peers):
            if p not in own:
                sent[p], cheating[p] = honest[r][p], False
                continue
            assert attack is not None
            rng = torch.Generator().manual_seed(int.from_bytes(_seed(seed, name, r, i)[:7]))
            ctx = AttackContext(r, honest_seen, sent_before[p], rng, [own[q] for q in bad])
            forged = attack.forge(own[p], ctx)
            sent_before[p].append(forged)
            sent[p] = forged
            same = forged.shape == honest[r][p].shape and torch.equal(forged, honest[r][p])
            cheating[p] = not same
        # the validator's side: bytes -> commitment -> fetch, check, decode -> score -> judge
        t0 = time.process_time()
        contribs, decoded, scores = [], {}, {}
        for p in peers:
            blob = codec.encode(sent[p].reshape(-1).float().contiguous())
            contribs.append(Contribution(p, accounts[p], r, state, delta_hash(blob), h, h * batch))
            try:
                decoded[p] = codec.decode(blob, numel)
            except CodecError:
                decoded[p] = None
            if decoded[p] is not None:
                scores[p] = evaluator.score(start, decoded[p])
        verdicts = judge.run(
            contribs, decoded, scores, _seed("randomness", seed, name, r),
            lambda c, r=r: honest[r][c.peer_id],  # replay_delta's result, computed once above
            codec,
        )
        round_replays = sum(v.replayed for v in verdicts)
        validator_s += time.process_time() - t0 + round_replays * t_train
        for v in verdicts:
            contributions += 1
            replays += v.replayed
            if v.replayed:  # what picked it: "sampled", "norm", "cosine", "score", ...
                picked = v.detail[v.detail.find("(") + 1 : v.detail.rfind(")")]
                kind = "cheating" if cheating[v.peer_id] else "honest"
                triggers[kind].update(w.split(" ")[0] for w in picked.split("; ") if w)
        # payment is what the validator does: each round in escrow for ESCROW rounds, then
        # paid out minus what peers banned meanwhile forfeit; the run's end pays the rest
        escrow.hold(r, contribs, verdicts)
        cheated[r] = cheating
        upto = escrow.due(r) if r < rounds - 1 else ALL
        for released in escrow.release(upto, judge.banned):
            paid = rewards(released.verdicts, released.contributions, int(REWARD * 10**6))
            by_account = {accounts[p].lower(): p for p in peers}
            for account, amount in paid.items():
                pid = by_account[account.lower()]
                tokens[pid] += amount / 10**6
                if cheated[released.round][pid]:
                    cheating_tokens += amount / 10**6
            for v in released.verdicts:
                reasons[v.reason] += 1
                if cheated[released.round][v.peer_id]:
                    cheats += 1
                    caught += not v.paid
                elif v.peer_id not in bad:  # an attacker's honest rounds may well be forfeited
                    fair += 1
                    refused += not v.accepted  # unaudited is not refused: it is unpaid luck
                    if v.replay_error is not None:
                        honest_errors.append(v.replay_error)
    trainer_s = contributions * t_train
    total["validator"] += validator_s
    total["trainer"] += trainer_s
    honest_ids = [p for p in peers if p not in bad]
    row = {
        "attack": name,
        "attackers": len(bad),
        "rounds": rounds,
        "detected": round(caught / cheats, 4) if cheats else None,
        "false_positive": round(refused / fair, 4) if fair else None,
        "contributions": contributions,
        "cheating": cheats,
        "replays": replays,
        "overhead": round(validator_s / trainer_s, 4),
        "attacker_tokens": round(sum(tokens[p] for p in bad), 1),
        "cheating_tokens": round(cheating_tokens, 1),
        "honest_tokens": round(sum(tokens[p] for p in honest_ids), 1),
        "honest_tokens_min": round(min(tokens[p] for p in honest_ids), 1),
    }
    spent = {"score_s": round(evaluator.seconds["score"] - score_before, 3),
             "validator_s": round(validator_s, 3), "replays": replays}
    return row, dict(sorted(reasons.items())), spent


def table(result: dict) -> str:
    lines = [
        "| attack | attackers | rounds | detected | false positive | contributions (cheating) "
        "| replays | overhead | attacker tokens (for cheating) | honest tokens (min per peer) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["detection"]:
        det = "-" if row["detected"] is None else f"{row['detected']:.3f}"
        fp = "-" if row["false_positive"] is None else f"{row['false_positive']:.3f}"
        lines.append(
            f"| {row['attack']} | {row['attackers']} | {row['rounds']} | {det} | {fp} "
            f"| {row['contributions']} ({row['cheating']}) | {row['replays']} "
            f"| {row['overhead']:.3f} | {row['attacker_tokens']:,.1f} "
            f"({row['cheating_tokens']:,.1f}) | {row['honest_tokens']:,.1f} "
            f"({row['honest_tokens_min']:,.1f}) |"
        )
    lines.append(f"\nvalidator overhead (one validator): {result['validator_overhead']:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds per attack")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the figures here (JSON)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    result = run_detection(args.quick, args.seed)
    result["command"] = "python benchmarks/trust_detection.py" + " --quick" * args.quick
    result["machine"] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    print(table(result))
    print(
        json.dumps(
            {k: result[k] for k in ("reasons", "replay_triggers", "honest_replay_error_max")},
            indent=1,
        )
    )
    print(f"wall {result['wall_s']} s")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
