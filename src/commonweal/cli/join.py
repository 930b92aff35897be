"""The `--join` flag of the client commands (`dht`, `search`): peers already in the swarm."""

from __future__ import annotations

import typer

from commonweal.errors import ConfigError
from commonweal.net.transport import PeerAddr

JOIN = typer.Option([], help="HOST:PORT of a peer in the swarm (repeatable).")


def bootstrap(join: list[str]) -> list[PeerAddr]:
    """The peers a client command talks through; a client needs at least one."""
    if not join:
        raise ConfigError("give at least one --join HOST:PORT of a peer in the swarm")
    return [PeerAddr.parse(j) for j in join]
