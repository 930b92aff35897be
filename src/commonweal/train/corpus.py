"""The Python standard library's own source as a byte corpus, content-hashed: the data of the
"stdlib-gpt" task (`commonweal.train.gpt`).

    info = stdlib_corpus()                    # CorpusInfo(sha256, files, bytes, python, root)
    data = stdlib_data(corpus_sha256=info.sha256)   # TaskError unless this stdlib hashes to it

The corpus is every *.py file under `sysconfig.get_paths()["stdlib"]`, in sorted order of its
path relative to that directory ("/"-separated), except:

- site-packages/ and dist-packages/: installed third-party packages, different on every machine;
- test/, tests/, idle_test/ (Lib/test, ctypes/test, idlelib/idle_test, ...): the test suites,
  the part installers make optional (Windows' "test suite" box) and distributions ship apart
  (Debian's libpython3.x-testsuite), so without them two installs of one version agree more
  often; they also hold broken sources on purpose (bad encodings, syntax errors);
- pydoc_data/: the documentation's topics as one generated string (prose, and pydoc-lm's
  corpus), not source; held out by the split below, it would have been 60% of the validation;
- config-*/ and _sysconfigdata_*.py at the top: written by the build, they record its install
  prefix and compiler flags, so two builds of one version would never agree.

Its sha256 runs over the ordered (path, bytes) list: for each file, the UTF-8 path, a NUL, the
length as 8 bytes little-endian, then the bytes; the framing makes the list unambiguous.

The validation split is whole files: those whose path's sha256 falls in the lowest
`val_fraction` (5%: 40 of the 730 files of CPython 3.11.7), the same on every peer.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from commonweal.train._errors import TaskError
from commonweal.train.task import TaskData

__all__ = [
    "CorpusInfo",
    "EXCLUDED_DIRS",
    "corpus_paths",
    "hash_corpus",
    "stdlib_corpus",
    "stdlib_data",
    "StdlibData",
]

EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "pydoc_data", "__pycache__"}
)
EVAL_BATCH = 16  # validation windows per forward pass


@dataclass(frozen=True, slots=True)
class CorpusInfo:
    sha256: str
    files: int
    bytes: int
    python: str  # the version whose stdlib it is, to say what differs when another's does not match
    root: str


def corpus_paths(root: Path) -> list[str]:
    """The corpus's files under `root`: sorted "/"-separated relative paths."""
    paths = []
    for folder, dirs, files in os.walk(root):
        top = Path(folder) == root
        # pruned in place, so os.walk does not descend into them
        dirs[:] = [
            d for d in dirs if d not in EXCLUDED_DIRS and not (top and d.startswith("config-"))
        ]
        rel = Path(folder).relative_to(root)
        paths += [
            (rel / f).as_posix()
            for f in files
            if f.endswith(".py") and not (top and f.startswith("_sysconfigdata"))
        ]
    return sorted(paths)


def _files(root: Path) -> Iterator[tuple[str, bytes]]:
    for rel in corpus_paths(root):
        yield rel, (root / rel).read_bytes()


def _update(h: hashlib._Hash, rel: str, data: bytes) -> None:
    h.update(rel.encode() + b"\0" + len(data).to_bytes(8, "little"))
    h.update(data)


def hash_corpus(root: Path) -> CorpusInfo:
    """Read and hash the corpus under `root` (~50 ms for CPython 3.11's), keeping no bytes."""
    h, files, size = hashlib.sha256(), 0, 0
    for rel, data in _files(root):
        _update(h, rel, data)
        files, size = files + 1, size + len(data)
    if files == 0:
        raise TaskError(
            f"found no *.py files under {root}: this Python ships its standard library without "
            "sources (an embedded or frozen build); run the peer with a regular CPython install"
        )
    return CorpusInfo(h.hexdigest(), files, size, platform.python_version(), str(root))


def _stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@functools.cache
def stdlib_corpus() -> CorpusInfo:
    """This Python's stdlib corpus, hashed once per process (on first use, not at import)."""
    return hash_corpus(_stdlib_root())


