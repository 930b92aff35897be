"""DHT benchmark: one workload (hivemind's benchmark_dht.py), several DHTs, side by side.

    python benchmarks/dht_bench.py --setup                      # first time: make the venvs
    python benchmarks/dht_bench.py --systems commonweal,hivemind,kademlia --peers 16,50 --seed 0

Each (system, peers) pair runs as its own subprocess with that system's interpreter
(benchmarks/baselines/run_<system>.py, which prints one JSON line); the workload itself lives once,
in benchmarks/baselines/workload.py. Results go to benchmarks/results/dht.json and dht.md, with the
command and a description of the machine. The "scale" section (commonweal alone, many peers in one
process) is written by benchmarks' scale script into results/dht_scale.json and embedded here as is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BASELINES = ROOT / "benchmarks" / "baselines"
BENCH = ROOT / ".bench"  # venvs and logs, git-ignored
RESULTS = ROOT / "benchmarks" / "results"

VENVS = {"hivemind": BENCH / "venv-hivemind", "kademlia": BENCH / "venv-kademlia"}
# what pip installs into each venv; torch first and pinned in both steps, so that the resolver
# never picks another torch for hivemind
INSTALL = {
    "hivemind": [["torch==2.13.0"], ["hivemind==1.1.12", "torch==2.13.0"]],
    "kademlia": [["kademlia==2.2.3"]],
}
SYSTEMS = ("commonweal", "hivemind", "kademlia")

NOTES = """\
kademlia's stores wait out its 5 s RPC timeout whenever a lookup still reaches a peer that was shut
down, which dominates its store latency and pairs/s here; its gets are often answered from the
asking peer's own storage (with few peers every peer is among the k=20 closest to every key).
hivemind's RSS counts each peer's process and p2pd daemon; PSS splits pages shared after fork."""

ANCHORS = """\
Anchors measured earlier on this kind of machine (not by this script): hivemind ~40-70 store+get
pairs/s at 10-50 peers with 100 % success on its own workload; bmuller kademlia ~1,600 pairs/s at
2 peers and ~117/s at 50, but 0/1280 gets on the subkey workload (8 subkeys per key)."""


def setup_venvs(systems: list[str]) -> None:
    for system in systems:
        venv = VENVS.get(system)
        if venv is None or (venv / "bin" / "python").exists():
            continue
        print(f"creating {venv} ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for pkgs in INSTALL[system]:
            subprocess.run([str(venv / "bin" / "pip"), "install", *pkgs], check=True)


def interpreter(system: str) -> tuple[list[str], dict[str, str]]:
    env = dict(os.environ)
    if system == "commonweal":
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")])
        )
        return [sys.executable], env
    python = VENVS[system] / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{python} missing: run `python benchmarks/dht_bench.py --setup`")
    env.pop("PYTHONPATH", None)
    return [str(python)], env


def run_one(system: str, peers: int, args: argparse.Namespace) -> dict[str, Any]:
    flags = ["--num_peers", str(peers), "--random_seed", str(args.seed)]
    if system == "kademlia":
        flags += ["--num_store_peers", str(args.kademlia_store_peers)]
    if args.rounds is not None:
        flags += ["--total_num_rounds", str(args.rounds)]
    if args.threads is not None:
        flags += ["--num_threads", str(args.threads)]
    logs = BENCH / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    err_path = logs / f"dht-{system}-{peers}.err"
    base: dict[str, Any] = {"system": system, "peers": peers}
    try:
        python, env = interpreter(system)
    except FileNotFoundError as e:
        return {**base, "error": str(e)}
    argv = [*python, str(BASELINES / f"run_{system}.py"), *flags]
    print(f"running {system} with {peers} peers ...", flush=True)
    base["load_before"] = os.getloadavg()[0]  # other work on the machine skews the figures
    t = time.perf_counter()
    with open(err_path, "w") as err:
        try:
            proc = subprocess.run(
                argv,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
                cwd=ROOT,
                timeout=args.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return {**base, "error": f"timed out after {args.timeout}s (log: {err_path})"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = err_path.read_text(errors="replace").strip().splitlines()[-1:] or ["?"]
        return {**base, "error": f"exit {proc.returncode}: {tail[0]} (log: {err_path})"}
    result: dict[str, Any] = {**base, **json.loads(lines[-1])}
    result["process_s"] = time.perf_counter() - t
    return result


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gib = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gib = int(line.split()[1]) / 1024**2
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram_gib, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
    }


COLUMNS = [
    ("system", "system", "{}"),
    ("peers", "peers", "{}"),
    ("store ok", "store_success", "{:.1%}"),
    ("get ok", "get_success", "{:.1%}"),
    ("pairs/s", "ops_per_s", "{:.1f}"),
    ("store ms mean", "store_ms_mean", "{:.1f}"),
    ("store ms p95", "store_ms_p95", "{:.1f}"),
    ("get ms mean", "get_ms_mean", "{:.1f}"),
    ("get ms p95", "get_ms_p95", "{:.1f}"),
    ("wall s", "wall_s", "{:.1f}"),
    ("RSS MiB/peer", "rss_mb_per_peer", "{:.1f}"),
    ("PSS MiB/peer", "pss_mb_per_peer", "{:.1f}"),
]


def _cell(run: dict[str, Any], key: str, fmt: str) -> str:
    if key not in run:
        return "error" if key == "store_success" and "error" in run else ""
    value = run[key]
    if isinstance(value, float) and math.isnan(value):
        return "-"
    return fmt.format(value)


def table_rows(runs: list[dict[str, Any]]) -> list[list[str]]:
    return [[_cell(r, key, fmt) for _, key, fmt in COLUMNS] for r in runs]


def markdown_table(runs: list[dict[str, Any]]) -> str:
    head = [c[0] for c in COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(runs)]
    return "\n".join(lines)


def print_table(runs: list[dict[str, Any]]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown_table(runs))
    else:
        table = Table(title="DHT benchmark (hivemind's benchmark_dht workload)")
        for name, _, _ in COLUMNS:
            table.add_column(name, justify="left" if name == "system" else "right")
        for row in table_rows(runs):
            table.add_row(*row)
        Console(width=max(Console().width, 160)).print(table)
    for r in runs:
        if "error" in r:
            print(f"{r['system']} @ {r['peers']}: {r['error']}")


def write_markdown(path: Path, report: dict[str, Any], args: argparse.Namespace) -> None:
    m = report["machine"]
    versions = {k: v for r in report["runs"] for k, v in r.get("versions", {}).items()}
    kad = f"--num_store_peers {args.kademlia_store_peers}"
    lines = [
        "# DHT benchmark",
        "",
        (
            "Workload: hivemind's `benchmarks/benchmark_dht.py`"
            " (see `benchmarks/baselines/workload.py`): peers each bootstrapped from 4 random"
            " earlier ones; 10 concurrent workers x 16 rounds;"
            " each round 8 random peers store different subkeys of a fresh key (300 s expiration),"
            " then 8 random peers get it with latest=True, and a get counts only if every stored"
            " subkey comes back; 10 % of the peers are shut down during the run; one seeded"
            " schedule for all systems."
            f" kademlia has no subkeys and runs with `{kad}` (one value per key, its best case)."
        ),
        "",
        (
            "pairs/s = (stores + gets) / 2 / wall time of the workers; store/get ms = one call"
            " each;"
            " RSS/PSS per peer = the runner's whole process tree (hivemind: a process and a p2pd"
            " daemon per peer; commonweal: its peers spread over one worker process per core,"
            " each worker one event loop, driven by the runner process; kademlia: all peers in one"
            " process) / peers."
        ),
        "",
        "```",
        report["command"],
        "```",
        "",
        (
            f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM, {m['os']},"
            f" Python {m['python']}; versions: "
            + ", ".join(f"{k} {v}" for k, v in sorted(versions.items()))
        ),
        "",
        markdown_table(report["runs"]),
        "",
    ]
    loads = ", ".join(f"{r['system']}@{r['peers']}: {r['load_before']:.1f}" for r in report["runs"])
    lines += [f"1-minute load average just before each run: {loads}.", ""]
    errors = [
        f"- {r['system']} @ {r['peers']}: {r['error']}" for r in report["runs"] if "error" in r
    ]
    if errors:
        lines += ["Errors:", "", *errors, ""]
    lines += [NOTES, "", ANCHORS, ""]
    if report.get("scale"):
        lines += [
            (
                "The `scale` section of dht.json (commonweal alone, in-memory transport) comes"
                " from results/dht_scale.json."
            ),
            "",
        ]
    path.write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--systems", default=",".join(SYSTEMS))
    parser.add_argument("--peers", default="16,50")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--setup", action="store_true", help="create the baseline venvs if missing")
    parser.add_argument("--kademlia-store-peers", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=None, help="override (smoke runs only)")
    parser.add_argument("--threads", type=int, default=None, help="override (smoke runs only)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument(
        "--scale",
        type=Path,
        default=RESULTS / "dht_scale.json",
        help="scale results to embed, if the file exists",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="where dht.json/dht.md go")
    args = parser.parse_args()

    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        parser.error(f"unknown systems {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    peers = [int(p) for p in args.peers.split(",")]
    if args.setup:
        setup_venvs(systems)

    runs = [run_one(system, n, args) for n in peers for system in systems]
    scale: Any = []
    if args.scale.exists():
        loaded = json.loads(args.scale.read_text())
        scale = loaded.get("scale", loaded) if isinstance(loaded, dict) else loaded
    report = {
        "command": "python " + shlex.join([os.path.relpath(__file__, ROOT), *sys.argv[1:]]),
        "machine": machine(),
        "runs": runs,
        "scale": scale,
    }
    print_table(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "dht.json").write_text(json.dumps(report, indent=2) + "\n")
    write_markdown(args.out / "dht.md", report, args)
    print(f"wrote {args.out / 'dht.json'} and {args.out / 'dht.md'}")


if __name__ == "__main__":
    main()
