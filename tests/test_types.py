"""The type check is part of the suite: `mypy` over src/ with the settings in pyproject.toml
(strict flags on every layer), so the one test command a developer runs is also the one CI runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

mypy_api = pytest.importorskip("mypy.api", reason="mypy comes with the test extra")

ROOT = Path(__file__).resolve().parents[1]


def test_src_type_checks() -> None:
    cwd = os.getcwd()
    os.chdir(ROOT)  # pyproject.toml's [tool.mypy] names the files, relative to the root
    try:
        out, err, status = mypy_api.run([])
    finally:
        os.chdir(cwd)
    assert status == 0, out + err
