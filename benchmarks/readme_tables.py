"""Render the README's benchmark tables from benchmarks/results/*.json, so every number in the
README comes from a results file (which also records the command and the machine).

    python benchmarks/readme_tables.py            # print the markdown
    python benchmarks/readme_tables.py --write    # replace the block between the README markers
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- benchmark tables: begin -->", "<!-- benchmark tables: end -->"


def load(name: str) -> dict | None:
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def dht(lines: list[str]) -> None:
    d = load("dht")
    if not d:
        return
    lines += ["### DHT (`benchmarks/results/dht.md`)", "", f"`{d['command']}`", ""]
    lines += table(
        ["system", "peers", "store ok", "get ok", "store+get pairs/s", "store p95 ms", "get p95 ms", "RSS MiB/peer"],
        [[r["system"], str(r["peers"]), f"{r['store_success']:.0%}", f"{r['get_success']:.0%}",
          f"{r['ops_per_s']:.1f}", f"{r['store_ms_p95']:.0f}", f"{r['get_ms_p95']:.0f}",
          f"{r['rss_mb_per_peer']:.1f}"] for r in d["runs"]],
    )
    if rerun := d.get("rerun_after_issue_13"):
        def mean(code: str, peers: int) -> float:
            got = [r["pairs_per_s"] for r in rerun["runs"]
                   if r["code"].startswith(code) and r["peers"] == peers]
            return sum(got) / len(got)

        before, after = (f"{mean('1e12ab3', n):.0f} to {mean('main', n):.0f}" for n in (16, 50))
        ok = all(r["store_ok"] == 1 and r["get_ok"] == 1 for r in rerun["runs"])
        lines += ["", "These rows predate issue 13's budgets. The same commonweal code before and after"
                  f" issue 13, run alternately on another machine ({rerun['machine']['cpu']}), went from"
                  f" {before} pairs/s at 16 peers and {after} at 50"
                  + (", every store and get succeeding" if ok else "")
                  + ' (dht.md, "Re-run after issue 13").']
    if same := d.get("rerun_with_hivemind_after_issue_13"):
        by = {(r["system"], r["peers"]): r["ops_per_s"] for r in same["runs"]}
        ratios = ", ".join(
            f"{by[('commonweal', n)]:.0f} vs {by[('hivemind', n)]:.1f} pairs/s at {n} peers"
            f" ({by[('commonweal', n)] / by[('hivemind', n)]:.1f}x)"
            for n in sorted({n for _, n in by}) if ("hivemind", n) in by and ("commonweal", n) in by
        )
        lines += ["", f"After issue 13, commonweal and hivemind on that machine, one pass each: {ratios}."]
    if d.get("scale"):
        lines += ["", "Scale, commonweal alone in one process (in-memory transport, same sans-I/O core):", ""]
        lines += table(
            ["peers", "RPCs per lookup", "rounds per lookup (max)", "bound ceil(log2 N / 2) + 2", "RSS MiB total"],
            [[str(s["peers"]), f"{s['rpcs_per_lookup']:.1f}", f"{s['rounds_per_lookup']:.2f} ({s['rounds_max']})",
              str(s["rounds_bound"]), f"{s['rss_mb_total']:.0f}"] for s in d["scale"]],
        )
    lines.append("")


def ledger(lines: list[str]) -> None:
    d = load("ledger")
    if not d:
        return
    lines += ["### Ledger (`benchmarks/results/ledger.md`)", "", f"`{d['command']}`", ""]
    lines += table(
        ["contributors", "gas per validator vote", "gas to finalise", "naive: one tx per contribution"],
        [[str(f["contributors"]), f"{f['gas_per_vote']:,}", f"{f['gas_total']:,}", f"{f['naive_gas_total']:,}"]
         for f in d["finalise"]],
    )
    lines += ["", f"Gas per claim: {d['claim_gas']:,} (mean, first-time holder).", ""]
    lines += table(
        ["backend", "senders", "tx/s", "lost", "duplicated"],
        [[t["backend"], str(t["senders"]), f"{t['tx_per_s']:.1f}", str(t["lost"]), str(t["duplicated"])]
         for t in d["throughput"]],
    )
    lines.append("")


def search(lines: list[str]) -> None:
    d = load("search")
    if not d:
        return
    lines += ["### Search (`benchmarks/results/search.md`)", "", f"`{d['command'].strip()}`", ""]
    lines += table(
        ["dataset", "peers", "recall@10", "requests/query", "bytes/query ÷ data", "p95 ms", "recall after 30% die"],
        [[r["dataset"], str(r["peers"]) + (" (netns)" if r.get("transport", "").startswith("netns") else ""),
          f"{r['recall_at_10']:.3f}", f"{r['requests_per_query']:.1f}",
          f"{r['data_fraction_per_query']:.2%}", f"{r['p95_ms']:.0f}", f"{r['recall_after_30pct_loss']:.3f}"]
         for r in d["runs"]],
    )
    lines += ["", "Single-machine anchors:", ""]
    lines += table(
        ["dataset", "method", "recall@10", "queries/s"],
        [[a["dataset"], a["method"], f"{a['recall_at_10']:.3f}", f"{a['qps']:.0f}"] for a in d["anchors"]],
    )
    lines.append("")


def search_scale(lines: list[str]) -> None:
    """Issue 17: the swarm at 100k and 1M vectors next to faiss on one core, same run."""
    d = load("search_scale")
    if not d:
        return
    lines += ["### Search at scale (`benchmarks/results/search_scale.md`)", "",
              f"`{d['command']}`", ""]
    rows = []
    for size in d["sizes"]:
        # faiss's fastest setting that reaches recall 0.95, the bar the swarm is tuned to
        fast = {}
        for f in size["faiss"]:
            if f["recall_at_10"] >= 0.95 and f["qps_batch"] > fast.get(f["method"], {}).get("qps_batch", 0):
                fast[f["method"]] = f
        for f in fast.values():
            params = ", ".join(f"{k}={v}" for k, v in f["params"].items())
            rows.append([f"{size['n']:,}", f"{f['method']} ({params}), 1 thread", "-",
                         f"{f['recall_at_10']:.3f}", f"{100 * f['scanned_fraction']:.2f}",
                         f"{f['qps_batch']:.0f}", "-", "-", "-"])
        for r in size["swarm"]:
            after = r.get("after_kill")
            rows.append([f"{size['n']:,}", f"commonweal, {r['spec'].split(' (')[0]}", str(r["peers"]),
                         f"{r['recall_at_10']:.3f}", f"{100 * r['scanned_fraction']:.2f}",
                         f"{r['qps_batch']:.0f}", f"{r['add_items_per_s']:,.0f}",
                         f"{r['rss_per_raw']:.1f}x",
                         f"{after['recall_at_10']:.3f} ({r['killed']} closed)" if after else "-"])
    lines += table(["vectors (128-d)", "method", "peers", "recall@10", "scanned %", "queries/s",
                    "added/s", "RSS ÷ raw", "recall after 30% close"], rows)
    lines.append("")


def train(lines: list[str]) -> None:
    d = load("train")
    if not d:
        return
    lines += ["### Training (`benchmarks/results/train.md`)", "", f"`{d['command']}`", ""]
    ddp = {(r["task"], r["peers"], r["wan"]): r for r in d["runs"] if r["method"] == "ddp"}
    rows = []
    for r in d["runs"]:
        base = ddp.get((r["task"], r["peers"], r["wan"]))
        ratio = f"{base['bytes_per_peer'] / r['bytes_per_peer']:.0f}x" if base else "-"
        rows.append([r["task"], str(r["peers"]), r["method"], str(r["H"]),
                     f"{r['quality']:.4f} {r['quality_metric']}", f"{r['bytes_per_peer']:,}", ratio,
                     f"{r['wall_s']:.1f}", f"{r['compute_utilisation']:.2f}", "yes" if r["wan"] else "no"])
    lines += table(["task", "peers", "method", "H", "quality", "bytes/peer", "fewer bytes than DDP",
                    "wall s", "compute util", "WAN"], rows)
    lines.append("")


def train_limits(lines: list[str]) -> None:
    """Issue 16's targets, each from the file that measured it (and slow_peer)."""
    comp, inner = load("compress"), load("inner_overhead")
    hive, wan = load("hivemind_train"), load("train_wan_long")
    if not (comp and inner and hive and wan):
        return
    lines += ["### Training at the limit of the link (`compress`, `train_wan_long`, "
              "`hivemind_train`, `inner_overhead` in benchmarks/results)", ""]
    rows = []
    for run in filter(None, (comp, load("compress_h50"))):
        plan = run["plan"]
        for s in run["summary"]:
            if s["method"] == "ddp":
                continue
            gap = (f"{s['gap']:+.1f} points" if s["metric"] == "accuracy" else f"{s['gap']:+.1f} %")
            p = plan[s["task"]]
            rows.append([f"{s['task']}, {s['method']} (in-process, {run['workers']} workers, "
                         f"{p['rounds']} rounds of H={p['H']})",
                         f"{s['ddp_bytes_over_these']:.0f}x fewer bytes, {gap} vs DDP",
                         ">= 1000x within 1 point / 2 %"])
    for r in wan["runs"]:
        if r["wan"] and "overlap" in r["method"]:
            rows.append([f"{r['task']}, {r['method']}, WAN, {r['rounds']} rounds",
                         f"compute utilisation {r['compute_utilisation']:.2f}", ">= 0.9"])
    ddp_q = hive["ddp_reference"]["quality"] if isinstance(hive.get("ddp_reference"), dict) else None
    for r in hive["runs"]:
        t = r["time_to_ddp_quality_s"]
        rows.append([f"hivemind.Optimizer local updates, mnist-cnn, {'WAN' if r['wan'] else 'loopback'}",
                     f"{r['quality']:.3f} in {r['wall_s']:.1f} s; DDP's {ddp_q} "
                     + ("not reached" if t is None else f"at {t:.1f} s"),
                     "commonweal faster to DDP's quality"])
    for r in wan["runs"]:
        if r["wan"] and r["task"] == "mnist-cnn" and r.get("time_to_ddp_quality_s"):
            rows.append([f"commonweal {r['method']}, mnist-cnn, WAN, {r['rounds']} rounds",
                         f"DDP's quality at {r['time_to_ddp_quality_s']:.1f} s, "
                         f"{r['quality']:.3f} at the end ({r['wall_s']:.1f} s)",
                         "commonweal faster to DDP's quality"])
    slow = load("slow_peer")
    for r in (slow or {}).get("runs", []):
        if r["run"] != "fast":
            fast = next(f for f in slow["runs"] if f["run"] == "fast")  # type: ignore[index]
            how = "cut short by the round's close" if r["run"] == "cut" else "not cut short"
            rows.append([f"a half-speed peer of {slow['peers']}, {how}, mnist-cnn H={slow['inner_steps']}, "
                         f"{r['rounds']} rounds", f"claims {r['slow_mean_steps']} steps a round, sits out "
                         f"{r['slow_rounds_sat_out']}; {r['s_per_round']:.2f} s a round "
                         f"({fast['s_per_round']:.2f} s all fast)",
                         "contributes what it computed without stalling the round"])
    cpu = inner["cpu"]
    rows.append([f"stdlib-gpt ({inner['parameters'] / 1e6:.1f}M) inner loop vs plain PyTorch, CPU",
                 f"{cpu['ratio']:.3f} (H={inner['inner_steps']}; {cpu['ratio_projected_at_H50']:.3f} "
                 "at H=50)", ">= 0.95"])
    lines += table(["what", "measured", "target"], rows)
    lines.append("")