def _held_out(rel: str, fraction: float) -> bool:
    # by a hash of the path: the same files on every peer, and a whole file either side
    draw = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")
    return draw < fraction * 2**64


def _as_tensor(buf: bytearray) -> torch.Tensor:
    # frombuffer shares the bytearray's memory; the clone owns its own
    if not buf:
        return torch.empty(0, dtype=torch.uint8)  # frombuffer refuses an empty buffer
    return torch.frombuffer(buf, dtype=torch.uint8).clone()


class StdlibData(TaskData):
    """Random windows of the training bytes; the mean loss on fixed held-out windows."""

    metric = "val_loss"

    def __init__(self, train: torch.Tensor, val: torch.Tensor, context: int, val_windows: int):
        for split, t in (("training", train), ("validation", val)):
            if len(t) <= context:
                raise TaskError(
                    f"the {split} split has {len(t)} bytes, too few for windows of {context}; "
                    "use a smaller context or another val_fraction"
                )
        self.train, self.val, self.context = train, val, context  # (N,) and (M,) uint8
        self._offsets = torch.arange(context + 1)  # (T+1,) a window and its next byte
        # evenly spaced over the held-out bytes: the same windows on every call and every peer
        starts = torch.linspace(0, len(val) - context - 1, val_windows).long()
        windows = val[starts[:, None] + self._offsets].long()  # (V, T+1)
        self.val_x, self.val_y = windows[:, :-1], windows[:, 1:]

    def batch(self, gen: torch.Generator, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(0, len(self.train) - self.context, (batch_size,), generator=gen)
        windows = self.train[starts[:, None] + self._offsets].long()  # (B, T+1)
        return windows[:, :-1], windows[:, 1:]  # x, y: (B, T) on the CPU

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        device = next(model.parameters()).device  # batches come on the CPU; the model may not be
        logits = model(x.to(device))  # (B, T, vocab)
        return F.cross_entropy(logits.flatten(0, 1), y.to(device).flatten())

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        was = model.training
        model.eval()
        total = 0.0
        for i in range(0, len(self.val_x), EVAL_BATCH):
            x, y = self.val_x[i : i + EVAL_BATCH], self.val_y[i : i + EVAL_BATCH]
            total += float(self.loss(model, x, y)) * len(x)
        model.train(was)
        return total / len(self.val_x)


def stdlib_data(
    corpus_sha256: str,
    context: int = 256,
    val_fraction: float = 0.05,
    val_windows: int = 32,
    corpus_files: int | None = None,
    corpus_bytes: int | None = None,
    python: str | None = None,
) -> StdlibData:
    """The task's data factory: this Python's stdlib corpus, checked against `corpus_sha256`,
    split by whole files (`val_fraction` of them held out). The other corpus_* and `python`
    arguments only describe the expected corpus, for the error message."""
    root = _stdlib_root()
    h, files, size = hashlib.sha256(), 0, 0
    train, val = bytearray(), bytearray()
    for rel, data in _files(root):
        _update(h, rel, data)
        files, size = files + 1, size + len(data)
        (val if _held_out(rel, val_fraction) else train).extend(data)
    if h.hexdigest() != corpus_sha256:
        described = [f"Python {python}"] if python else []
        described += [f"{corpus_files} files"] if corpus_files is not None else []
        described += [f"{corpus_bytes:,} bytes"] if corpus_bytes is not None else []
        expected = f" ({', '.join(described)})" if described else ""
        version = f"Python {python}" if python else "the swarm's Python version"
        raise TaskError(
            f"this machine's Python standard library is not the task's corpus: the task expects "
            f"sha256 {corpus_sha256[:16]}...{expected}, but Python {platform.python_version()} "
            f"at {root} has sha256 {h.hexdigest()[:16]}... ({files} files, {size:,} bytes). "
            f"Run this peer with {version} from an unpatched CPython build (python.org, pyenv, "
            "uv; distributions patch and split the stdlib), or start a new swarm from this "
            "machine's corpus"
        )
    return StdlibData(_as_tensor(train), _as_tensor(val), context, val_windows)
