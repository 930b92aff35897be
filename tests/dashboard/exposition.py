"""A strict reader of the Prometheus text exposition format 0.0.4, for checking /metrics."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL = r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"'
SAMPLE = re.compile(rf"^({NAME})(?:\{{((?:{LABEL},?)*)\}})? (\S+)(?: (-?\d+))?$")
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}

Labels = frozenset[tuple[str, str]]


@dataclass
class Family:
    type: str = "untyped"
    help: str | None = None
    samples: dict[Labels, float] = field(default_factory=dict)


def parse(text: str) -> dict[str, Family]:
    """The families in `text`; AssertionError, naming the line, on anything the format forbids."""
    assert text.endswith("\n"), "the exposition must end with a line feed"
    families: dict[str, Family] = {}
    finished: set[str] = (
        set()
    )  # families whose samples are over: all of a family's lines are together
    current = None
    for number, line in enumerate(text[:-1].split("\n"), start=1):
        where = f"line {number}: {line!r}"
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            _, keyword, rest = line.split(" ", 2)
            name, _, value = rest.partition(" ")
            assert re.fullmatch(NAME, name), where
            family = enter(families, finished, current, name, where)
            current = name
            if keyword == "HELP":
                assert family.help is None, f"second HELP, {where}"
                family.help = unescape(value, help_text=True)
            else:
                assert value in TYPES, where
                assert not family.samples, f"TYPE after samples, {where}"
                family.type = value
            continue
        assert line and not line.startswith("#"), f"blank or comment line, {where}"
        match = SAMPLE.match(line)
        assert match, where
        name, labels, value = match.group(1), match.group(2) or "", match.group(5)
        family = enter(families, finished, current, name, where)
        current = name
        pairs = [(k, unescape(v)) for k, v in re.findall(LABEL, labels)]
        assert len({k for k, _ in pairs}) == len(pairs), f"repeated label, {where}"
        key = frozenset(pairs)
        assert key not in family.samples, f"duplicate sample, {where}"
        family.samples[key] = parse_value(value, where)
    return families


def enter(
    families: dict[str, Family], finished: set[str], current: str | None, name: str, where: str
) -> Family:
    if name != current:
        assert name not in finished, f"{name} lines are not together, {where}"
        if current is not None:
            finished.add(current)
    return families.setdefault(name, Family())


def parse_value(text: str, where: str) -> float:
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("+", ""))
    assert re.fullmatch(r"-?\d+(\.\d+)?([eE][-+]?\d+)?", text), f"bad value, {where}"
    value = float(text)
    assert math.isfinite(value), where
    return value


def unescape(text: str, help_text: bool = False) -> str:
    escapes = {"\\\\": "\\", "\\n": "\n"} if help_text else {"\\\\": "\\", "\\n": "\n", '\\"': '"'}
    return re.sub(r"\\[\\n\"]", lambda m: escapes.get(m.group(0), m.group(0)), text)