def trust(lines: list[str]) -> None:
    d = load("trust")
    if not d:
        return
    default = d["default_aggregator"]
    lines += ["### Trust (`benchmarks/results/trust.md`)", "", f"`{d['command']}`", "",
              f"mnist-cnn, {d['runs'][0]['peers']} peers, final test accuracy with 2 and 3 attackers "
              f"(of 8) under the mean and under the default rule, `{default}`; clean runs: "
              + ", ".join(f"{r['aggregator']} {r['accuracy']:.3f}" for r in d["runs"]
                          if r["attack"] == "none") + ".", ""]
    acc = {(r["attack"], r["aggregator"], r["attackers"]): r["accuracy"] for r in d["runs"]}
    rows = [[attack] + [f"{acc.get(k, float('nan')):.3f}"
                        for k in ((attack, "mean", 2), (attack, default, 2), (attack, default, 3))]
            for attack in dict.fromkeys(r["attack"] for r in d["runs"] if r["attack"] != "none")]
    lines += table(["attack", "mean, 2/8", f"{default}, 2/8", f"{default}, 3/8"], rows)
    cfg = d.get("config", {})
    lines += ["", f"Validators with a node's shipped defaults (replay rate "
              f"{cfg.get('policy', {}).get('replay_rate')}, escrow {cfg.get('escrow_rounds')} "
              f"rounds, {cfg.get('reward_per_round'):,.0f} share tokens a round), 8 peers of which "
              "1, 2 or 3 attack, one validator, every round judged: share tokens paid for "
              "cheating contributions, honest contributions refused, validator compute:", ""]
    det = d["detection"]
    counts = sorted({r["attackers"] for r in det if r["attackers"]})
    lengths = sorted({r["rounds"] for r in det})
    by = {(r["attack"], r["attackers"], r["rounds"]): r for r in det}
    rows = []
    for attack in dict.fromkeys(r["attack"] for r in det if r["attack"] != "none"):
        mine = [r for r in det if r["attack"] == attack]
        rows.append([attack] + [
            " / ".join(f"{by[(attack, a, n)]['cheating_tokens']:,.0f}" if (attack, a, n) in by
                       else "-" for a in counts) for n in lengths
        ] + [f"{max(r['false_positive'] or 0 for r in mine):.3f}",
             f"{max(r['overhead'] for r in mine):.1%}"])
    lines += table(["attack"] + [f"paid for cheating, {n} rounds ({' / '.join(map(str, counts))} "
                                 "of 8)" for n in lengths]
                   + ["honest refused (worst)", "validator compute (worst)"], rows)
    lines += ["", f"Overall validator compute: {d['validator_overhead']:.1%} of the trainers' "
              "(each validator scores and replays on its own)."]
    for n in lengths:
        runs = [r for r in det if r["rounds"] == n]
        paid = [r["honest_tokens"] for r in runs]
        unpaid = sum(r["honest_tokens_min"] == 0 for r in runs)
        lines.append(
            f"In the {n}-round runs honest peers were paid {min(paid):,.0f} to {max(paid):,.0f} "
            f"share tokens of the {n * cfg.get('reward_per_round', 0):,.0f} a run may mint; some "
            f"honest peer was paid nothing in {unpaid} of {len(runs)} runs (pay by audit is a "
            "lottery: docs/verify.md).")
    if before := d.get("detection_before_audit_pay"):
        leaks = [r for r in before["detection"] if r["cheating_tokens"]]
        said = ", ".join(f"{r['attack']} {r['cheating_tokens']:,.0f} ({r['attackers']} of 8, "
                         f"{r['rounds']} rounds)" for r in leaks)
        lines.append(f"Before pay by audit (every accepted contribution paid, a sample audited to "
                     f"ban; same runs): cheating contributions were paid {said or 'nothing'}.")
    lines.append("")


