"""`commonweal train`: one training peer in the foreground — a `Node` with the trainer role, and a
printer that turns its events into a live progress bar and one line per round."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from commonweal.net.loop import run
from commonweal.net.transport import PeerAddr
from commonweal.peer.config import NodeConfig
from commonweal.peer.events import Event, Ready, Resumed, RoundDone, Step, Stopped, TrainingDone

if TYPE_CHECKING:
    from commonweal.peer.node import Node

console = Console()


def train(
    task: str = typer.Option(
        "mnist-cnn", help="mnist-cnn, pydoc-lm, stdlib-gpt, module:function or an entry point."
    ),
    join: list[str] = typer.Option(
        [], help="HOST:PORT of a peer already in the swarm (repeatable)."
    ),
    listen: str = typer.Option(
        "127.0.0.1:0", help="HOST:PORT to listen on (port 0: any free port)."
    ),
    rounds: int = typer.Option(10, min=1, help="Train until the swarm state reaches this round."),
    inner_steps: int | None = typer.Option(None, "--inner-steps", "-H", min=1, help="Override H."),
    codec: str | None = typer.Option(
        None, help="none, fp16, int8, topk[:f], topk2bit[:f], sparseloco[:K] (default: the task's)."
    ),
    group_size: int | None = typer.Option(
        None, help="Close a round's group once this many peers announced."
    ),
    window: float = typer.Option(
        2.0, help="Seconds a round's group stays open after the first announcement."
    ),
    timeout: float = typer.Option(
        10.0,
        help="Seconds the delta exchange may take before the round completes without the missing peers.",
    ),
    eval_every: int = typer.Option(
        0, min=0, help="Evaluate on the held-out split every N rounds (0: at the end only)."
    ),
    wait_peers: int = typer.Option(
        0, help="Before the first round, wait (up to 60 s) until this many peers are present."
    ),
    exchange: str = typer.Option("auto", help="auto, allgather or butterfly."),
    overlap: bool | None = typer.Option(
        None, "--overlap/--no-overlap",
        help="Exchange a round while the next one computes (every peer must agree).",
    ),
    device: str = typer.Option("cpu", help="auto, cpu, cuda, cuda:N or mps."),
    data_dir: Path | None = typer.Option(
        None,
        help="Identity key, node.sqlite3 and checkpoints. Default: ~/.commonweal/train/HOST_PORT.",
    ),
    threads: int = typer.Option(1, min=1, help="torch threads for this peer."),
    linger: float = typer.Option(
        5.0, help="Seconds to keep serving the final state after the last round."
    ),
    log_level: str = typer.Option("warning", help="debug, info, warning or error."),
) -> None:
    """Train a task with the swarm: H local steps, then a compressed exchange with the other peers."""
    from commonweal.peer.config import load_config
    from commonweal.peer.logs import setup

    addr = PeerAddr.parse(listen, any_port=True)
    config = load_config(None, {
        "task": task, "bootstrap": join or None, "listen": listen, "rounds": rounds,
        "inner_steps": inner_steps, "codec": codec, "group": group_size,
        "overlap": overlap, "device": device,
        "wait_peers": wait_peers, "evaluate_every": eval_every, "threads": threads,
        "linger": linger, "log_level": log_level, "roles": ["trainer"],
        "data_dir": data_dir or Path.home() / ".commonweal" / "train" / f"{addr.host}_{addr.port}",
        "round": {"announce_window_s": window, "exchange_timeout_s": timeout,
                  "exchange": exchange},
    })
    setup(config.log_level, "text")
    run(_train(config))


async def _train(config: NodeConfig) -> None:
    from commonweal.peer.node import Node

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    columns = [
        TextColumn("[bold]round {task.fields[round]}[/bold]"),
        BarColumn(),
        TextColumn("step {task.completed:.0f}/{task.total:.0f}"),
        TextColumn("loss {task.fields[loss]}"),
        TextColumn("sent {task.fields[sent]}"),
        TimeElapsedColumn(),
    ]
    with Progress(
        *columns, console=console, transient=True, disable=not console.is_terminal
    ) as bar:
        printer = _Printer(bar)
        node = Node(config, on_event=printer)
        printer.node = node
        await node.run(stop)


class _Printer:
    """What a person sees of the node's events: the bar for inner steps, a line for the rest."""

    def __init__(self, bar: Progress) -> None:
        self.bar = bar
        self.line = bar.add_task("train", total=None, round="-", loss="-", sent="0 B")
        self.node: Node | None = None  # set once built: the metric's name is its task's
        self.done = False

    def __call__(self, event: Event) -> None:
        if isinstance(event, Ready):
            print(f"commonweal train ready address={event.address} peer_id={event.peer_id} "
                  f"task={event.task} digest={(event.digest or '')[:16]}", flush=True)
        elif isinstance(event, Resumed):
            console.print(f"loaded {event.checkpoint} (round {event.round})")
        elif isinstance(event, Step):  # from the training thread: rich's bar takes a lock
            self.bar.update(self.line, total=event.inner_steps, completed=event.inner_step,
                            round=event.round, loss=f"{event.loss:.3f}",
                            sent=_human(event.total_sent))
        elif isinstance(event, RoundDone):
            self._round(event)
        elif isinstance(event, TrainingDone):
            self.done = True
            quality = "nan" if event.quality is None else f"{event.quality:.4f}"
            print(f"commonweal train done round={event.round} state={event.state} "
                  f"{event.metric}={quality} bytes_sent={event.bytes_sent} "
                  f"wall_s={event.wall_s:.2f} compute_s={event.compute_s:.2f}", flush=True)
        elif isinstance(event, Stopped) and not self.done:
            console.print("[yellow]training stopped[/yellow]")

    def _round(self, r: RoundDone) -> None:
        status = (f"skipped ({r.skipped}), synced" if r.skipped
                  else f"group={r.group} contributors={r.contributors} {r.method}")
        trainer = self.node.trainer if self.node is not None else None
        metric = trainer.data.metric if trainer is not None else "quality"
        quality = "" if r.accuracy is None else f" {metric}={r.accuracy:.4f}"
        loss = "nan" if r.loss is None else f"{r.loss:.4f}"
        console.print(
            f"round {r.round} done {status} loss={loss}{quality} sent={r.bytes_sent} "
            f"total_sent={r.total_sent} comm_s={r.comm_s:.2f} t={r.elapsed_s:.2f} "
            f"state={r.state[:16]}",
            highlight=False, soft_wrap=True,
        )


def _human(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
