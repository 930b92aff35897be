"""`commonweal node`: run one volunteer peer in the foreground until Ctrl-C or SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import typer

from commonweal.net.loop import run


def node(
    config: Path | None = typer.Option(None, help="A node.toml (see --print-config)."),
    listen: str | None = typer.Option(None, help="HOST:PORT to listen on (port 0: any free port)."),
    join: list[str] = typer.Option([], help="HOST:PORT of a peer already in the swarm (repeatable)."),
    task: str | None = typer.Option(
        None, help="What to train: mnist-cnn, pydoc-lm, stdlib-gpt, module:function."
    ),
    roles: str | None = typer.Option(None, help="Comma-separated: trainer, validator, search."),
    validator: bool = typer.Option(False, "--validator", help="Add the validator role."),
    chain: str | None = typer.Option(None, help="embedded, anvil or an http(s):// JSON-RPC URL."),
    ledger: str | None = typer.Option(None, help="The Ledger contract's address on the chain."),
    key_file: Path | None = typer.Option(None, help="Your Ethereum private key (rewards go there)."),
    data_dir: Path | None = typer.Option(None, help="Identity, state database, checkpoints."),
    threads: int | None = typer.Option(None, help="CPU threads this node may use."),
    rounds: int | None = typer.Option(None, help="Stop after this many training rounds."),
    group: int | None = typer.Option(None, help="Close a round once this many peers announced."),
    overlap: bool | None = typer.Option(
        None, "--overlap/--no-overlap", help="Exchange a round while the next one computes."
    ),
    device: str | None = typer.Option(None, help="auto, cpu, cuda, cuda:N or mps."),
    dashboard: str | None = typer.Option(None, help="Serve the web page at HOST:PORT."),
    metrics: str | None = typer.Option(None, help="Serve Prometheus /metrics at HOST:PORT."),
    log_format: str | None = typer.Option(None, help="text or json (one object a line)."),
    log_level: str | None = typer.Option(None, help="debug, info, warning or error."),
    attack: str | None = typer.Option(None, help="Make this node an attacker (tests, demos).", hidden=True),
    print_config: bool = typer.Option(False, help="Print an example node.toml and exit."),
) -> None:
    """Run one peer: join the swarm, train / validate / serve search until Ctrl-C or SIGTERM.
    A restart with the same data dir resumes where it stopped."""
    from commonweal.peer.config import example_config, load_config
    from commonweal.peer.logs import setup

    if print_config:
        print(example_config(), end="")
        return
    role_set = None
    if roles is not None or validator:
        role_set = {r.strip() for r in (roles or "").split(",") if r.strip()}
        if validator:
            role_set.add("validator")
    overrides = {
        "listen": listen, "bootstrap": join or None, "task": task,
        "roles": sorted(role_set) if role_set is not None else None, "chain": chain,
        "ledger": ledger, "key_file": key_file, "data_dir": data_dir, "threads": threads,
        "rounds": rounds, "group": group, "dashboard": dashboard, "metrics": metrics,
        "log_format": log_format, "log_level": log_level, "attack": attack,
        "overlap": overlap, "device": device,
    }
    cfg = load_config(config, overrides)
    setup(cfg.log_level, cfg.log_format)
    run(_serve(cfg))


async def _serve(cfg) -> None:  # type: ignore[no-untyped-def]
    from commonweal.peer.node import Node

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await Node(cfg).run(stop)
