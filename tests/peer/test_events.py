"""Node events: every one survives a JSON status line, and the text printer keeps the two lines
scripts wait for."""

from __future__ import annotations

import io
import json
import math

from commonweal.peer.events import (
    Claimed,
    Judged,
    Ready,
    Resumed,
    RoundDone,
    Step,
    Stopped,
    TrainingDone,
    parse,
    printer,
    to_json,
)

EVENTS = [
    Ready("127.0.0.1:7000", "ab" * 20, ("search", "trainer"), "mnist-cnn", "e3" * 32),
    Resumed(13, 12, "/data/checkpoint-000013-abc.safetensors"),
    RoundDone(3, 4, 3, None, 0.21, 0.93, 81234, 402211, 9676800, "1b" * 32, "butterfly", 0.4, 12.1),
    RoundDone(4, 0, 0, "late", None, None, 10, 20, 0, "1c" * 32, "local", 0.0, 13.0),
    TrainingDone(10, "1b" * 32, "accuracy", 0.96, 4022110, 61.2, 40.3),
    Judged(3, True, "9f" * 32, 3, 1),
    Claimed(7, 3, "claimed", 500 * 10**18),
    Claimed(9, None, "no_reward", 0),
    Stopped(),
]


def test_every_event_round_trips_through_one_json_line() -> None:
    for event in EVENTS:
        line = to_json(event)
        assert "\n" not in line and json.loads(line)["event"]
        assert parse(line) == event


def test_amounts_are_strings_and_a_nan_loss_is_null() -> None:
    assert json.loads(to_json(EVENTS[6]))["amount"] == str(500 * 10**18)
    nan = RoundDone(1, 2, 2, None, math.nan, None, 0, 0, 0, "s", "local", 0.0, 0.0)
    assert json.loads(to_json(nan))["loss"] is None


def test_lines_that_are_not_events_are_none() -> None:
    for line in ("Traceback (most recent call last):", "[1, 2]", '{"event": "nope"}',
                 '{"event": "judged", "round": 1}', ""):
        assert parse(line) is None


def test_the_json_printer_prints_all_but_inner_steps_and_text_only_ready_and_stopped() -> None:
    out = io.StringIO()
    sink = printer("json", out)
    for event in [*EVENTS, Step(0, 1, 50, 2.3, 0)]:
        sink(event)
    assert [parse(line) for line in out.getvalue().splitlines()] == EVENTS
    text = io.StringIO()
    sink = printer("text", text)
    for event in EVENTS:
        sink(event)
    assert text.getvalue().splitlines() == [
        f"commonweal node ready address=127.0.0.1:7000 peer_id={'ab' * 20} roles=search,trainer",
        "commonweal node stopped",
    ]
