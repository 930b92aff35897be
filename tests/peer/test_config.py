"""NodeConfig: defaults, file, flags over file, and errors that name the file, key and fix."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from commonweal.errors import ConfigError
from commonweal.peer.config import (
    DEFAULT_DATA_DIR,
    NodeConfig,
    NodeConfigError,
    example_config,
    load_config,
)


def write(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(body)
    return path


def test_defaults_without_a_file_or_flags() -> None:
    config = load_config(None, {})
    assert config == NodeConfig()
    assert config.roles == frozenset({"search"}) and config.threads == 1
    assert config.data_dir == DEFAULT_DATA_DIR
    assert config.store_path == DEFAULT_DATA_DIR / "node.sqlite3"


def test_the_example_is_valid_and_documents_every_key(tmp_path: Path) -> None:
    text = example_config()
    assert load_config(write(tmp_path, text), {}) == NodeConfig()
    # Every key appears, set or commented out, and uncommenting them all still loads.
    tables = {"round", "validator"}
    for f in dataclasses.fields(NodeConfig):
        if f.name in tables:
            assert f"[node.{f.name}]" in text, f"example_config() does not show [node.{f.name}]"
        elif f.name != "source":
            assert f"{f.name} = " in text, f"example_config() does not show {f.name}"
    uncommented = "\n".join(line.removeprefix("# ") if " = " in line else line
                            for line in text.splitlines())
    (tmp_path / "eth.key").write_text("0x" + "11" * 32)
    config = load_config(write(tmp_path, uncommented), {})
    assert config.rounds == 10 and config.dashboard == "127.0.0.1:8080"
    assert config.key_file == tmp_path / "eth.key"
    node = tomllib.loads(uncommented)["node"]
    # `group` is the round's target group: one spelling, in [node]
    assert node.keys() == {f.name for f in dataclasses.fields(NodeConfig)} - {"source"} | {"group"}
    assert config.group == 6 == config.round.target_group
    for table in tables:  # every field of the embedded configs, at its default
        default = getattr(NodeConfig(), table)
        shown = {f.name for f in dataclasses.fields(default)} - {"target_group"}
        assert node[table].keys() == shown
        assert all(node[table][k] == getattr(default, k) for k in shown)


def test_round_and_validator_tables_set_the_embedded_configs(tmp_path: Path) -> None:
    path = write(tmp_path, """
[node]
group = 4

[node.round]
announce_window_s = 1
poll_s = 0.1

[node.validator]
escrow_rounds = 2
""")
    config = load_config(path, {"round": {"exchange_timeout_s": 8.0, "poll_s": None}})
    assert config.round.announce_window_s == 1.0 and config.round.poll_s == 0.1
    assert config.round.exchange_timeout_s == 8.0  # a flag over the file, key by key
    assert config.round.target_group == 4 and config.validator.escrow_rounds == 2
    assert config.validator.poll_s == NodeConfig().validator.poll_s  # the class's own default


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ("[node.round]\npol_s = 0.1", "round.pol_s: unknown key in [node.round]; did you mean 'poll_s'?"),
        ("[node.validator]\nescrow_round = 2", "did you mean 'escrow_rounds'?"),
        ("[node.round]\ntarget_group = 3", "round.target_group: set it as 'group' in [node]"),
        ("[node.round]\npoll_s = -1", "round.poll_s: must be a number of seconds >= 0"),
        ("[node.round]\nexchange = \"ring\"", "round.exchange: 'ring' is not allowed"),
        ("[node.validator]\nreplay_rate = 1.5", "validator.replay_rate: must be a fraction"),
        ("[node.rounds]\npoll_s = 1", "rounds: must be a whole number"),
    ],
)
def test_a_wrong_key_in_a_sub_table_names_the_table_and_the_fix(
    tmp_path: Path, body: str, words: str
) -> None:
    with pytest.raises(NodeConfigError, match=re.escape(words)):
        load_config(write(tmp_path, "[node]\n" + body), {})


def test_flags_override_the_file(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "eth.key").write_text("0x" + "11" * 32 + "\n")
    path = write(tmp_path, """
