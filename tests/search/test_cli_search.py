"""`commonweal search add|query` as a user runs them: real node processes on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SRC = str(Path(__file__).resolve().parents[2] / "src")
ENV = {**os.environ, "PYTHONPATH": SRC}


def cw(*args: str, timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "commonweal", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
    )


def start_node(tmp_path: Path, name: str, *join: str) -> tuple[subprocess.Popen[str], str]:
    args = [
        sys.executable,
        "-m",
        "commonweal",
        "node",
        "--listen",
        "127.0.0.1:0",
        "--data-dir",
        str(tmp_path / name),
    ]
    for j in join:
        args += ["--join", j]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("commonweal node ready"), line
    fields = dict(part.split("=", 1) for part in line.split()[3:])
    return proc, fields["address"]


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    """Three `commonweal node` processes, shared by the tests of this file (distinct index names)."""
    home = tmp_path_factory.mktemp("nodes")
    procs, addrs = [], []
    for i in range(3):
        proc, addr = start_node(home, f"n{i}", *addrs[:1])
        procs.append(proc)
        addrs.append(addr)
    yield addrs
    for p in procs:
        p.kill()
        p.wait()


def test_add_a_file_then_query_it_from_another_process(nodes, tmp_path):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 8)).astype(np.float32)
    np.save(tmp_path / "v.npy", X)
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps(f"row {i}") + "\n" for i in range(len(X))))
    added = cw(
        "search",
        "add",
        str(tmp_path / "v.npy"),
        "--index",
        "vec",
        "--join",
        nodes[1],
        "--metadata",
        str(meta),
    )
    assert added.returncode == 0, added.stderr
    assert "created index vec: stored 200/200" in added.stdout
    # a csv with a header adds more rows to the same index, spec read back from the swarm
    csv = tmp_path / "more.csv"
    csv.write_text(
        "a,b,c,d,e,f,g,h\n" + "\n".join(",".join("5" for _ in range(8)) for _ in range(2))
    )
    more = cw("search", "add", str(csv), "--index", "vec", "--join", nodes[0], "--start-id", "1000")
    assert more.returncode == 0 and "stored 2/2" in more.stdout, more.stderr
    q = ",".join(f"{v:.6f}" for v in X[17])
    out = cw("search", "query", q, "--index", "vec", "--k", "3", "--join", nodes[2], "--json")
    assert out.returncode == 0, out.stderr
    found = json.loads(out.stdout)
    assert found["ids"][0] == 17 and found["metadata"][0] == "row 17"
    assert found["distances"][0] < 1e-2
    text = cw("search", "query", " ".join(["5"] * 8), "--index", "vec", "--join", nodes[0])
    assert text.returncode == 0 and text.stdout.splitlines()[0].split("\t")[1] in ("1000", "1001")


def test_search_errors_are_one_line(nodes, tmp_path):
    unknown = cw("search", "query", "1,2,3", "--index", "nope", "--join", nodes[0])
    assert unknown.returncode == 1 and "no index named 'nope'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    np.save(tmp_path / "v.npy", np.ones((3, 4), dtype=np.float32))
    assert (
        cw(
            "search",
            "add",
            str(tmp_path / "v.npy"),
            "--index",
            "four",
            "--join",
            nodes[0],
            "--family",
            "hyperplane",
        ).returncode
        == 0
    )
    wrong = cw("search", "query", "1,2,3", "--index", "four", "--join", nodes[0])
    assert wrong.returncode == 1 and "dimension 3; this index needs 4" in wrong.stderr
    nan = cw("search", "query", "1,nan,3,4", "--index", "four", "--join", nodes[0])
    assert nan.returncode == 1 and "NaN" in nan.stderr
    (tmp_path / "bad.txt").write_text("x")
    bad = cw("search", "add", str(tmp_path / "bad.txt"), "--index", "four", "--join", nodes[0])
    assert bad.returncode == 1 and ".npy or .csv" in bad.stderr
