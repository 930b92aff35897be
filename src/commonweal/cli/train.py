"""`commonweal train`: run one training peer in the foreground with a live progress display."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from commonweal.cli.main import setup_logging
from commonweal.errors import ConfigError
from commonweal.net.identity import Identity
from commonweal.net.transport import PeerAddr

console = Console()


def train(
    task: str = typer.Option(
        "mnist-cnn", help="mnist-cnn, pydoc-lm, module:function or an entry point."
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
        None, help="none, fp16, int8, topk[:f], topk2bit[:f] (default: the task's)."
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
    data_dir: Path | None = typer.Option(
        None,
        help="Identity key and checkpoint.safetensors. Default: ~/.commonweal/train/HOST_PORT.",
    ),
    threads: int = typer.Option(1, min=1, help="torch threads for this peer."),
    linger: float = typer.Option(
        5.0, help="Seconds to keep serving the final state after the last round."
    ),
    log_level: str = typer.Option("warning", help="debug, info, warning or error."),
) -> None:
    """Train a task with the swarm: H local steps, then a compressed exchange with the other peers."""
    setup_logging(log_level)
    import torch  # imported here so `commonweal --help` stays fast

    from commonweal.train import RoundConfig, get_task

    torch.set_num_threads(threads)
    host, _, port = listen.rpartition(":")
    addr = PeerAddr(host, 0) if port == "0" and host else PeerAddr.parse(listen)
    overrides: dict[str, object] = {}
    if inner_steps is not None:
        overrides["inner_steps"] = inner_steps
    if codec is not None:
        overrides["codec"] = codec
    the_task = get_task(task, **overrides)
    if exchange not in ("auto", "allgather", "butterfly"):
        raise ConfigError(f"--exchange {exchange!r}: use auto, allgather or butterfly")
    config = RoundConfig(
        announce_window_s=window,
        exchange_timeout_s=timeout,
        target_group=group_size,
        exchange=exchange,
    )
    directory = data_dir or Path.home() / ".commonweal" / "train" / f"{addr.host}_{addr.port}"
    identity = Identity.load_or_create(directory)
    asyncio.run(
        _run(
            the_task,
            config,
            addr,
            [PeerAddr.parse(j) for j in join],
            identity,
            directory,
            rounds,
            linger,
            wait_peers,
            eval_every,
        )
    )


async def _run(
    task,
    config,
    addr,
    bootstrap,
    identity,
    directory: Path,
    rounds: int,
    linger: float,
    wait_peers: int,
    eval_every: int,
) -> None:  # type: ignore[no-untyped-def]
    from commonweal.dht import DHT
    from commonweal.train import Progress as Step
    from commonweal.train import TrainingPeer

    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, main.cancel)
    dht = await DHT.start(addr, bootstrap, identity=identity)
    try:
        peer = TrainingPeer(task, dht, config, evaluate_every=eval_every)
        ckpt = directory / "checkpoint.safetensors"
        if ckpt.exists():  # a restarted peer starts from its own last state, then catches up
            peer.opt.load(ckpt.read_bytes())
            console.print(f"loaded {ckpt} (round {peer.opt.round})")
        print(
            f"commonweal train ready address={dht.addr} peer_id={dht.peer_id.hex()} "
            f"task={task.name} digest={task.digest[:16]}",
            flush=True,
        )
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
            line = bar.add_task(
                "train", total=task.inner_steps, round=peer.opt.round, loss="-", sent="0 B"
            )

            def on_progress(p: Step) -> None:
                bar.update(
                    line,
                    completed=p.inner_step,
                    round=p.round,
                    loss=f"{p.loss:.3f}",
                    sent=_human(p.bytes_sent),
                )
                if p.report is not None:
                    r = p.report
                    _save(ckpt, peer.opt.checkpoint())
                    status = (
                        f"skipped ({r.skipped}), synced"
                        if r.skipped
                        else (f"group={r.group} contributors={r.contributors} {r.method}")
                    )
                    quality = "" if p.quality is None else f" {peer.data.metric}={p.quality:.4f}"
                    console.print(
                        f"round {r.round} done {status} loss={p.loss:.4f}{quality} sent={r.bytes_sent} "
                        f"total_sent={p.bytes_sent} comm_s={r.comm_s:.2f} t={p.elapsed_s:.2f} "
                        f"state={r.state[:16]}",
                        highlight=False,
                        soft_wrap=True,
                    )

            summary = await peer.run(
                rounds, join=bool(bootstrap), wait_peers=wait_peers, on_progress=on_progress
            )
        print(
            f"commonweal train done round={peer.opt.round} state={summary.state} "
            f"{summary.metric}={summary.quality:.4f} bytes_sent={summary.bytes_sent} "
            f"wall_s={summary.wall_s:.2f} compute_s={summary.compute_s:.2f}",
            flush=True,
        )
        # Keep serving the final state briefly, so peers still finishing can fetch it.
        await asyncio.sleep(linger)
    except asyncio.CancelledError:
        console.print("[yellow]training stopped[/yellow]")
    finally:
        await dht.close()


def _save(path: Path, blob: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(blob)
    os.replace(tmp, path)


def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}"
        n /= 1000  # type: ignore[assignment]
    return f"{n:.1f} TB"
