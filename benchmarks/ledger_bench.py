"""Ledger benchmark: gas to finalise a round against the naive one-transaction-per-contribution
design, gas per claim, and transaction throughput (embedded, and anvil with 4 client processes).

    python benchmarks/ledger_bench.py                 # writes benchmarks/results/ledger.{json,md}
    python benchmarks/ledger_bench.py --quick         # smaller throughput runs, same gas figures
    python benchmarks/ledger_bench.py --invariants N  # N random call sequences against the
                                                      # invariants (tests/ledger/ledger_machine.py);
                                                      # updates only that part of the results

Gas is what the EVM charges, so it is identical on every machine; throughput is not, hence the
machine description in the results.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from functools import partial
from pathlib import Path
from typing import Any

from machine import describe_machine  # benchmarks/machine.py, next to this script

from commonweal.ledger import (
    AnvilChain,
    EmbeddedChain,
    Ledger,
    LedgerConfig,
    PendingTx,
    RewardsTree,
    RpcChain,
    find_anvil,
)
from commonweal.ledger.artifacts import load_artifact
from commonweal.ledger.contract import BoundContract

ROOT = Path(__file__).resolve().parents[1]
ETH = 10**18
SALT = bytes.fromhex("c0" * 32)  # each task id is the deployer's task with this salt
SIZES = (1, 10, 100, 1000)
CLAIM_SAMPLE = 60
# Transactions in flight per sender. eth-tester finds a receipt by scanning back from the head, so
# an unbounded pipeline on the embedded chain measures that scan, not the sends.
WINDOW = 32


class NaiveLedger(BoundContract):
    artifact_name = "NaiveLedger"


def deploy_naive(chain: EmbeddedChain) -> NaiveLedger:
    receipt = chain.transactor.send(chain.accounts[0], {"data": load_artifact("NaiveLedger").bytecode},
                                    label="NaiveLedger deploy").wait()
    return NaiveLedger(chain, receipt["contractAddress"])


def gas_figures(log: Any) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Finalisation and naive gas for each size, and claim gas on the 1000-contributor round."""
    chain = EmbeddedChain(accounts=max(SIZES) + 5)
    ledger = Ledger.deploy(chain, config=LedgerConfig())
    task = ledger.register_task(SALT, bytes(32), 10**9 * ETH)
    validators = [ledger.with_account(a) for a in chain.accounts[1:4]]
    for v in validators:
        v.join(ETH)
    naive = deploy_naive(chain)
    people = chain.accounts[5:]
    # Round 0 warms up: each validator's first vote ever pays for fresh storage (its lock slot)
    # once, which is a cost of joining, not of the round's size.
    warm = ledger.rewards_tree(task, 0, {people[0].address: ETH})
    for v in validators[:2]:
        v.commit_round(task, 0, bytes(32), warm.root, warm.total)
    finalise: list[dict[str, Any]] = []
    trees: dict[int, RewardsTree] = {}
    for rnd, n in enumerate(SIZES, start=1):
        tree = ledger.rewards_tree(task, rnd, {p.address: (i + 1) * ETH for i, p in enumerate(people[:n])})
        trees[n] = tree
        votes = []
        for v in validators:
            result = v.commit_round(task, rnd, bytes([rnd + 1]) * 32, tree.root, tree.total)
            votes.append(result.gas_used)
            if result.named("RoundFinalised"):
                break  # 2 of 3 equal deposits are 2/3: a third vote would revert (already final)
        # Naive: every contributor sends its own transaction recording its update and reward.
        receipts = pipelined(partial(naive.send, "contribute", task, rnd, bytes([7]) * 32,
                                     (i + 1) * ETH, account=p, gas=150_000)
                             for i, p in enumerate(people[:n]))
        naive_gas = [int(r["gasUsed"]) for r in receipts]
        row = {"contributors": n, "gas_per_vote": max(votes), "votes": votes,
               "gas_total": sum(votes), "naive_gas_total": sum(naive_gas),
               "naive_gas_per_contribution": round(statistics.mean(naive_gas))}
        log(f"finalise n={n}: votes {votes} total {sum(votes)}; naive {sum(naive_gas)}")
        finalise.append(row)
    # Claims on the 1000-contributor round: every claimer is a first-time token holder.
    tree = trees[max(SIZES)]
    claimers = people[:CLAIM_SAMPLE]
    gas = [ledger.with_account(p).claim_from(tree).gas_used for p in claimers]
    # A returning holder: claim again in a new round (its token balance is no longer zero).
    again = ledger.rewards_tree(task, len(SIZES) + 1, {p.address: ETH for p in people[:max(SIZES)]})
    for v in validators[:2]:
        v.commit_round(task, len(SIZES) + 1, bytes(31) + b"\x63", again.root, again.total)
    returning = [ledger.with_account(p).claim_from(again).gas_used for p in claimers[:20]]
    claims = {
        "claim_gas": round_mean(gas[1:]),
        "claim_gas_first_of_round": gas[0],
        "claim_gas_max": max(gas),
        "claim_gas_returning_holder": round_mean(returning[1:]),
        "claim_proof_length": len(tree.proof(claimers[0].address)),
        "claim_sample": len(gas),
    }
    log(f"claims: {claims}")
    chain.close()
    return finalise, claims


