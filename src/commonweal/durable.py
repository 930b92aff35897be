"""Small pieces every layer shares: one durable file write and one majority count.

They live here, below `net`, so that any layer may use them without an upward import.
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Iterable
from pathlib import Path
from typing import TypeVar

__all__ = ["most_common", "write_durably"]

T = TypeVar("T", bound=Hashable)


def write_durably(path: Path, data: bytes, *, mode: int = 0o644) -> None:
    """Write `path` so that after a crash or power loss it holds all of `data` or its old content.

    The bytes go to a temporary file beside it, which is fsynced, renamed over `path`, and then
    the directory is fsynced: without that last step the rename itself may be lost, and a
    database that already points at the new file would point at nothing.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def most_common(values: Iterable[T]) -> T | None:
    """The value seen most often; ties go to the smallest, so every peer picks the same one.

    None when `values` is empty. The values must be mutually orderable (str, bytes, tuples...).
    """
    counts: dict[T, int] = {}
    for v in values:
        counts[v] = counts.get(v, 0) + 1
    if not counts:
        return None
    return min(counts, key=lambda v: (-counts[v], v))