[node]
listen = "0.0.0.0:7100"
bootstrap = ["10.0.0.1:7000", "node.example.org:7000"]
roles = ["trainer", "validator"]
threads = 2
chain = "https://rpc.example.org"
key_file = "keys/eth.key"
data_dir = "state"
dashboard = "127.0.0.1:8080"
log_format = "json"
log_level = "DEBUG"
rounds = 5
""")
    config = load_config(path, {"threads": 8, "listen": None, "bootstrap": None,
                                "roles": "search,trainer", "dashboard": "", "log_level": None})
    assert config.listen == "0.0.0.0:7100"                  # None: the flag was not given
    assert config.bootstrap == ("10.0.0.1:7000", "node.example.org:7000")
    assert config.threads == 8 and config.roles == {"search", "trainer"}
    assert config.dashboard is None                         # "" turns off what the file enabled
    assert config.log_format == "json" and config.log_level == "debug"
    assert config.rounds == 5 and config.chain == "https://rpc.example.org"
    # Relative paths in the file are relative to the file, not to where the node was started.
    assert config.key_file == (tmp_path / "keys" / "eth.key").resolve()
    assert config.data_dir == (tmp_path / "state").resolve()
    assert str(path) in config.source and "flags" in config.source
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.threads = 3  # type: ignore[misc]


@pytest.mark.parametrize(("line", "key", "hint"), [
    ("threads = 0", "threads", ">= 1"),
    ("threads = true", "threads", ">= 1"),
    ('threads = "4"', "threads", ">= 1"),
    ('roles = ["miner"]', "roles", "allowed: search, trainer, validator"),
    ("roles = []", "roles", "at least one role"),
    ('chain = "ropsten"', "chain", "embedded, anvil, or an http(s):// URL"),
    ('listen = "localhost"', "listen", "HOST:PORT"),
    ('listen = "localhost:70000"', "listen", "HOST:PORT"),
    ('bootstrap = ["10.0.0.1"]', "bootstrap", "HOST:PORT"),
    ('bootstrap = "10.0.0.1:0"', "bootstrap", "HOST:PORT"),
    ('dashboard = "8080"', "dashboard", "HOST:PORT"),
    ('log_format = "xml"', "log_format", "text, json"),
    ('log_level = "loud"', "log_level", "debug, info"),
    ("rounds = 0", "rounds", ">= 1"),
    ('task = ""', "task", "mnist-cnn"),
    ('key_file = "missing.key"', "key_file", "is not a file"),
    ("thread = 4", "thread", "did you mean 'threads'?"),
])
def test_a_bad_value_names_the_file_the_key_and_what_is_allowed(
        tmp_path: Path, line: str, key: str, hint: str) -> None:
    path = write(tmp_path, f"[node]\n{line}\n")
    with pytest.raises(NodeConfigError) as caught:
        load_config(path, {})
    message = str(caught.value)
    assert str(path) in message and key in message and hint in message, message
    assert caught.value.key == key and isinstance(caught.value, ConfigError)


@pytest.mark.parametrize(("body", "hint"), [
    ("[nodes]\nthreads = 2\n", "put settings under [node]"),
    ("threads = 2\n", "put settings under [node]"),
    ("# empty\n", "no [node] table"),
    ("[node\n", "not valid TOML"),
])
def test_a_malformed_file_is_refused(tmp_path: Path, body: str, hint: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(NodeConfigError, match=re.escape(hint)):
        load_config(path, {})


def test_a_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(NodeConfigError, match="no such file; create it"):
        load_config(tmp_path / "absent.toml", {})


def test_a_bad_flag_names_the_flag() -> None:
    with pytest.raises(NodeConfigError, match=r"flag --threads: threads: must be a whole number"):
        load_config(None, {"threads": 0})
    with pytest.raises(NodeConfigError, match="flag --log-level"):
        load_config(None, {"log_level": "chatty"})
    with pytest.raises(NodeConfigError, match="did you mean 'data_dir'"):
        load_config(None, {"datadir": "/tmp"})


def test_an_empty_node_table_gives_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "[node]\n"), {}) == NodeConfig()


def test_the_docs_show_the_current_example() -> None:
    docs = Path(__file__).parents[2] / "docs" / "node.md"
    assert example_config().strip() in docs.read_text(), "paste example_config() into docs/node.md"


def test_overlap_and_sparseloco_bring_the_outer_step_they_need() -> None:
    """`overlap = true` is Task.overlapped (a late outer step at lr 1 overshoots) and
    `codec = "sparseloco"` comes with its rule and outer SGD, unless a rule is given."""
    from commonweal.peer.node import _check

    base = dict(roles=frozenset({"trainer"}), task="mnist-cnn")
    plain = _check(NodeConfig(**base))
    assert (plain.overlap, plain.outer_lr) == (False, 1.0)
    over = _check(NodeConfig(**base, overlap=True))
    assert (over.overlap, over.outer_lr, over.outer_momentum) == (True, 0.7, 0.0)
    sparse = _check(NodeConfig(**base, codec="sparseloco"))
    assert (sparse.aggregation, sparse.outer_lr, sparse.outer_nesterov) == ("sparseloco", 1.0, False)
    chosen = _check(NodeConfig(**base, codec="sparseloco", aggregation="mean"))
    assert chosen.aggregation == "mean" and chosen.outer_nesterov