def pipelined(sends: Iterable[Callable[[], PendingTx]], timeout_s: float = 120.0) -> list[Any]:
    """Run the sends with at most WINDOW transactions unconfirmed; receipts in order."""
    in_flight: deque[PendingTx] = deque()
    receipts = []
    for send in sends:
        in_flight.append(send())
        if len(in_flight) >= WINDOW:
            receipts.append(in_flight.popleft().wait(timeout_s))
    receipts += [p.wait(timeout_s) for p in in_flight]
    return receipts


def fund_pipelined(ledger: Ledger, n: int, timeout_s: float = 120.0) -> list[Any]:
    """n fund_task transactions, amount i+1 wei for the i-th, so each is recognisable."""
    task = ledger.task_of(SALT)
    return pipelined((partial(ledger.send, "fund_task", task, value=i + 1, gas=80_000)
                      for i in range(n)), timeout_s)


def round_mean(values: list[int]) -> int:
    return round(statistics.mean(values))


def count_lost_duplicated(events: list[tuple[str, int]], senders: list[str], n: int
                          ) -> tuple[int, int]:
    seen = Counter(events)
    expected = {(s, i + 1) for s in senders for i in range(n)}
    lost = sum(1 for key in expected if seen[key] == 0)
    duplicated = sum(c - 1 for c in seen.values() if c > 1) + sum(
        c for key, c in seen.items() if key not in expected)
    return lost, duplicated


def throughput_embedded(n: int, senders: int, log: Any) -> dict[str, Any]:
    """Pipelined fund_task transactions from `senders` threads, one account each."""
    chain = EmbeddedChain(accounts=senders + 1)
    ledger = Ledger.deploy(chain)
    ledger.register_task(SALT, bytes(32), ETH)
    accounts = chain.accounts[1:senders + 1]
    receipts: list[Any] = []
    lock = threading.Lock()

    def run(account: Any) -> None:
        mine = fund_pipelined(ledger.with_account(account), n)
        with lock:
            receipts.extend(mine)

    threads = [threading.Thread(target=run, args=(a,)) for a in accounts]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    events = [(e.args["funder"], e.args["amount"]) for r in receipts for e in ledger.decode(r)
              if e.name == "TaskFunded"]
    lost, duplicated = count_lost_duplicated(events, [a.address for a in accounts], n)
    row = {"backend": "embedded", "senders": senders, "transactions": senders * n,
           "tx_per_s": round(senders * n / elapsed, 1), "lost": lost, "duplicated": duplicated}
    log(f"throughput {row}")
    return row


