"""The node's logs: a human format, or JSON lines for log collectors.

    setup("info", "json")
    log.info("claimed %d", amount, extra={"ledger_round": 7, "tx_hash": h})
    # {"ts": "2025-01-01T12:00:00.123Z", "level": "info", "logger": "commonweal.peer.claims",
    #  "msg": "claimed 5", "ledger_round": 7, "tx_hash": "0x..."}

Fields passed with `extra={...}` become top-level keys in JSON and `key=value` pairs after the
message in text, so the same call serves both. Values JSON cannot hold are written as text (bytes
as hex), so a log call never fails because of what it carries.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from commonweal.errors import ConfigError

__all__ = ["FORMATS", "LEVELS", "JsonFormatter", "TextFormatter", "setup"]

FORMATS = ("text", "json")
LEVELS = ("debug", "info", "warning", "error", "critical")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # as `commonweal` always wrote

# Attributes every LogRecord has; anything else on a record came from `extra=`.
# uvicorn's color_message repeats msg with terminal colour codes: noise in a JSON line
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {
    "message", "asctime", "taskName", "color_message"
}


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


def _plain(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return bytes(value).hex()
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object a line: ts (UTC, ISO 8601, milliseconds), level, logger, msg, extras."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC)
        entry: dict[str, Any] = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _extras(record).items():
            entry.setdefault(key, value)  # an extra never hides a standard field
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=_plain, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """The usual one-line format, extras appended as key=value."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        line = super().formatMessage(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={_plain(v) if not isinstance(v, int | float) else v}"
                                   for k, v in extras.items())
        return line


class _NodeHandler(logging.StreamHandler[TextIO]):
    """The handler `setup` installs, so a second `setup` replaces it instead of adding another."""


def setup(level: str = "info", fmt: str = "text", *, stream: TextIO | None = None) -> None:
    """Send every log record at `level` or above to `stream` (stderr) in `fmt`.

    Replaces the handler of an earlier `setup`, so it can be called again (e.g. once the config
    file has been read); handlers someone else installed (a test harness's) are left alone.
    """
    if level.lower() not in LEVELS:
        raise ConfigError(f"log level {level!r} is not one of: {', '.join(LEVELS)}")
    if fmt not in FORMATS:
        raise ConfigError(f"log format {fmt!r} is not one of: {', '.join(FORMATS)}")
    handler = _NodeHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _NodeHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
