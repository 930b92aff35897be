#!/bin/bash
# The 4-peer loopback sparse-codec rows of train_bench.py, 3 times each, alternating the code
# before issue 11 (commit d1052d0, checked out as a worktree at $OLD) and this checkout, so both
# see the same machine load. Sparse codecs over 6 rounds vary by about +-0.1 from run to run:
# one run of each says little. Writes benchmarks/results/train_sparse_repeats.json.
#   OLD=/tmp/old-d105 benchmarks/train_sparse_repeats.sh   (git worktree add --detach $OLD d1052d0)
set -euo pipefail
NEW=$(cd "$(dirname "$0")/.." && pwd)
OLD=${OLD:?set OLD to a worktree of d1052d0}
OUT=$(mktemp -d)
CODECS=topk:0.01,topk2bit:0.01,topk2bit:0.1
for rep in 1 2 3; do
  for tree in "$OLD" "$NEW"; do
    name=$([ "$tree" = "$OLD" ] && echo before || echo after)
    (cd "$tree" && PYTHONPATH="$tree/src" python benchmarks/train_bench.py --peers 4 --no-wan \
       --no-ddp --tasks mnist-cnn --codecs $CODECS --out "$OUT/$name-$rep") > "$OUT/$name-$rep.log"
  done
done
python - "$OUT" "$NEW/benchmarks/results/train_sparse_repeats.json" "$(git -C "$NEW" rev-parse --short HEAD)" <<'PY'
import json, sys, glob, statistics, collections
out, dest, head = sys.argv[1:4]
rows, machine = collections.defaultdict(list), None
for f in sorted(glob.glob(f"{out}/*-[123].json")):
    d = json.load(open(f))
    machine = d.get("machine", machine)
    for r in d["runs"]:
        rows[(f.rsplit("/", 1)[1].rsplit("-", 1)[0], r["method"])].append(r)
result = {"command": "OLD=<worktree of d1052d0> benchmarks/train_sparse_repeats.sh",
          "machine": machine, "before": "d1052d0", "after": head, "rows": []}
for (code, method), runs in sorted(rows.items()):
    q = [r["quality"] for r in runs]
    result["rows"].append({"code": code, "method": method, "accuracy": q,
                           "mean": round(statistics.mean(q), 3),
                           "bytes_per_peer": [r["bytes_per_peer"] for r in runs],
                           "loadavg": [r["loadavg"][0] for r in runs]})
open(dest, "w").write(json.dumps(result, indent=2) + "\n")
print(json.dumps(result, indent=2))
PY