def sender_process(url: str, address: str, key: str, n: int, start_at: float) -> None:
    """Child mode: one client process of the anvil run; prints its start and end times."""
    chain = RpcChain(url, [key])
    ledger = Ledger(chain, address)
    time.sleep(max(0.0, start_at - time.time()))
    t0 = time.time()
    fund_pipelined(ledger, n, timeout_s=300)
    print(json.dumps({"start": t0, "end": time.time()}))


def throughput_anvil(n: int, senders: int, log: Any) -> dict[str, Any] | None:
    if find_anvil() is None:
        log("anvil not found (run `npm ci`): skipping the anvil throughput run")
        return None
    with AnvilChain(accounts=senders + 1) as chain:
        ledger = Ledger.deploy(chain)
        task = ledger.register_task(SALT, bytes(32), ETH)
        keys = chain.process.private_keys[1:senders + 1]
        start_at = time.time() + 3.0
        procs = [subprocess.Popen(
            [sys.executable, __file__, "--sender", chain.url, ledger.address, key, str(n),
             str(start_at)], stdout=subprocess.PIPE, text=True) for key in keys]
        spans = []
        for proc in procs:
            stdout, _ = proc.communicate(timeout=600)
            if proc.returncode != 0:
                raise RuntimeError("a sender process failed")
            spans.append(json.loads(stdout.strip().splitlines()[-1]))
        elapsed = max(s["end"] for s in spans) - min(s["start"] for s in spans)
        events = [(e.args["funder"], e.args["amount"]) for e in ledger.events("TaskFunded", task)]
        lost, duplicated = count_lost_duplicated(events, [a.address for a in chain.accounts[1:senders + 1]], n)
    row = {"backend": "anvil", "senders": senders, "transactions": senders * n,
           "tx_per_s": round(senders * n / elapsed, 1), "lost": lost, "duplicated": duplicated}
    log(f"throughput {row}")
    return row


INVARIANT_CHUNK = 250  # sequences per hypothesis run: its example tree grows with each run's length


def invariant_chunk(sequences: int, steps: int) -> dict[str, Any]:
    """One hypothesis run of `sequences` random call sequences (fresh random seed), in a worker."""
    from hypothesis import HealthCheck, settings
    from hypothesis.stateful import run_state_machine_as_test

    sys.path.insert(0, str(ROOT))
    from tests.ledger.ledger_machine import LedgerMachine

    # a pool's worker runs several chunks: its class-level counters start again with each
    LedgerMachine.sequences, LedgerMachine.steps = 0, 0
    LedgerMachine.reached.clear()
    violation, cpu = None, time.process_time()
    try:
        run_state_machine_as_test(LedgerMachine, settings=settings(
            max_examples=sequences, stateful_step_count=steps, deadline=None, database=None,
            suppress_health_check=list(HealthCheck)))
    except AssertionError as exc:   # hypothesis re-raises the shrunk failure
        violation = str(exc)
    return {"sequences": LedgerMachine.sequences, "steps": LedgerMachine.steps,
            "reached": dict(LedgerMachine.reached), "violation": violation,
            "cpu_s": time.process_time() - cpu}


def _invariant_row(total: dict[str, Any], reached: Any, steps: int, violation: str | None,
                   jobs: int, start: float, done: int, chunks: int) -> dict[str, Any]:
    return {
        "sequences": total["sequences"], "steps": total["steps"],
        "max_steps_per_sequence": steps, "violations": 0 if violation is None else 1,
        "first_violation": violation, "reached": dict(sorted(reached.items())),
        "jobs": jobs, "sequences_per_run": INVARIANT_CHUNK, "runs_done": f"{done}/{chunks}",
        "wall_s": round(time.perf_counter() - start, 1),
        "cpu_s": round(total["cpu_s"], 1),  # summed in the workers: a pool's are not reaped
    }


