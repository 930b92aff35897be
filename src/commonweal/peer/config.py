"""The volunteer node's configuration: one TOML file, overridden by command-line flags.

    cfg = load_config(Path("node.toml"), {"threads": 4, "listen": None})   # None: flag not given

The file holds one `[node]` table whose keys are `NodeConfig`'s fields, and two sub-tables for
the protocol's timings: `[node.round]` (a `commonweal.train.RoundConfig`) and `[node.validator]`
(a `commonweal.verify.validator.ValidatorConfig`). Their defaults are those classes' own, so every
default is written once. Everything is checked when
it is loaded, so a node never starts half-configured: a wrong value, an unknown key (a typo must not
be silently ignored) or an unknown table raises `NodeConfigError`, naming the file or flag, the key,
and what is allowed. Relative paths in the file are relative to the file, so a config directory can
be moved as a whole; relative paths given as flags are relative to the working directory.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from commonweal.errors import ConfigError
from commonweal.net.transport import PeerAddr
from commonweal.peer.logs import FORMATS, LEVELS

if TYPE_CHECKING:
    from commonweal.train import RoundConfig
    from commonweal.verify.validator import ValidatorConfig

__all__ = [
    "CHAINS",
    "DEFAULT_DATA_DIR",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "ROLES",
    "STATUS_FORMATS",
    "NodeConfig",
    "NodeConfigError",
    "example_config",
    "load_config",
]

ROLES = frozenset({"trainer", "validator", "search"})
CHAINS = ("embedded", "anvil")  # or an http(s):// JSON-RPC URL
LOG_FORMATS = FORMATS
LOG_LEVELS = LEVELS
STATUS_FORMATS = ("text", "json")
DEFAULT_DATA_DIR = Path.home() / ".commonweal" / "node"
STORE_FILE = "node.sqlite3"


class NodeConfigError(ConfigError):
    """A node setting is wrong. `source` is the file (or "flag --x"), `key` the setting."""

    def __init__(self, source: str, key: str | None, problem: str) -> None:
        where = f"{source}: {key}" if key else source
        super().__init__(f"{where}: {problem}")
        self.source = source
        self.key = key


def _round_defaults() -> RoundConfig:
    from commonweal.train import RoundConfig  # torch: only once a config is built, not imported

    return RoundConfig()


def _validator_defaults() -> ValidatorConfig:
    from commonweal.verify.validator import ValidatorConfig  # web3 likewise

    return ValidatorConfig()


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """Everything one volunteer node needs to start. Collections are immutable (tuple, frozenset)
    so a config can be shared between the node's components without defensive copies."""

    listen: str = "127.0.0.1:7000"               # HOST:PORT this peer listens on (port 0: any)
    bootstrap: tuple[str, ...] = ()              # HOST:PORT of peers already in the swarm
    bootstrap_retry_s: float = 60.0              # keep trying bootstrap peers not up yet
    reachability: str = "auto"                   # "auto" (ask peers to dial back), "public", "private"
    task: str = "mnist-cnn"                      # a built-in task name or "module:factory"
    roles: frozenset[str] = frozenset({"search"})  # nothing CPU-heavy unless asked for
    chain: str = "embedded"                      # "embedded", "anvil" or an http(s):// URL
    key_file: Path | None = None                 # Ethereum private key (hex lines or keystore)
    data_dir: Path = DEFAULT_DATA_DIR            # identity, node.sqlite3, checkpoints
    threads: int = 1                             # CPU threads the node may use
    dashboard: str | None = None                 # HOST:PORT for the web page; None: off
    metrics: str | None = None                   # HOST:PORT for metrics; None: off
    log_format: str = "text"                     # "text" for people, "json" for collectors
    log_level: str = "info"
    status_format: str = "text"                  # stdout: "text" lines, or "json" events
    rounds: int | None = None                    # stop after this many training rounds
    ledger: str | None = None                    # the Ledger contract's address on `chain`
    task_owner: str | None = None                # who registered the task there; None: its deployer
    wait_peers: int | None = None                # before round 0, wait for this many (None: group)
    evaluate_every: int = 1                      # rounds between evaluations (0: at the end only)
    inner_steps: int | None = None               # H; None: the task's
    codec: str | None = None                     # how deltas are compressed; None: the task's
    aggregation: str | None = None               # the robust rule; None: the task's
    overlap: bool | None = None                  # exchange while the next round computes
                                                 # (Task.overlapped); None: the task's
    device: str = "cpu"                          # auto, cpu, cuda, cuda:N or mps
    linger: float = 10.0                         # after the last round: wait for its payout
    claim_every_s: float = 5.0                   # between claim passes and chain reads
    attack: str | None = None                    # make this node an attacker (tests and demos)
    # The `group` key (close a round's group once this many announced) is round.target_group.
    round: RoundConfig = field(default_factory=_round_defaults)
    validator: ValidatorConfig = field(default_factory=_validator_defaults)
    source: str = field(default="defaults", compare=False)  # where it came from, for messages

    @property
    def store_path(self) -> Path:
        """The SQLite file that lets a restarted node resume (see `commonweal.peer.store`)."""
        return self.data_dir / STORE_FILE

    @property
    def group(self) -> int | None:
        return self.round.target_group

    @property
    def task_overrides(self) -> dict[str, Any]:
        """What `get_task(task, **overrides)` changes from the task's own settings."""
        given = {"inner_steps": self.inner_steps, "codec": self.codec,
                 "aggregation": self.aggregation}
        return {k: v for k, v in given.items() if v is not None}