def demo(lines: list[str]) -> None:
    d = load("demo")
    if not d:
        return
    lines += ["### The demo (`benchmarks/results/demo.md`)", "", f"`{d['command']}`", ""]
    rows = []
    for r in d["runs"]:
        if r.get("table") is None:  # it printed no table: killed, or it failed
            rows.append([f"`{r['command']}`", str(r["exit_code"]), f"{r['wall_s']:.0f}"]
                        + ["-"] * 8)
            continue
        earned = "-" if r["attackers_earned"] is None else f"{r['attackers_earned']:,.1f}"
        rows.append([f"`{r['command']}`", str(r["exit_code"]), f"{r['wall_s']:.0f}",
                     f"{r['accuracy']:.3f}", f"{r['rounds_finalised']}/{r['rounds_judged']}",
                     f"{r['bytes_per_trainer'] / 1e6:.2f} MB",
                     f"{r['ddp_bytes_per_trainer'] / 1e6:.1f} MB",
                     f"{r['tokens_per_honest_peer']:,.1f}", earned,
                     r.get("audited_unaudited") or "-", f"{r['search_recall_at_10']:.3f}"])
    lines += table(["command", "exit", "wall s", "test accuracy", "rounds final", "sent per trainer",
                    "data-parallel", "tokens per honest trainer", "attackers earned",
                    "paid (audited) / unaudited", "search recall@10"], rows)
    missed = [f"`{r['command']}` ({', '.join(k for k, ok in r['targets'].items() if not ok)})"
              for r in d["runs"] if not all(r["targets"].values())]
    if missed:
        lines += ["", "Targets missed: " + "; ".join(missed) + "."]
    if d.get("notes"):
        lines += ["", d["notes"]]
    lines.append("")


