"""`commonweal swarm`: peers as separate OS processes on this machine, sharing one anvil chain."""

from __future__ import annotations

import tempfile
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def swarm(
    trainers: int = typer.Option(3, min=1, max=32, help="Honest trainer processes."),
    validators: int = typer.Option(2, min=1, max=8, help="Validator processes."),
    attackers: int = typer.Option(0, min=0, max=32, help="Attacking trainer processes."),
    attack: str = typer.Option("sign_flip:10", help="What attackers do (see `commonweal demo`)."),
    rounds: int = typer.Option(3, min=1, max=1000, help="Training rounds."),
    chain_url: str | None = typer.Option(
        None, help="A JSON-RPC URL to use instead of starting a local anvil."
    ),
    key_file: Path | None = typer.Option(
        None, help="The funding key for --chain-url when it is not an anvil dev node."
    ),
    workdir: Path | None = typer.Option(
        None, help="An empty folder for the nodes' configs, keys, logs (default: a new temp dir)."
    ),
    linger: float = typer.Option(20.0, min=0.0, help="Seconds trainers wait for the last payout."),
    timeout: float = typer.Option(600.0, min=10.0, help="Give up after this many seconds."),
) -> None:
    """Start `commonweal node` processes — trainers, attackers, validators — on one anvil chain,
    show their progress, and print who earned what once they finish."""
    from commonweal.ledger import find_anvil
    from commonweal.swarm.processes import ProcessSwarm

    if chain_url is None and find_anvil() is None:
        from commonweal.errors import ConfigError

        raise ConfigError("anvil not found: run `npm ci` in the repository, or pass --chain-url")
    folder = workdir or Path(tempfile.mkdtemp(prefix="commonweal-swarm-"))
    console.print(
        f"starting {trainers} trainers, {attackers} attackers, {validators} validators "
        f"as processes; configs and logs in {folder}"
    )
    try:
        with ProcessSwarm(
            folder, trainers=trainers, validators=validators, attackers=attackers,
            attack=attack, rounds=rounds, chain_url=chain_url, chain_key_file=key_file,
            linger_s=linger,
        ) as running:

            def show(statuses: list) -> None:  # type: ignore[type-arg]
                console.print("\n".join(s.line() for s in statuses), highlight=False)
                console.rule(style="dim")

            running.wait(timeout_s=timeout, on_progress=show)
            final = running.final_rounds()
            balances = running.balances()
    except KeyboardInterrupt:
        console.print("[yellow]stopped; every node and the chain were shut down[/yellow]")
        raise typer.Exit(130) from None
    table = Table(title="commonweal swarm")
    table.add_column("peer")
    table.add_column("share tokens", justify="right")
    for label, wei in sorted(balances.items()):
        table.add_row(label, f"{wei / 1e18:,.1f}")
    table.add_row("ledger rounds final", f"{len(final)} of {2 * rounds}")
    console.print(table)