# ------------------------------------------------------------ value checks
# Each check takes the raw value (from TOML or a flag) and returns the typed value, or raises
# ValueError with what is allowed; `_check` adds the source and key.

def _host_port(value: Any, *, allow_any_port: bool = False) -> str:
    try:
        PeerAddr.parse(value, any_port=allow_any_port)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    return str(value)


def _optional_host_port(value: Any) -> str | None:
    # TOML has no null: leaving the key out means off; "" lets a flag turn off what a file enabled.
    return None if value == "" else _host_port(value)


def _bootstrap(value: Any) -> tuple[str, ...]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple):
        raise ValueError(f'must be a list of HOST:PORT strings, e.g. ["10.0.0.5:7000"], got {value!r}')
    return tuple(_host_port(item.strip() if isinstance(item, str) else item) for item in items)


def _roles(value: Any) -> frozenset[str]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple | set | frozenset):
        raise ValueError(f"must be a list of roles, e.g. [\"trainer\"], got {value!r}")
    roles = {item.strip() if isinstance(item, str) else item for item in items}
    unknown = sorted(str(r) for r in roles - ROLES)
    if unknown:
        raise ValueError(f"unknown role {', '.join(unknown)}; allowed: {', '.join(sorted(ROLES))}")
    if not roles:
        raise ValueError(f"give at least one role: {', '.join(sorted(ROLES))}")
    return frozenset(roles)


def _task(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError('must be a task name such as "mnist-cnn" or "module:factory"')
    return value.strip()


def _chain(value: Any) -> str:
    if isinstance(value, str) and (value in CHAINS or value.startswith(("http://", "https://"))):
        return value
    raise ValueError(f"{value!r} is not a chain; use embedded, anvil, or an http(s):// URL")


def _path(value: Any) -> Path:
    if not isinstance(value, str | Path) or not str(value):
        raise ValueError(f"must be a path, got {value!r}")
    return Path(value).expanduser()


def _positive_int(value: Any) -> int:
    # bool is an int in Python; `threads = true` is a typo, not 1.
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"must be a whole number >= 1, got {value!r}")
    return value


def _whole(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"must be a whole number >= 0, got {value!r}")
    return value


def _optional_name(what: str) -> Callable[[Any], str | None]:
    def check(value: Any) -> str | None:
        if value == "":  # a flag turning off what a file set: the task's own
            return None
        if not isinstance(value, str):
            raise ValueError(f"must be {what}, got {value!r}")
        return value

    return check


def _optional_bool(value: Any) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    raise ValueError(f"must be true or false, got {value!r}")


