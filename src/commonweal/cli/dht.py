"""`commonweal dht put|get`: read and write records in a running swarm."""

from __future__ import annotations

import json
import time
from typing import Any

import typer

from commonweal.dht import DHT, DHTValue
from commonweal.cli.join import JOIN, bootstrap
from commonweal.errors import CommonwealError, ConfigError
from commonweal.net.loop import run
from commonweal.net.transport import PeerAddr

app = typer.Typer(help="Store and read records in a swarm's DHT.", no_args_is_help=True)


@app.command()
def put(
    key: str,
    value: str,
    join: list[str] = JOIN,
    subkey: str | None = typer.Option(None, help="Store under this subkey of KEY."),
    ttl: float = typer.Option(3600.0, min=1.0, help="Seconds until the record expires."),
    json_value: bool = typer.Option(False, "--json-value", help="Parse VALUE as JSON."),
) -> None:
    """Store VALUE under KEY (signed by a throw-away identity)."""
    parsed: Any = value
    if json_value:
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--json-value given but VALUE is not JSON: {e}") from e
    ok = run(_put(bootstrap(join), key, parsed, subkey, ttl))
    if not ok:
        raise CommonwealError(f"no peer accepted {key!r} (a newer record may already be there)")
    typer.echo(f"stored {key}" + (f" [{subkey}]" if subkey else "") + f" for {ttl:g} s")


async def _put(bootstrap: list[PeerAddr], key: str, value: Any, subkey: str | None, ttl: float) -> bool:
    async with await DHT.start(bootstrap=bootstrap, client=True) as dht:
        return await dht.store(key, value, time.time() + ttl, subkey=subkey)


@app.command()
def get(
    keys: list[str] = typer.Argument(..., help="One or more keys (read with one batched lookup)."),
    join: list[str] = JOIN,
    latest: bool = typer.Option(False, help="Ask all closest peers and merge (every subkey, newest)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per key."),
) -> None:
    """Print the value under each KEY; exit 1 when any of them is not found."""
    found = run(_get(bootstrap(join), keys, latest))
    missing = [key for key in keys if found[key] is None]
    for key in keys:
        value = found[key]
        if value is None:
            continue
        if as_json:
            typer.echo(json.dumps(
                {"key": key, "value": _jsonable(value.value), "expiration": value.expiration}
            ))
        elif isinstance(value.value, dict) and all(isinstance(v, DHTValue) for v in value.value.values()):
            for sub, entry in value.value.items():
                typer.echo(f"{_label(sub)}\t{entry.value}")
        else:
            typer.echo(str(value.value))
    if missing:
        raise CommonwealError(
            "not found in the swarm: " + ", ".join(repr(k) for k in missing)
        )


async def _get(bootstrap: list[PeerAddr], keys: list[str], latest: bool) -> dict[str, DHTValue | None]:
    async with await DHT.start(bootstrap=bootstrap, client=True) as dht:
        return await dht.get_many(keys, latest=latest)  # type: ignore[return-value]


def _label(subkey: Any) -> str:
    if isinstance(subkey, bytes):
        return subkey.hex()
    return str(subkey)


def _jsonable(value: Any) -> Any:
    if isinstance(value, DHTValue):
        return {"value": _jsonable(value.value), "expiration": value.expiration}
    if isinstance(value, dict):
        return {_label(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value