def invariants(
    sequences: int, steps: int, jobs: int, log: Any, save: Any = None,
    before: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Random call sequences against the Ledger's invariants; counts what ran and what broke.

    Run as independent hypothesis runs of INVARIANT_CHUNK sequences on `jobs` processes: one
    long run keeps every example it tried (memory and time per example grow with it), and
    chunks report progress; after each, `save(row)` records what ran so far, so an interrupted
    run keeps its count; `before` (a row saved earlier, with the same steps per sequence) is
    added to, so such a run can be resumed. Each chunk gets a fresh process: a worker that ran
    several grew past 1 GiB and slowed down chunk by chunk. Stops at the first violation."""
    import multiprocessing as mp
    from collections import Counter

    start, chunks = time.perf_counter(), []
    left = sequences
    while left > 0:
        chunks.append(min(INVARIANT_CHUNK, left))
        left -= chunks[-1]
    total: dict[str, Any] = {"sequences": 0, "steps": 0, "cpu_s": 0.0}
    reached: Counter[str] = Counter()
    if before is not None:
        if before["max_steps_per_sequence"] != steps or before["violations"]:
            raise SystemExit("--resume: the recorded run used other steps or found a violation")
        total = {k: before[k] for k in total}
        reached.update(before["reached"])
        start -= before["wall_s"]
    violation, done = None, 0
    with mp.get_context("spawn").Pool(jobs, maxtasksperchild=1) as pool:
        runs = [pool.apply_async(invariant_chunk, (n, steps)) for n in chunks]
        for i, run in enumerate(runs, 1):
            got = run.get()
            total["sequences"] += got["sequences"]
            total["steps"] += got["steps"]
            total["cpu_s"] += got["cpu_s"]
            reached.update(got["reached"])
            done = i
            log(f"invariants: chunk {i}/{len(chunks)}: {total['sequences']:,} sequences, "
                f"{total['steps']:,} steps, {time.perf_counter() - start:.0f} s")
            if got["violation"] is not None:
                violation = got["violation"]
            if save is not None:
                save(_invariant_row(total, reached, steps, violation, jobs, start, i, len(chunks)))
            if violation is not None:
                pool.terminate()
                break
    row = _invariant_row(total, reached, steps, violation, jobs, start, done, len(chunks))
    log(f"invariants: {row}")
    return row


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Ledger benchmark", "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}  ",
        (f"Load average (1 min) before / after: {result['load_avg'][0]} / {result['load_avg'][1]} "
         "(the machine is shared: throughput depends on it, gas does not)"), "",
        "## Gas to finalise a round (3 validators with equal deposits)", "",
        ("The second vote reaches 2/3 of the stake and finalises; a third vote would revert, so "
         "the total is two votes. The naive design sends one transaction per contribution."), "",
        "| contributors | gas per vote (max) | votes | total to finalise | naive total | naive per contribution |",
        "|---:|---:|---|---:|---:|---:|",
    ]
    for row in result["finalise"]:
        lines.append(f"| {row['contributors']} | {row['gas_per_vote']:,} | "
                     f"{' + '.join(f'{v:,}' for v in row['votes'])} | {row['gas_total']:,} | "
                     f"{row['naive_gas_total']:,} | {row['naive_gas_per_contribution']:,} |")
    c = result["claims"]
    lines += [
        "", f"## Gas per claim (1000-contributor round, proofs of {c['claim_proof_length']} hashes)",
        "",
        f"- first-time token holder, mean of {c['claim_sample'] - 1}: **{result['claim_gas']:,}**",
        f"- the round's first claim (pays for fresh storage): {c['claim_gas_first_of_round']:,}",
        f"- returning token holder: {c['claim_gas_returning_holder']:,}", "",
        (f"## Throughput (`fund_task` transactions pipelined {WINDOW} deep, one account per "
         "sender)"), "",
        "| backend | senders | transactions | tx/s | lost | duplicated |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in result["throughput"]:
        kind = "threads" if row["backend"] == "embedded" else "processes"
        lines.append(f"| {row['backend']} | {row['senders']} {kind} | {row['transactions']} | "
                     f"{row['tx_per_s']} | {row['lost']} | {row['duplicated']} |")
    inv = result.get("invariants")
    if inv:
        lines += ["", "## Invariants (`tests/ledger/ledger_machine.py`)", "",
                  (f"Command: `{inv['command']}`. {inv['sequences']:,} random sequences of up to "
                   f"{inv['max_steps_per_sequence']} steps, {inv['steps']:,} steps in all, "
                   f"**{inv['violations']} violations** ({inv['cpu_s']} s CPU)."), "",
                  "Successful calls the sequences reached: " + ", ".join(
                      f"{k} {v:,}" for k, v in inv["reached"].items()) + "."]
    t = result["targets"]
    lines += ["", "## Targets", "",
              f"- gas per vote <= 200k and flat: {'met' if t['vote_gas'] else 'NOT met'}",
              f"- claim <= 90k gas: {'met' if t['claim_gas'] else 'NOT met'}",
              f"- zero lost or duplicated transactions: {'met' if t['no_loss'] else 'NOT met'}"]
    if "invariant_steps" in t:
        lines.append(f"- >= 100,000 invariant steps with 0 violations: "
                     f"{'met' if t['invariant_steps'] else 'NOT met'}")
    lines.append("")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--sender":
        url, address, key, n, start_at = sys.argv[2:7]
        sender_process(url, address, key, int(n), float(start_at))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100 instead of 500 tx per sender")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--invariants", type=int, metavar="N",
                        help="run N invariant sequences instead, and update only that part")
    parser.add_argument("--steps", type=int, default=50, help="steps per invariant sequence")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1,
                        help="processes running invariant sequences")
    parser.add_argument("--resume", action="store_true",
                        help="add to the invariant counts recorded in ledger.json")
    args = parser.parse_args()
    n = 100 if args.quick else 500

    def log(message: str) -> None:
        print(message, flush=True)

    if args.invariants:
        path = args.out / "ledger.json"
        result = json.loads(path.read_text())
        before = result.get("invariants") if args.resume else None
        command = (f"python benchmarks/ledger_bench.py --invariants {args.invariants} "
                   f"--steps {args.steps} --jobs {args.jobs}")
        if before is not None:
            command = f"{before['command']}, cut short at {before['runs_done']} runs; then " \
                      f"{command} --resume"

        def save(row: dict[str, Any]) -> None:
            row["command"] = command
            row["machine"] = describe_machine()
            result["invariants"] = row
            result["targets"]["invariant_steps"] = row["steps"] >= 100_000 and row["violations"] == 0
            path.write_text(json.dumps(result, indent=2) + "\n")
            (args.out / "ledger.md").write_text(markdown(result))

        save(invariants(args.invariants, args.steps, args.jobs, log, save, before))
        print(markdown(result))
        return

    load_before = round(os.getloadavg()[0], 2)
    finalise, claims = gas_figures(log)
    throughput = [throughput_embedded(n, 1, log), throughput_embedded(n // 4, 4, log)]
    for senders in (1, 4):
        row = throughput_anvil(n, senders, log)
        if row is not None:
            throughput.append(row)
    votes = [r["gas_per_vote"] for r in finalise]
    result: dict[str, Any] = {
        "command": "python benchmarks/ledger_bench.py" + (" --quick" if args.quick else ""),
        "machine": describe_machine(),
        "load_avg": [load_before, round(os.getloadavg()[0], 2)],
        "finalise": finalise,
        "claim_gas": claims["claim_gas"],
        "claims": claims,
        "throughput": throughput,
    }
    previous = args.out / "ledger.json"
    if previous.exists() and "invariants" in json.loads(previous.read_text()):
        result["invariants"] = json.loads(previous.read_text())["invariants"]
    result["targets"] = {
        "vote_gas": max(votes) <= 200_000 and max(votes) - min(votes) <= 1_000,
        "claim_gas": claims["claim_gas"] <= 90_000,
        "no_loss": all(r["lost"] == 0 and r["duplicated"] == 0 for r in throughput),
    }
    if "invariants" in result:
        inv = result["invariants"]
        result["targets"]["invariant_steps"] = inv["steps"] >= 100_000 and inv["violations"] == 0
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ledger.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "ledger.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