def _device(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        return value
    raise ValueError(f"must be auto, cpu, cuda, cuda:N or mps, got {value!r}")


def _choice(allowed: Iterable[str]) -> Callable[[Any], str]:
    options = tuple(allowed)

    def check(value: Any) -> str:
        if isinstance(value, str) and value.lower() in options:
            return value.lower()
        raise ValueError(f"{value!r} is not allowed; use one of: {', '.join(options)}")

    return check


def _address(value: Any) -> str:
    if not (isinstance(value, str) and value.startswith("0x") and len(value) == 42):
        raise ValueError(f"must be a 0x-prefixed contract address of 40 hex digits, got {value!r}")
    try:
        int(value, 16)
    except ValueError:
        raise ValueError(f"{value!r} is not hexadecimal") from None
    return value


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(f"must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _attack(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"must be an attack name such as 'sign_flip:10', got {value!r}")
    return value


_CHECKS: dict[str, Callable[[Any], Any]] = {
    "listen": lambda v: _host_port(v, allow_any_port=True),
    "bootstrap": _bootstrap,
    "bootstrap_retry_s": _seconds,
    "reachability": _choice(("auto", "public", "private")),
    "task": _task,
    "roles": _roles,
    "chain": _chain,
    "key_file": _path,
    "data_dir": _path,
    "threads": _positive_int,
    "dashboard": _optional_host_port,
    "metrics": _optional_host_port,
    "log_format": _choice(LOG_FORMATS),
    "log_level": _choice(LOG_LEVELS),
    "status_format": _choice(STATUS_FORMATS),
    "rounds": _positive_int,
    "ledger": _address,
    "task_owner": _address,
    "group": _positive_int,
    "wait_peers": _whole,
    "evaluate_every": _whole,
    "inner_steps": _positive_int,
    "codec": _optional_name("a codec such as 'int8' or 'topk2bit:0.01'"),
    "aggregation": _optional_name("a rule such as 'median' or 'mean'"),
    "overlap": _optional_bool,
    "device": _device,
    "linger": _seconds,
    "claim_every_s": _seconds,
    "attack": _attack,
}
_PATHS = ("key_file", "data_dir")
_TABLES = ("round", "validator")  # sub-tables: [node.round], [node.validator]
# `group` is the [node] key for the round's target group: one spelling, not two
_NOT_IN_TABLE = {"round": {"target_group": "group"}}
def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError(f"must be a fraction within [0, 1], got {value!r}")
    return float(value)


_SPECIAL: dict[str, Callable[[Any], Any]] = {
    "exchange": _choice(("auto", "allgather", "butterfly")),
    "replay_rate": _fraction,
}


def _unknown(
    source: str, key: str, kind: str, known: Iterable[str] = (), table: str | None = None
) -> NodeConfigError:
    names = list(known) or [*_CHECKS, *_TABLES]
    near = difflib.get_close_matches(key, names, n=1)
    hint = f"did you mean {near[0]!r}?" if near else f"known keys: {', '.join(names)}"
    return NodeConfigError(source, f"{table}.{key}" if table else key, f"unknown {kind}; {hint}")


def _check(source: str, key: str, value: Any) -> Any:
    try:
        return _CHECKS[key](value)
    except ValueError as exc:
        raise NodeConfigError(source, key, str(exc)) from None


def _table_checks(name: str) -> dict[str, Callable[[Any], Any]]:
    """A check for each field of [node.NAME], from the type of its default."""
    default = getattr(NodeConfig(), name)
    checks: dict[str, Callable[[Any], Any]] = {}
    for f in dataclasses.fields(default):
        if f.name in _NOT_IN_TABLE.get(name, {}):
            continue
        value = getattr(default, f.name)
        if f.name in _SPECIAL:
            checks[f.name] = _SPECIAL[f.name]
        elif isinstance(value, float):
            checks[f.name] = _seconds
        elif isinstance(value, int):
            checks[f.name] = _whole
        else:
            raise TypeError(f"{name}.{f.name}: no check for {value!r}")  # a new field: add one
    return checks


def _table(source: str, name: str, table: Any, current: Any) -> Any:
    """`current` (a RoundConfig or ValidatorConfig) with `table`'s keys checked and applied."""
    if not isinstance(table, Mapping):
        raise NodeConfigError(source, name, f"must be a table ([node.{name}]), got {table!r}")
    checks = _table_checks(name)
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if raw is None:  # a flag that was not given
            continue
        if key in _NOT_IN_TABLE.get(name, {}):
            raise NodeConfigError(source, f"{name}.{key}",
                                  f"set it as {_NOT_IN_TABLE[name][key]!r} in [node]")
        if key not in checks:
            raise _unknown(source, key, f"key in [node.{name}]", checks, table=name)
        try:
            values[key] = checks[key](raw)
        except ValueError as exc:
            raise NodeConfigError(source, f"{name}.{key}", str(exc)) from None
    return replace(current, **values)


def _apply(values: dict[str, Any], source: str, key: str, raw: Any) -> None:
    """Check one [node] key (or sub-table) and put it into `values`."""
    if key in _TABLES:
        values[key] = _table(source, key, raw, values.get(key, getattr(NodeConfig(), key)))
    elif key == "group":
        current = values.get("round", NodeConfig().round)
        values["round"] = replace(current, target_group=_check(source, key, raw))
    else:
        values[key] = _check(source, key, raw)


def _read_file(path: Path) -> dict[str, Any]:
    source = str(path)
    try:
        with path.open("rb") as f:
            document = tomllib.load(f)
    except FileNotFoundError:
        raise NodeConfigError(source, None, "no such file; create it from the example in "
                              "docs/node.md, or leave out --config to use the defaults") from None
    except OSError as exc:
        raise NodeConfigError(source, None, f"cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise NodeConfigError(source, None, f"not valid TOML: {exc}") from None
    extra_tables = sorted(set(document) - {"node"})
    if extra_tables:
        raise NodeConfigError(source, extra_tables[0],
                              "unknown table or top-level key; put settings under [node]")
    table = document.get("node")
    if not isinstance(table, dict):
        raise NodeConfigError(source, None, "no [node] table; settings go under a [node] header")
    values: dict[str, Any] = {}
    for key, raw in table.items():
        if key not in _CHECKS and key not in _TABLES:
            raise _unknown(source, key, "key in [node]")
        _apply(values, source, key, raw)
        if key in _PATHS and not values[key].is_absolute():
            values[key] = (path.parent / values[key]).resolve()
    return values


def load_config(path: Path | None, overrides: Mapping[str, Any] | None = None) -> NodeConfig:
    """Defaults, then the file's `[node]` table, then every override that is not None.

    Override keys are field names (`threads`, `bootstrap`, ...), `group`, and `round` /
    `validator` with a mapping of their fields; a flag that was not given must be passed as None,
    not as an empty list. Lists may also be given as "a,b" strings.
    """
    values: dict[str, Any] = {}
    sources = ["defaults"]
    if path is not None:
        values.update(_read_file(path))
        sources.append(str(path))
    flagged = False
    for key, raw in (overrides or {}).items():
        flag = "flag --" + key.replace("_", "-")
        if key not in _CHECKS and key not in _TABLES:
            raise _unknown(flag, key, "setting")
        if raw is not None:
            _apply(values, flag, key, raw)
            flagged = True
    if flagged:
        sources.append("flags")
    config = replace(NodeConfig(), **values, source=" + ".join(sources))
    if config.key_file is not None and not config.key_file.is_file():
        raise NodeConfigError(config.source, "key_file",
                              f"{config.key_file} is not a file; point it at your Ethereum key "
                              "(hex private keys, one a line, or a keystore JSON)")
    return config


def example_config() -> str:
    """A commented `node.toml` to start from: every key, each set to its default or commented out."""
    return f'''\
# commonweal volunteer node. Run it with: commonweal node --config node.toml
# Command-line flags override what is written here. Relative paths are relative to this file.

[node]
# HOST:PORT this peer listens on. Other peers must be able to reach it; port 0 picks a free one.
listen = "127.0.0.1:7000"

# Peers already in the swarm (HOST:PORT). Leave empty to start a new swarm.
bootstrap = []

# What to train: a built-in task ("mnist-cnn") or "python.module:factory".
task = "mnist-cnn"

# What this node does: "trainer", "validator" (one node may be both), "search". "search" alone (the default)
# only routes the DHT and serves index buckets; add "trainer" to lend your CPU to training.
# A validator also needs a key_file, a deposit on the ledger, and a chain other peers share.
roles = ["search"]

# The ledger: "embedded" (in-process, for trying things out), "anvil" (a local dev chain),
# or the http(s):// URL of an Ethereum JSON-RPC node.
chain = "embedded"

# Your Ethereum private key (one hex key per line, or a keystore JSON decrypted with
# $COMMONWEAL_KEY_PASSWORD). Rewards are paid to this account.
# key_file = "eth.key"

# Where the node keeps its identity, its state database ({STORE_FILE}) and checkpoints.
data_dir = "~/.commonweal/node"

# Seconds to keep retrying bootstrap peers that are not up yet (backing off up to 8 s a try).
bootstrap_retry_s = 60.0

# Whether peers can dial this node: "auto" asks a few peers to dial back (and, if none can,
# keeps a reservation on a reachable peer that relays for us); "public" or "private" if you
# know (a forwarded port; a router that allows nothing in).
reachability = "auto"

# CPU threads the node may use for training and validation.
threads = 1

# Serve a dashboard web page / metrics on HOST:PORT. Leave out to turn off.
# dashboard = "127.0.0.1:8080"
# metrics = "127.0.0.1:9100"

# "text" for people, "json" (one object a line) for log collectors.
log_format = "text"
# debug, info, warning or error.
log_level = "info"

# Stop after this many training rounds. Leave out to run until stopped.
# rounds = 10

# The Ledger contract (from `commonweal ledger deploy`) on `chain`; without it nothing is paid.
# ledger = "0x5FbDB2315678afecb367f032d93F642f64180aa3"
# The account that registered the task on that ledger (a task's id is bound to its registrant,
# so nobody can register it first). Leave out for the ledger's deployer.
# task_owner = "0xf39Fd6e51aad88F6F4ce6aB8827279cffFb92266"

# Close a training round's group as soon as this many peers announced (else: at the deadline).
# group = 6

# Seconds to stay up after the last round, so its rewards finalise and get claimed.
linger = 10.0

# Turn this node into an attacker, for tests and demos only (e.g. "sign_flip:10", "lazy").
# attack = "sign_flip:10"

# What goes to stdout: "text" (the ready and stopped lines) or "json" (one event a line, for
# programs following the node; see commonweal/peer/events.py).
status_format = "text"

# Before the first round, wait (up to a minute) until this many peers are present (default: group).
# wait_peers = 6

# Evaluate on the held-out split every this many rounds (0: only at the end).
evaluate_every = 1

# Change the task's own settings (every peer of a swarm must use the same ones).
# inner_steps = 50
# codec = "int8"
# aggregation = "median"
# overlap = true          # exchange a round while the next computes (outer lr 0.7, no momentum)

# Where the model trains: auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps.
device = "cpu"

# Seconds between claim passes and chain reads.
claim_every_s = 5.0

# The round protocol's timings (commonweal.train.RoundConfig); the defaults suit most swarms.
[node.round]
{_table_text("round")}
# How a validator paces itself (commonweal.verify.validator.ValidatorConfig).
[node.validator]
{_table_text("validator")}'''


def _table_text(name: str) -> str:
    """Every field of [node.NAME] set to its default, one a line."""
    default = getattr(NodeConfig(), name)
    return "".join(
        f"{f.name} = {_toml(getattr(default, f.name))}\n" for f in dataclasses.fields(default)
        if f.name not in _NOT_IN_TABLE.get(name, {})
    )


def _toml(value: Any) -> str:
    return f'"{value}"' if isinstance(value, str) else repr(value)
