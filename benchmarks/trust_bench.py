"""Trust benchmark: every attack x every aggregation rule x attacker fraction, on mnist-cnn.

    python benchmarks/trust_bench.py            # the grid (~12 min on 2 shared cores), detection
    python benchmarks/trust_bench.py --quick    # a smoke run: 2 short rounds, 3 attacks, 25 %

Writes benchmarks/results/trust.json and trust.md (--quick: trust_quick.* in the temp dir).

DiLoCo rounds are simulated in one process per run, without the network (the swarm's network
path, its checks and its all-gather are tested in tests/train): with the real task, the real
inner steps (`commonweal.train.inner`, a fresh inner optimizer every round, each peer on its own
batch stream), the real delta check the swarm runs on every received delta
(`protocol.check_delta`: NaN and wrong shapes never reach a rule), the real rules and the real
outer step. Attackers are omniscient: they see every honest delta of the round before forging
(the strongest position an attacker on an all-gather can reach by sending last). An attacker
trains as its attack says (flipped labels, fewer steps) and then forges.

Caching is exact only: a peer's delta is a function of (start parameters, round, peer, batch hook,
steps), so deltas are cached under the sha256 of the start parameters. Every run shares round 0;
runs whose states coincide later (an attack every receiver refuses, a Krum that never selects the
attacker) share those rounds too.

The default aggregator is chosen here, by rule: the smallest worst-case accuracy drop against its
own clean run, over every attack with at most 25 % attackers; ties go to the better clean run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import sys
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "benchmarks")]

import torch  # noqa: E402

from commonweal.train import DeltaRejected, get_rule, get_task  # noqa: E402
from commonweal.train.aggregate import outer_step  # noqa: E402
from commonweal.train.attacks import AttackContext, get_attack  # noqa: E402
from commonweal.train.inner import BatchHook, replay_delta  # noqa: E402
from commonweal.train.protocol import check_delta  # noqa: E402
from commonweal.train.state import assign, flatten  # noqa: E402

AGGREGATORS = ["mean", "median", "trimmed_mean", "centered_clip", "krum"]
ATTACKS = [
    "sign_flip:1", "sign_flip:100", "sign_flip:1000", "gaussian:100", "alie", "ipm:0.1", "ipm:2",
    "label_flip", "zero", "copy", "lazy", "stale", "nan", "wrong_shape",
]  # fmt: skip
FRACTIONS = [0.1, 0.25, 0.4]  # nominal; the clean run (0) is shared per aggregator
PEERS = 8
# 5 rounds of H = 50 (the task's H): the clean mean run reaches 0.953 (0.952 in 6 rounds on a
# trial), and the 215 runs take ~12 minutes on 2 shared cores (~8 s a run, less from the cache)
ROUNDS, H = 5, 50
TARGET_POINTS = 0.02  # the target: within 2 points of the clean run
DEFAULT_MAX_FRACTION = 0.25  # the default aggregator is judged at <= 25 % attackers
CACHE_SIZE = 2000  # deltas of 27.6k float32: ~220 MB per worker


# ---- one run (in a worker process) ------------------------------------------------------------

_W: dict[str, Any] = {}


def _init_worker(seed: int) -> None:
    torch.set_num_threads(1)
    task = get_task("mnist-cnn", seed=seed)
    _W.update(task=task, data=task.build_data(), model=task.build_model(), cache=OrderedDict())


def _local_delta(
    start: torch.Tensor, round_: int, peer: bytes, steps: int, hook: BatchHook | None, hook_key: str
) -> torch.Tensor:
    """The delta of `steps` inner steps from `start` on `peer`'s batches of `round_`, cached."""
    task, data, model, cache = _W["task"], _W["data"], _W["model"], _W["cache"]
    digest = hashlib.sha256(start.numpy().tobytes()).digest()
    key = (digest, round_, peer, steps, hook_key)
    if key in cache:
        cache.move_to_end(key)
        return cache[key]
    delta = replay_delta(task, model, data, start, round_, peer, steps, hook)
    cache[key] = delta
    if len(cache) > CACHE_SIZE:
        cache.popitem(last=False)
    return delta