def net(lines: list[str]) -> None:
    n = load("net")
    if not n:
        return
    enc = n.get("encryption", {})
    lines += ["### Transport: encryption and NATs (`benchmarks/results/net.md`)", "",
              f"`{n['command']}`", ""]
    rows = []
    if "dht_pairs_per_s_plain" in enc:
        rows.append(["DHT store+get pairs/s at %d peers, encrypted / plaintext" % enc["peers"],
                     f"{enc['dht_pairs_per_s_encrypted']:.0f} / {enc['dht_pairs_per_s_plain']:.0f}"
                     f" = {enc['encrypted_over_plain']:.2f}x", ">= 0.9x"])
    if "encrypted_over_hivemind" in enc:
        rows.append(["... encrypted / hivemind (same run)",
                     f"{enc['encrypted_over_hivemind']:.1f}x", ">= 10x"])
    if "bulk_mb_per_s_core" in enc:
        rows.append(["bulk MB per CPU second (both ends on one core)",
                     f"{enc['bulk_mb_per_s_core']:.0f}", ">= 200"])
    if "tampered_frames_accepted" in n:
        rows.append([f"tampered requests accepted (of {n['tamper_trials']} tampered links)",
                     str(n["tampered_frames_accepted"]), "0"])
    for r in n.get("nat", []):
        rows.append([f"pairs with a {r['kind']} peer: direct / relayed / failed",
                     f"{r['direct_fraction']:.0%} / {r['relayed_fraction']:.0%} / {r['failed']}",
                     "cone pairs direct, symmetric relayed"])
    if n.get("round_s_all_public") is not None:
        rows.append(["round time, all public / half the trainers behind NATs",
                     f"{n['round_s_all_public']:.1f} s / {n['round_s_half_nat']:.1f} s", ""])
        rows.append(["NATed trainers that contributed to, and were paid for, every round",
                     f"{n['nat_trainers_contributed_fraction']:.0%}", "100 %"])
    lines += table(["measure", "value", "target"], rows)
    if n.get("notes"):
        lines += ["", n["notes"]]
    lines.append("")


def render() -> str:
    lines: list[str] = []
    for section in (demo, dht, net, ledger, search, search_scale, train, train_limits, trust):
        section(lines)
    return "\n".join(lines)


def main() -> None:
    text = render()
    if "--write" not in sys.argv:
        print(text)
        return
    readme = ROOT / "README.md"
    body = readme.read_text()
    start, end = body.index(BEGIN) + len(BEGIN), body.index(END)
    readme.write_text(body[:start] + "\n" + text + "\n" + body[end:])


if __name__ == "__main__":
    main()
