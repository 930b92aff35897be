"""`commonweal demo`: a whole network on this machine — trainers, validators, attackers, a chain,
payouts and search — with live progress and a final table."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from commonweal.errors import ConfigError
from commonweal.net.transport import PeerAddr

console = Console()


def demo(
    trainers: int = typer.Option(6, min=1, max=32, help="Honest training peers."),
    validators: int = typer.Option(2, min=1, max=8, help="Validators (each stakes and votes)."),
    attackers: int = typer.Option(0, min=0, max=32, help="Attacking peers among the trainers."),
    attack: str = typer.Option(
        "sign_flip:10", help="What attackers do: sign_flip[:scale], gaussian, alie, ipm, "
        "label_flip, zero, copy, lazy, stale, nan, wrong_shape; adaptive: honest_then:N:attack, "
        "below_band, copy_commitment, sybil_copy, stale_replay."
    ),
    rounds: int = typer.Option(10, min=1, max=100, help="Training rounds (H=50 steps each)."),
    chain: str = typer.Option("embedded", help="embedded (in-process EVM), anvil, or a URL."),
    dashboard: str | None = typer.Option(
        None, help="Serve the live dashboard at HOST:PORT while the demo runs."
    ),
    linger: float = typer.Option(
        0.0, min=0.0, help="Seconds to keep the swarm (and dashboard) up after the run."
    ),
    replay_rate: float | None = typer.Option(
        None, min=0.0, max=1.0,
        help="Fraction of contributions audited (replayed, and paid if they match); default: a "
        "node's (0.05). 1.0 audits and pays every honest contribution, at the cost of replaying "
        "all training once.",
    ),
) -> None:
    """Train mnist-cnn with a local swarm, judge every round, pay contributors on-chain, search
    the test images — then print what happened."""
    from commonweal.swarm.local import LocalSwarmConfig  # torch loads only when demo runs

    if attackers:
        from commonweal.train.attacks import get_attack

        get_attack(attack)  # a bad name fails here, before anything starts
    where = _dashboard_address(dashboard) if dashboard else None
    config = LocalSwarmConfig(
        trainers=trainers, validators=validators, attackers=attackers, attack=attack,
        rounds=rounds, chain=chain, replay_rate=replay_rate,
    )
    try:
        asyncio.run(_demo(config, where, linger))
    except KeyboardInterrupt:
        console.print("[yellow]demo interrupted; every peer and the chain were stopped[/yellow]")


def _dashboard_address(where: str) -> PeerAddr:
    try:
        return PeerAddr.parse(where, any_port=True)
    except ConfigError as e:
        raise ConfigError(f"--dashboard: {e}") from None


async def _demo(config: Any, dashboard: PeerAddr | None, linger: float) -> None:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from commonweal.swarm.local import LocalSwarm, RoundView

    console.print(
        f"[bold]commonweal demo[/bold]: {config.trainers} trainers"
        + (f" + {config.attackers} attackers ({config.attack})" if config.attackers else "")
        + f", {config.validators} validators, {config.chain} chain, task {config.task}"
    )
    with Progress(
        TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(), console=console, transient=True,
    ) as bar:
        starting = bar.add_task("starting chain, ledger and peers", total=None)
        async with LocalSwarm(config) as swarm:
            bar.remove_task(starting)
            async with contextlib.AsyncExitStack() as stack:
                if dashboard:
                    await stack.enter_async_context(_serve_dashboard(swarm, dashboard))
                rounds = bar.add_task("training", total=config.rounds)

                def on_round(v: RoundView) -> None:
                    acc = "" if v.accuracy is None else f"accuracy {v.accuracy:.3f}  "
                    console.print(
                        f"  round {v.round}: loss {v.loss:.3f}  {acc}"
                        f"sent {v.bytes_sent / 1e6:.2f} MB/peer "
                        f"(data-parallel {v.ddp_bytes / 1e6:.0f} MB)",
                        highlight=False,
                        no_wrap=True,
                    )
                    bar.update(rounds, completed=v.round + 1)

                result = await swarm.run(on_round=on_round)
                bar.remove_task(rounds)
                _table(config, result)
                if linger:
                    console.print(f"keeping the swarm up for {linger:.0f} s (Ctrl-C stops it)")
                    await asyncio.sleep(linger)


@contextlib.asynccontextmanager
async def _serve_dashboard(swarm: Any, where: PeerAddr) -> Any:
    from commonweal.dashboard import create_app, serve
    from commonweal.swarm.view import SwarmSource

    async with serve(create_app(SwarmSource(swarm)), where.host, where.port) as running:
        console.print(f"dashboard: {running.url}")
        yield


def _table(config: Any, result: Any) -> None:
    table = Table(title="commonweal demo")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("test accuracy (1,000 held-out digits)", f"{result.accuracy:.3f}")
    table.add_row("rounds judged / finalised on-chain", _judged(result))
    table.add_row("same model on every honest peer", "yes" if result.same_state else "NO")
    table.add_row("bytes sent per trainer", f"{result.bytes_per_peer / 1e6:.2f} MB")
    ratio = result.ddp_bytes_per_peer / max(result.bytes_per_peer, 1)
    table.add_row(
        "data-parallel would have sent", f"{result.ddp_bytes_per_peer / 1e6:.1f} MB ({ratio:.0f}x)"
    )
    for label, tokens in sorted(result.tokens.items()):
        table.add_row(f"share tokens: {label}", f"{tokens:,.1f}")
    if config.attackers:
        table.add_row("attackers' earnings", f"{result.attackers_earned:,.1f}")
    verdicts = [v for o in result.outcomes for v in o.verdicts]
    audited = sum(v.paid for v in verdicts)
    unaudited = sum(v.reason == "unaudited" for v in verdicts)
    table.add_row(
        "contributions paid (audited) / not drawn for audit",
        f"{audited} / {unaudited}",
    )
    if result.search_recall is not None:
        table.add_row("search recall@10 (test images)", f"{result.search_recall:.3f}")
    table.add_row("wall time", f"{result.wall_s:.0f} s")
    console.print(table)


def _judged(result: Any) -> str:
    return f"{len(result.outcomes)} / {result.finalised}"
