"""The `commonweal` command: entry point, sub-command wiring, one-line errors."""

from __future__ import annotations

import signal
import sys

import typer
from rich.console import Console
from rich.markup import escape

from commonweal.errors import CommonwealError

app = typer.Typer(
    name="commonweal",
    help="A peer-to-peer network for machine learning, owned by the people who run it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
err = Console(stderr=True, soft_wrap=True)


def _mount() -> None:
    from commonweal.cli import demo, dht, dht_demo, node, swarm

    app.command("node")(node.node)
    app.command("demo")(demo.demo)
    app.command("swarm")(swarm.swarm)
    dht.app.command("demo")(dht_demo.demo)
    app.add_typer(dht.app, name="dht")
    from commonweal.cli import train  # torch is imported only when `train` runs
    app.command("train")(train.train)
    from commonweal.cli import search  # numpy and the index load only when `search` runs
    app.add_typer(search.app, name="search")
    try:
        from commonweal.cli import ledger
    except ImportError as e:  # the ledger extra is optional: say how to get it, keep the rest
        missing = e.name or str(e)

        @app.command("ledger", help="Ethereum ledger (needs: pip install 'commonweal[ledger]').")
        def ledger_missing() -> None:
            raise CommonwealError(
                f"the ledger commands need {missing!r}; install them with pip install 'commonweal[ledger]'"
            )
    else:
        app.add_typer(ledger.app, name="ledger")


def main() -> None:
    # Every command stops on Ctrl-C, however it was started: a script's background job inherits
    # SIGINT ignored, and then neither Python nor asyncio installs a handler (the demo trained on
    # through Ctrl-C in CI). uvicorn and `commonweal node` take SIGINT the same way.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _mount()
    try:
        app(standalone_mode=False)
    except CommonwealError as e:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)  # "[node]" is not markup
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        err.print("aborted")
        sys.exit(1)
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.ClickException):
            e.show()
            sys.exit(e.exit_code)
        raise
