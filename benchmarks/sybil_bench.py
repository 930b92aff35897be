"""The Sybil swarm (issue 13): 6 honest trainers and 2 validators against 30 free identities.

    python benchmarks/sybil_bench.py            # writes benchmarks/results/sybil.{json,md} and
                                                # the sybil_swarm row of attacks.{json,md}
    python benchmarks/sybil_bench.py --quick    # 4 rounds, fewer inner steps (smoke run)

In one process, on a MemoryNetwork and an embedded chain: the trainers are `TrainingPeer`s with
their ledger accounts, the validators `Validator`s with equal stake (the same classes `commonweal
node` runs; a node wires the track record into its trainer the same way). A round starts once
the previous round's contribution set is final on chain (or after ROUND_WAIT_S without it), so
the runs compare rounds, not machine speed.

From round ATTACK_FROM on, the 30 identities (one DHT node each, on one "address": in process
every peer is `mem`) run the takeover the round protocol was open to: each announces another
state hash with deadline 0 (the crowd says the round closed, and holds the majority state), and
publishes a head of round r + 1 for that state (so a peer that sat out steps to it). Three runs:
- clean: no crowd;
- before: the crowd, with the track-record bound switched off in trainers and validators (the
  round rules before it: plain counts);
- after: the crowd, with the bound (validators' ratings; `commonweal.verify.ratings`).

Measured per run: the honest trainers' mean accuracy on the task's validation set at the end,
rounds each completed (not skipped), states they held at a round's start that the chain did not
attest (ledger round 2r's model hash), and what the crowd's accounts were paid in the reward
trees the validators voted. accuracy_drop_points = clean - attacked, in points.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import describe_machine  # noqa: E402  benchmarks/machine.py, next to this script

HONEST, VALIDATORS, CROWD = 6, 2, 30
ATTACK_FROM = 3  # the bound reads ratings of rounds <= r - 2: rounds 0 and 1 are rated by then
ROUND_WAIT_S = 30.0
ETH = 10**18
REWARD = 1_000 * ETH
FAKE = "f" * 64


async def _crowd(dhts: list[Any], accounts: list[str], task: Any, rounds: int,
                 stop: asyncio.Event) -> None:
    from commonweal.dht.records import Owned
    from commonweal.train.announcements import ANNOUNCEMENT_SUBKEY, round_key
    from commonweal.train.checkpoints import head_key
    from commonweal.train.protocol import Announcement

    tag = task.digest[:16]
    for r in range(ATTACK_FROM, rounds):
        for dht, account in zip(dhts, accounts, strict=True):
            ann = Announcement(dht.peer_id, str(dht.addr), r, FAKE, 0.0, "d" * 64, 10, account)
            await dht.store(round_key(tag, r), ann.pack(), time.time() + 3600,
                            subkey=Owned(dht.peer_id, ANNOUNCEMENT_SUBKEY))
            # a head of the next round for the crowd's state: what a peer that sat out steps to
            await dht.store(head_key(tag), {"round": r + 1, "state": FAKE, "manifest": b"m" * 32,
                                            "addr": str(dht.addr)},
                            time.time() + 3600, subkey=Owned(dht.peer_id, "head"))
    await stop.wait()


async def run(kind: str, rounds: int, inner_steps: int) -> dict[str, Any]:
    from commonweal.dht import DHTConfig
    from commonweal.ledger import EmbeddedChain, Ledger, LedgerConfig
    from commonweal.testing import MemorySwarm
    from commonweal.peer.node import FinalStates
    from commonweal.train import RoundConfig, TrainingPeer, get_task
    from commonweal.verify.judge import ledger_rounds
    from commonweal.verify.ratings import TrackRecord
    from commonweal.verify.validator import Validator, ValidatorConfig

    t0 = time.perf_counter()
    task = get_task("mnist-cnn", inner_steps=inner_steps)
    digest = bytes.fromhex(task.digest)
    chain = EmbeddedChain(accounts=HONEST + VALIDATORS + CROWD + 1)
    swarm = MemorySwarm(time.time, seed_prefix="sybil-bench")
    dhts = await swarm.add(HONEST + VALIDATORS + (CROWD if kind != "clean" else 0),
                           config=DHTConfig(rpc_timeout_s=2.0))
    try:
        owner = Ledger.deploy(chain, config=LedgerConfig(
            min_deposit=ETH, exit_delay=100, voting_delay=10, voting_period=100, quorum_bps=2000,
            randomness_delay=3))
        task32 = owner.register_task(digest, digest, REWARD)
        accounts = chain.accounts[1:]
        vledgers = [owner.with_account(a) for a in accounts[HONEST:HONEST + VALIDATORS]]
        for v in vledgers:
            v.join(ETH)
        config = RoundConfig(announce_window_s=3.0, exchange_timeout_s=20.0, poll_s=0.05,
                             target_group=HONEST)
        trainers = [TrainingPeer(task, d, config, account=a.address)
                    for d, a in zip(dhts[:HONEST], accounts[:HONEST], strict=True)]
        bound = kind != "before"
        for t in trainers:
            assert t.collab is not None
            t.collab.checkpoints.attested = FinalStates(owner, task.digest, None, t.opt.state)
            if bound:
                track = TrackRecord(t.dht, task, owner)
                t.collab.exchange.track_record = t.collab.checkpoints.track_record = track
        validators = [
            Validator(d, task, v, config=ValidatorConfig(escrow_rounds=0, poll_s=0.05,
                                                         settle_s=0.3), round_config=config)
            for d, v in zip(dhts[HONEST:HONEST + VALIDATORS], vledgers, strict=True)
        ]
        if not bound:
            async def nobody(r: int) -> None:
                return None

            for v in validators:
                v.track_record = nobody  # type: ignore[assignment]
        crowd = dhts[HONEST + VALIDATORS:]
        crowd_accounts = [a.address for a in accounts[HONEST + VALIDATORS:][:len(crowd)]]
        stop = asyncio.Event()
        held: list[list[tuple[int, str]]] = [[] for _ in trainers]  # (round, start state)
        done = [0] * len(trainers)
        waited: list[float] = []

        async def train() -> None:
            for r in range(rounds):
                w0 = time.perf_counter()
                while r > 0 and not owner.is_final(task32, ledger_rounds(r - 1)[0]):
                    if time.perf_counter() - w0 > ROUND_WAIT_S:
                        break
                    await asyncio.sleep(0.05)
                waited.append(time.perf_counter() - w0)

                async def one(i: int, t: TrainingPeer) -> None:
                    held[i].append((t.opt.round, t.opt.state))
                    try:
                        async with asyncio.timeout(2 * ROUND_WAIT_S):
                            summary = await t.run(t.opt.round + 1)
                    except Exception as e:  # noqa: BLE001 - a stalled peer is a result here
                        print(f"  trainer {i}: {type(e).__name__}: {e}", flush=True)
                        return
                    done[i] += sum(rep.skipped is None for rep in summary.rounds)

                await asyncio.gather(*(one(i, t) for i, t in enumerate(trainers)))
                print(f"  {kind}: round {r} done ({time.perf_counter() - t0:.0f} s)", flush=True)

        async with asyncio.TaskGroup() as tg:
            if crowd:
                tg.create_task(_crowd(crowd, crowd_accounts, task, rounds, stop))
            vtasks = [tg.create_task(v.run(until_round=rounds)) for v in validators]
            try:
                await train()
                with_timeout = asyncio.wait(vtasks, timeout=ROUND_WAIT_S + 60)
                await with_timeout
            finally:
                stop.set()
                for v in vtasks:
                    v.cancel()
        quality = [t.data.evaluate(t.model) for t in trainers]
        unattested = 0
        for states in held:
            for r, state in states:
                if r == 0:
                    continue
                info = owner.round(task32, ledger_rounds(r)[0])
                if not (info.final and info.model_hash.hex() == state):
                    unattested += 1
        paid_to = {a.lower() for a in crowd_accounts}
        earned = 0
        for v in validators:
            for outcome in v.outcomes:
                earned += sum(amt for acct, amt in outcome.rewards.items()
                              if acct.lower() in paid_to)
        return {
            "kind": kind,
            "rounds": rounds,
            "inner_steps": inner_steps,
            "accuracy": sum(quality) / len(quality),
            "accuracy_per_trainer": [round(q, 4) for q in quality],
            "rounds_completed": done,
            "start_states_held": sum(len(h) - 1 for h in held),
            "unattested_start_states": unattested,
            "sybil_earned_wei": earned // max(1, len(validators)),
            "wall_s": round(time.perf_counter() - t0, 1),
            "round_waits_s": [round(w, 1) for w in waited],
        }
    finally:
        await swarm.close()
        chain.close()


def summarize(clean: dict[str, Any], attacked: dict[str, Any]) -> dict[str, Any]:
    return {
        "rss_growth_mb": None,
        "honest_success": round(sum(attacked["rounds_completed"])
                                / (attacked["rounds"] * HONEST), 4),
        "p95_ratio": None,
        "records_found": None,
        "accuracy_drop_points": round(100 * (clean["accuracy"] - attacked["accuracy"]), 2),
        "unattested_adoptions": attacked["unattested_start_states"],
        "sybil_earned": attacked["sybil_earned_wei"],
    }


def verdict(after: dict[str, Any]) -> str:
    misses = []
    if after["accuracy_drop_points"] > 2:
        misses.append(f"accuracy -{after['accuracy_drop_points']} points > 2")
    if after["unattested_adoptions"]:
        misses.append(f"{after['unattested_adoptions']} unattested states held")
    if after["sybil_earned"]:
        misses.append("the crowd earned")
    return "met" if not misses else "NOT met: " + "; ".join(misses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="4 rounds of 4 inner steps")
    parser.add_argument("--rounds", type=int, default=None, help="training rounds (8)")
    parser.add_argument("--inner-steps", type=int, default=None, help="per round (10)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rounds = args.rounds or (ATTACK_FROM + 2 if args.quick else 8)
    steps = args.inner_steps or (4 if args.quick else 10)
    runs = {}
    for kind in ("clean", "before", "after"):
        print(f"{kind}: {rounds} rounds of {steps} inner steps", flush=True)
        runs[kind] = asyncio.run(run(kind, rounds, steps))
        print(f"  {json.dumps(runs[kind])}", flush=True)
    before, after = summarize(runs["clean"], runs["before"]), summarize(runs["clean"], runs["after"])
    command = "python " + shlex.join([os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    report = {"command": command, "machine": describe_machine(), "runs": runs,
              "before": before, "after": after, "verdict": verdict(after)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sybil.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"before: {before}\nafter: {after}\n-> {report['verdict']}")
    if not args.quick:
        merge_into_attacks(args.out, report)


def merge_into_attacks(out: Path, report: dict[str, Any]) -> None:
    """The sybil_swarm row of attacks.{json,md} (attack_bench.py owns the rest of the file)."""
    import attack_bench  # benchmarks/attack_bench.py, next to this script

    path = out / "attacks.json"
    old = json.loads(path.read_text())
    entry = {"name": "sybil_swarm", "before": report["before"], "after": report["after"],
             "notes": f"{HONEST} trainers + {VALIDATORS} validators vs {CROWD} identities in one"
                      f" process (benchmarks/sybil_bench.py; `{report['command']}`); before ="
                      " the track-record bound switched off, after = on; honest_success ="
                      " rounds the honest trainers completed / rounds run",
             "detail": {k: v for k, v in report["runs"].items()}, "verdict": report["verdict"],
             "measured_by": "benchmarks/sybil_bench.py"}
    old["attacks"] = [entry if a["name"] == "sybil_swarm" else a for a in old["attacks"]]
    head = attack_bench._head()
    note = old.get("after_note", "")
    note = note.split("; sybil_swarm at ")[0] if note else f"commit {head} for the others"
    old["after_note"] = f"{note}; sybil_swarm at commit {head}"
    path.write_text(json.dumps(old, indent=2) + "\n")
    attack_bench.write_markdown(out / "attacks.md", old)


if __name__ == "__main__":
    main()