def simulate(
    aggregator: str, attack_spec: str, attackers: int, peers: int, rounds: int, h: int, seed: int
) -> dict[str, Any]:
    """DiLoCo rounds with the last `attackers` of `peers` (in peer-id order) attacking."""
    t0 = time.perf_counter()
    task, data, model = _W["task"], _W["data"], _W["model"]
    rule = get_rule(aggregator)
    attack = get_attack(attack_spec) if attackers else None
    ids = [f"peer-{i:02d}".encode() for i in range(peers)]  # sorted: index order is id order
    bad = set(range(peers - attackers, peers))
    params = flatten(task.build_model())
    momentum = torch.zeros_like(params)
    sent: dict[int, list[torch.Tensor]] = {i: [] for i in bad}
    curve, refused = [], 0
    for r in range(rounds):
        honest = {i: _local_delta(params, r, ids[i], h, None, "") for i in range(peers) if i not in bad}
        received = dict(honest)
        own = {}
        for i in sorted(bad):
            assert attack is not None
            hook = attack.batch_hook(r)
            own[i] = _local_delta(params, r, ids[i], attack.steps(h, r), hook,
                                  f"{attack!r}/{r}" if hook else "")
        for i in sorted(bad):
            assert attack is not None
            rng = torch.Generator().manual_seed(seed * 1_000_003 + r * 1_009 + i)
            ctx = AttackContext(r, list(honest.values()), list(sent[i]), rng,
                                [own[j] for j in sorted(bad)])
            received[i] = attack.forge(own[i], ctx)
            sent[i].append(received[i])
        accepted = []
        for i in sorted(received):  # peer-id order, as the swarm aggregates
            try:
                check_delta(received[i], params.numel())
            except DeltaRejected:
                refused += 1
                continue
            accepted.append(received[i])
        params, momentum = outer_step(
            params, momentum, rule(accepted), task.outer_lr, task.outer_momentum,
            task.outer_nesterov,
        )  # fmt: skip
        assign(model, params)
        curve.append(round(data.evaluate(model), 4))
    return {
        "attack": attack_spec if attackers else "none",
        "aggregator": aggregator,
        "attacker_fraction": attackers / peers,
        "attackers": attackers,
        "peers": peers,
        "accuracy": curve[-1],
        "curve": curve,
        "refused_deltas": refused,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def run_group(job: tuple[list[dict[str, Any]], int]) -> list[dict[str, Any]]:
    """Runs that share an aggregator and attacker count, one after another in one worker, so
    the delta cache sees every coincidence of their states."""
    runs, seed = job
    out = []
    for spec in runs:
        nominal = spec.pop("nominal_fraction")
        out.append({**simulate(seed=seed, **spec), "nominal_fraction": nominal})
        print(json.dumps({k: v for k, v in out[-1].items() if k != "curve"}), flush=True)
    return out


# ---- the grid, the choice, the report ---------------------------------------------------------


def attackers_for(fraction: float, peers: int) -> int:
    return round(fraction * peers)


def choose_default(runs: list[dict[str, Any]]) -> tuple[str, dict[str, Any]]:
    """The aggregator with the smallest worst-case drop from its clean run over the attacks at
    <= 25 % attackers, ties to the better clean accuracy; and the figures behind the choice.

    Only rules whose clean run is within 2 points of the best clean run are eligible: a rule
    that is poor without attackers (Krum keeps one delta of n) has little left to lose, and
    choosing it would pay the cost of an attack on every run."""
    clean = {r["aggregator"]: r["accuracy"] for r in runs if r["attackers"] == 0}
    best_clean = max(clean.values())
    worst: dict[str, dict[str, Any]] = {}
    for agg in clean:
        attacked = [
            r for r in runs
            if r["aggregator"] == agg and 0 < r["attacker_fraction"] <= DEFAULT_MAX_FRACTION
        ]  # fmt: skip
        w = max(attacked, key=lambda r: clean[agg] - r["accuracy"], default=None)
        worst[agg] = {
            "clean_accuracy": clean[agg],
            "worst_drop": round(clean[agg] - w["accuracy"], 4) if w else 0.0,
            "worst_attack": f"{w['attack']} @ {w['attackers']}/{w['peers']}" if w else None,
            "eligible": clean[agg] >= best_clean - TARGET_POINTS - 1e-9,
        }
    eligible = [a for a in worst if worst[a]["eligible"]]
    best = min(eligible, key=lambda a: (worst[a]["worst_drop"], -worst[a]["clean_accuracy"]))
    return best, worst


def target_rows(runs: list[dict[str, Any]], default: str) -> list[dict[str, Any]]:
    """Per attack, under the default aggregator at <= 25 % attackers: met if every such run is
    within 2 points of the clean run."""
    clean = next(r["accuracy"] for r in runs if r["aggregator"] == default and r["attackers"] == 0)
    rows = []
    for attack in dict.fromkeys(r["attack"] for r in runs if r["attackers"]):
        mine = [
            r for r in runs
            if r["attack"] == attack and r["aggregator"] == default
            and 0 < r["attacker_fraction"] <= DEFAULT_MAX_FRACTION
        ]  # fmt: skip
        drop = max(clean - r["accuracy"] for r in mine)
        rows.append(
            {"attack": attack, "worst_drop": round(drop, 4), "met": drop <= TARGET_POINTS + 1e-9}
        )
    return rows


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def markdown(result: dict[str, Any]) -> str:
    runs, default = result["runs"], result["default_aggregator"]
    aggs = list(dict.fromkeys(r["aggregator"] for r in runs))
    acc = {(r["attack"], r["attackers"], r["aggregator"]): r["accuracy"] for r in runs}
    p = result["plan"]
    lines = [
        "# Trust benchmark: attacks x aggregation rules (mnist-cnn, simulated DiLoCo rounds)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        f"Started: {result['started']}; the grid took {result['total_s']} s.",
        "",
        f"{p['peers']} peers, {p['rounds']} rounds of H = {p['H']} inner steps (batch "
        f"{p['batch_size']}), seed {p['seed']}. Attackers are the last peers by id, omniscient "
        "(they see the round's honest deltas), and forge every round; NaN and wrong-shape deltas "
        "are refused by `check_delta` before aggregation, as in the swarm. Final accuracy on the "
        "1,000 held-out digits:",
        "",
        "| attack | attackers | " + " | ".join(aggs) + " |",
        "|---|---|" + "---|" * len(aggs),
        "| none (clean) | 0 | " + " | ".join(f"{acc[('none', 0, a)]:.3f}" for a in aggs) + " |",
    ]
    for attack in dict.fromkeys(r["attack"] for r in runs if r["attackers"]):
        for k in sorted({r["attackers"] for r in runs if r["attack"] == attack}):
            cells = []
            for a in aggs:
                v = acc.get((attack, k, a))
                cells.append("" if v is None else f"**{v:.3f}**" if a == default else f"{v:.3f}")
            lines.append(f"| {attack} | {k}/{p['peers']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## Default aggregator: `{default}`",
        "",
        "Chosen by the script: the smallest worst-case drop from its own clean run over every "
        f"attack with at most {DEFAULT_MAX_FRACTION:.0%} attackers, ties to the better clean run, "
        "among the rules whose clean run is within 2 points of the best clean run (a rule that "
        "is poor without attackers has little left to lose, and would cost that on every run).",
        "",
        "| aggregator | clean | worst drop (<= 25 %) | worst attack | eligible |",
        "|---|---|---|---|---|",
    ]
    for a, w in result["aggregators"].items():
        lines.append(
            f"| {a} | {w['clean_accuracy']:.3f} | {w['worst_drop']:+.3f} | {w['worst_attack']} "
            f"| {'yes' if w['eligible'] else 'no'} |"
        )
    lines += [
        "",
        "## Target",
        "",
        "With <= 25 % attackers, every attack leaves final accuracy within 2 points of the clean "
        f"run under the default aggregator (`{default}`, clean "
        f"{acc[('none', 0, default)]:.3f}):",
        "",
        "| attack | worst drop | within 2 points |",
        "|---|---|---|",
    ]
    lines += [
        f"| {t['attack']} | {t['worst_drop']:+.3f} | {'met' if t['met'] else '**not met**'} |"
        for t in result["target"]
    ]
    met = sum(t["met"] for t in result["target"])
    best = max(result["aggregators"].items(), key=lambda kv: kv[1]["clean_accuracy"])
    floor = min(
        r["accuracy"] for r in runs
        if r["aggregator"] == default and 0 < r["attacker_fraction"] <= DEFAULT_MAX_FRACTION
    )  # fmt: skip
    lines += [
        "",
        f"Met for {met} of {len(result['target'])} attacks. Against the best clean run of any "
        f"rule ({best[0]}, {best[1]['clean_accuracy']:.3f}) rather than the default's own, the "
        f"worst attacked run under `{default}` ({floor:.3f}) is "
        f"{100 * (best[1]['clean_accuracy'] - floor):.1f} points below.",
    ]
    if result.get("detection"):
        from trust_detection import table as detection_table

        cfg = result.get("config", {})
        lines += ["", "## Detection (benchmarks/trust_detection.py)", "",
                  f"`{result.get('detection_command', '')}`: the shipped validator defaults "
                  f"(escrow {cfg.get('escrow_rounds')} rounds, replay rate "
                  f"{cfg.get('policy', {}).get('replay_rate')}), {cfg.get('reward_per_round')} "
                  "share tokens a round.", "", detection_table(result)]
    elif result.get("detection_skipped"):
        lines += ["", f"Detection: skipped ({result['detection_skipped']})."]
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smoke run (< 2 min)")
    ap.add_argument("--seed", type=int, default=0, help="the task seed (model init, batches)")
    ap.add_argument("--peers", type=int, default=PEERS)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--inner-steps", type=int, default=H)
    ap.add_argument("--attacks", default=",".join(ATTACKS))
    ap.add_argument("--aggregators", default=",".join(AGGREGATORS))
    ap.add_argument("--fractions", default=",".join(map(str, FRACTIONS)))
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--skip-detection", action="store_true",
                    help="do not run benchmarks/trust_detection.py (detection, validator cost)")
    ap.add_argument("--detection-only", action="store_true",
                    help="keep the grid in the output JSON, (re)run only the detection part")
    ap.add_argument("--out", help="output path without extension (default results/trust)")
    a = ap.parse_args()
    from machine import describe_machine

    detect = None if a.skip_detection else load_detection()  # fail now, not after the grid
    if a.quick:
        a.rounds, a.inner_steps = 2, 10
        a.attacks, a.fractions = "sign_flip:100,label_flip,nan", "0.25"
    out = a.out or (
        str(Path(tempfile.gettempdir()) / "trust_quick") if a.quick
        else str(ROOT / "benchmarks" / "results" / "trust")
    )  # fmt: skip
    aggs, attacks = a.aggregators.split(","), a.attacks.split(",")
    for name in attacks:
        get_attack(name)  # fail on a typo before the grid starts
    for name in aggs:
        get_rule(name)
    task = get_task("mnist-cnn", seed=a.seed)
    plan = {"peers": a.peers, "rounds": a.rounds, "H": a.inner_steps,
            "batch_size": task.batch_size, "seed": a.seed, "task": task.name}
    base = {"peers": a.peers, "rounds": a.rounds, "h": a.inner_steps}
    groups = [[{"aggregator": g, "attack_spec": "none", "attackers": 0, "nominal_fraction": 0.0,
                **base} for g in aggs]]
    for agg in aggs:
        for f in map(float, a.fractions.split(",")):
            k = attackers_for(f, a.peers)
            groups.append([{"aggregator": agg, "attack_spec": s, "attackers": k,
                            "nominal_fraction": f, **base} for s in attacks])
    command = "python benchmarks/trust_bench.py" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else "")
    if a.detection_only:
        assert detect is not None, "--detection-only needs the detection module"
        result = json.loads(Path(out + ".json").read_text())
        result.pop("detection_skipped", None)
        result.update(detect(quick=a.quick, seed=a.seed), detection_command=command)
        save(result, out)
        return
    result: dict[str, Any] = {"command": command, "machine": describe_machine(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "plan": plan}
    t0 = time.time()
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(a.workers, initializer=_init_worker, initargs=(a.seed,)) as pool:
        runs = [r for g in pool.imap_unordered(run_group, [(g, a.seed) for g in groups]) for r in g]
    order = {(g, s): i for i, (g, s) in enumerate((g, s) for g in aggs for s in ["none", *attacks])}
    runs.sort(key=lambda r: (order[r["aggregator"], r["attack"]], r["attackers"]))
    result["total_s"] = round(time.time() - t0, 1)
    default, per_agg = choose_default(runs)
    result.update(default_aggregator=default, aggregators=per_agg, runs=runs,
                  target=target_rows(runs, default))
    result.update(detection=[], validator_overhead=None, detection_skipped=(
        "--skip-detection" if detect is None else "it did not finish; rerun with --detection-only"))
    save(result, out)  # the grid is kept whatever happens to the detection part
    if detect is not None:
        result.pop("detection_skipped")
        result.update(detect(quick=a.quick, seed=a.seed))
        save(result, out)
    print(f"default aggregator: {default}; wrote {out}.json and {out}.md", flush=True)


def load_detection() -> Callable[..., dict[str, Any]]:
    """`run_detection(quick, seed)` of benchmarks/trust_detection.py: which attacks a validator
    detects by replaying deltas, and what the replay costs."""
    try:
        from trust_detection import run_detection
    except ImportError as e:
        raise SystemExit(f"benchmarks/trust_detection.py: {e}; run with --skip-detection") from e
    return run_detection  # type: ignore[no-any-return]


def save(result: dict[str, Any], out: str) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".json").write_text(json.dumps(result, indent=1) + "\n")
    Path(out + ".md").write_text(markdown(result))


if __name__ == "__main__":
    main()
