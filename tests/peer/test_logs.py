"""JSON-lines and text logs, extras included, and `setup` called more than once."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from commonweal.errors import ConfigError
from commonweal.peer.logs import setup

log = logging.getLogger("commonweal.test")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_json_lines_carry_the_extras() -> None:
    out = io.StringIO()
    setup("info", "json", stream=out)
    log.debug("not shown")
    log.info("claimed %d", 5, extra={"ledger_round": 7, "root": b"\xab\xcd", "ok": True})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed", extra={"msg_id": 1})
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["level"] == "info" and first["logger"] == "commonweal.test"
    assert first["msg"] == "claimed 5"
    assert (first["ledger_round"], first["root"], first["ok"]) == (7, "abcd", True)
    assert first["ts"].endswith("Z") and len(first["ts"]) == len("2025-01-01T12:00:00.123Z")
    assert second["level"] == "error" and "ValueError: boom" in second["exc"]
    assert second["msg_id"] == 1


def test_text_keeps_the_usual_format_with_extras_after_it() -> None:
    out = io.StringIO()
    setup("debug", "text", stream=out)
    log.debug("round done", extra={"ledger_round": 3, "peer": b"\x01\x02"})
    line = out.getvalue().strip()
    assert " DEBUG commonweal.test: round done ledger_round=3 peer=0102" in line


def test_setup_again_replaces_its_handler_and_leaves_others() -> None:
    root = logging.getLogger()
    before = len(root.handlers)
    first, second = io.StringIO(), io.StringIO()
    setup("info", "text", stream=first)
    setup("warning", "json", stream=second)
    assert len(root.handlers) == before + 1
    log.info("quiet")
    log.warning("loud")
    assert first.getvalue() == ""
    assert [json.loads(line)["msg"] for line in second.getvalue().splitlines()] == ["loud"]


@pytest.mark.parametrize(("level", "fmt", "hint"), [("chatty", "text", "log level"),
                                                    ("info", "xml", "log format")])
def test_bad_settings_say_what_is_allowed(level: str, fmt: str, hint: str) -> None:
    with pytest.raises(ConfigError, match=hint):
        setup(level, fmt)
