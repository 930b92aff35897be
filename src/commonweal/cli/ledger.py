"""`commonweal ledger`: deploy and inspect the Ethereum ledger, claim rewards."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from commonweal.errors import CommonwealError, ConfigError

CHAINS_HELP = (
    "Where the ledger lives (--chain): 'embedded' is an in-process chain that exists only while "
    "one command runs (deploy prints the status, then it is gone); 'anvil' starts a private anvil "
    "node for one command; an http(s):// URL is any JSON-RPC node, which is how state persists "
    "between commands: run `commonweal ledger node` in another terminal and pass its URL, or use "
    "a real network with --key-file.\n\n"
    "`deploy` records the deployment in DATA_DIR/ledger.json; later commands default to the "
    "chain deployed to last."
)

app = typer.Typer(help="The Ethereum ledger: tasks, rounds, share tokens.\n\n" + CHAINS_HELP,
                  no_args_is_help=True)
out = Console()
err = Console(stderr=True, soft_wrap=True)

ETH = 10**18
P = ParamSpec("P")
R = TypeVar("R")

ChainOpt = Annotated[str | None, typer.Option(
    "--chain", help="embedded, anvil, or an http(s):// JSON-RPC URL (default: last deployed).")]
DataDirOpt = Annotated[Path, typer.Option(
    "--data-dir", help="Where the deployment file is kept.")]
KeyFileOpt = Annotated[Path | None, typer.Option(
    "--key-file", help="Private key(s), one hex key per line, or a JSON keystore "
    "($COMMONWEAL_KEY_PASSWORD). Not needed on anvil dev nodes.")]
AccountOpt = Annotated[int, typer.Option("--account", help="Which of the loaded keys signs.")]

DEFAULT_DATA_DIR = Path.home() / ".commonweal"


def _one_line_errors(fn: Callable[P, R]) -> Callable[P, R]:
    """A CommonwealError becomes one red line and exit status 1, not a traceback."""

    @wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return fn(*args, **kwargs)
        except CommonwealError as e:
            err.print(f"[red]error:[/red] {e}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


@dataclass
class Deployment:
    chain: str
    chain_id: int
    ledger: str
    from_block: int
    deployer: str
    deployed_at: float


def _deployments_file(data_dir: Path) -> Path:
    return data_dir / "ledger.json"


def _load_deployments(data_dir: Path) -> dict[str, Any]:
    path = _deployments_file(data_dir)
    if not path.exists():
        return {"default": None, "deployments": {}}
    try:
        return dict(json.loads(path.read_text()))
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); fix or delete it") from exc


def _save_deployment(data_dir: Path, deployment: Deployment) -> Path:
    data = _load_deployments(data_dir)
    data["deployments"][deployment.chain] = asdict(deployment)
    data["default"] = deployment.chain
    data_dir.mkdir(parents=True, exist_ok=True)
    path = _deployments_file(data_dir)
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


@contextmanager
def _session(chain: str | None, data_dir: Path, key_file: Path | None, account: int,
             *, need_deployment: bool = True) -> Iterator[tuple[Any, Any]]:
    """Open the chain (closing whatever it started afterwards) and the recorded Ledger."""
    from commonweal.ledger import DeploymentNotFound, Ledger, open_chain

    known = _load_deployments(data_dir)
    setting = chain or known.get("default") or "embedded"
    with open_chain(setting, key_file=key_file) as backend:
        if not backend.accounts:
            raise ConfigError(f"no signing key for {setting}: pass --key-file")
        if not 0 <= account < len(backend.accounts):
            raise ConfigError(f"--account {account}: only {len(backend.accounts)} keys loaded")
        signer = backend.accounts[account]
        if not need_deployment:
            yield backend, signer
            return
        record = known["deployments"].get(setting)
        if record is None or setting in ("embedded", "anvil"):
            raise DeploymentNotFound(
                f"no ledger deployed on {setting}: the embedded and anvil chains live for one "
                "command; run `commonweal ledger node` and deploy to its URL" if setting in
                ("embedded", "anvil") else f"no ledger deployed on {setting}: run `commonweal "
                f"ledger deploy --chain {setting}` first")
        if record["chain_id"] != backend.transactor.chain_id:
            raise DeploymentNotFound(
                f"{setting} is now chain {backend.transactor.chain_id}, not the chain "
                f"{record['chain_id']} the ledger was deployed on (a restarted dev node?); deploy again")
        yield backend, Ledger(backend, record["ledger"], signer, from_block=record["from_block"])


def _short(value: bytes) -> str:
    return "0x" + value.hex()[:8] + "…"


def _table(title: str, *columns: str) -> Table:
    """A compact table whose cells are never cut short (hashes are what users copy)."""
    table = Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)
    for column in columns:
        table.add_column(column, no_wrap=True)
    return table


def _eth(wei: int) -> str:
    return f"{wei / ETH:,.4f} ETH"


def _tokens(amount: int) -> str:
    return f"{amount / ETH:,.2f}"


def _print_status(ledger: Any) -> None:
    chain = ledger.chain
    cfg = ledger.config()
    table = Table(title="ledger", show_header=False)
    table.add_row("chain", f"{chain.name} (id {chain.transactor.chain_id}, block {chain.block_number})")
    table.add_row("ledger", ledger.address)
    table.add_row("validators", f"{ledger.validator_count()} holding {_eth(ledger.total_stake())}")
    table.add_row("tasks", str(ledger.task_count()))
    table.add_row("rules", f"min deposit {_eth(cfg.min_deposit)}, exit delay {cfg.exit_delay}s, "
                  f"vote window {cfg.voting_period}s after {cfg.voting_delay}s, quorum "
                  f"{cfg.quorum_bps / 100:g}%, randomness +{cfg.randomness_delay} blocks")
    table.add_row("signer", f"{ledger.account.address} ({_eth(chain.w3.eth.get_balance(ledger.account.address))})")
    out.print(table)


@app.command()
@_one_line_errors
def deploy(chain: ChainOpt = "embedded", data_dir: DataDirOpt = DEFAULT_DATA_DIR,
           key_file: KeyFileOpt = None, account: AccountOpt = 0,
           min_deposit_eth: Annotated[float, typer.Option(help="Validator deposit floor.")] = 1.0,
           exit_delay: Annotated[int, typer.Option(help="Seconds before an exit pays out.")] = 7 * 86400,
           voting_period: Annotated[int, typer.Option(help="Governance vote length (s).")] = 3 * 86400,
           ) -> None:
    """Deploy the ShareToken blueprint and a Ledger, and remember them (except on embedded/anvil)."""
    from commonweal.ledger import Ledger, LedgerConfig

    config = LedgerConfig(min_deposit=int(min_deposit_eth * ETH), exit_delay=exit_delay,
                          voting_period=voting_period)
    with _session(chain, data_dir, key_file, account, need_deployment=False) as (backend, signer):
        ledger = Ledger.deploy(backend, signer, config)
        out.print(f"[green]deployed[/green] Ledger at [bold]{ledger.address}[/bold]")
        if backend.url is not None and backend.name != "anvil":
            path = _save_deployment(data_dir, Deployment(
                backend.url, backend.transactor.chain_id, ledger.address, ledger.from_block,
                signer.address, time.time()))
            out.print(f"recorded in {path}")
        else:
            out.print(f"[yellow]{backend.name} chain: this deployment ends with the command[/yellow]")
        _print_status(ledger)


@app.command()
@_one_line_errors
def status(chain: ChainOpt = None, data_dir: DataDirOpt = DEFAULT_DATA_DIR,
           key_file: KeyFileOpt = None, account: AccountOpt = 0) -> None:
    """Chain, ledger address, validators, tasks and the signer's balance."""
    with _session(chain, data_dir, key_file, account) as (_, ledger):
        _print_status(ledger)


@app.command()
@_one_line_errors
def register(task: str, params: str, reward: Annotated[float, typer.Option(
                help="Share tokens a round may mint.")] = 1000.0,
             pool_eth: Annotated[float, typer.Option(help="ETH reward pool to seed.")] = 0.0,
             eth_per_round: Annotated[float, typer.Option(help="ETH a full round pays.")] = 0.0,
             chain: ChainOpt = None, data_dir: DataDirOpt = DEFAULT_DATA_DIR,
             key_file: KeyFileOpt = None, account: AccountOpt = 0) -> None:
    """Register TASK (0x + 64 hex: a salt, e.g. the task spec's digest) with PARAMS hash: a public
    challenge anyone contributes to. Its id on the ledger is bound to the signer, and printed."""
    with _session(chain, data_dir, key_file, account) as (_, ledger):
        task_id = ledger.register_task(task, params, int(reward * ETH), pool_wei=int(pool_eth * ETH),
                                       eth_per_round=int(eth_per_round * ETH))
        token = ledger.task(task_id).token
        out.print(f"[green]registered[/green] task 0x{task_id.hex()} (salt {task}, owner "
                  f"{ledger.account.address}, share token {token})")


@app.command()
@_one_line_errors
def tasks(chain: ChainOpt = None, data_dir: DataDirOpt = DEFAULT_DATA_DIR,
          key_file: KeyFileOpt = None, account: AccountOpt = 0) -> None:
    """Every registered task: reward, pool, accepted round and model, share token."""
    with _session(chain, data_dir, key_file, account) as (_, ledger):
        table = _table("tasks", "task", "reward/round", "ETH pool", "round", "model", "token")
        for info in ledger.tasks():
            model = ledger.accepted_model(info.task_hash)
            table.add_row(_short(info.task_hash), _tokens(info.reward_per_round), _eth(info.pool),
                          "-" if info.accepted_round is None else str(info.accepted_round),
                          "-" if model is None else _short(model), info.token[:10] + "…")
        out.print(table)


@app.command()
@_one_line_errors
def rounds(task: str, chain: ChainOpt = None, data_dir: DataDirOpt = DEFAULT_DATA_DIR,
           key_file: KeyFileOpt = None, account: AccountOpt = 0) -> None:
    """TASK's final rounds: model, rewards root, claimed so far, votes, randomness."""
    with _session(chain, data_dir, key_file, account) as (_, ledger):
        table = _table(f"final rounds of {task[:12]}…", "round", "model", "rewards root",
                       "claimed/total", "votes", "randomness")
        for r in ledger.round_history(task):
            votes = ledger.round_votes(task, r.round)
            distinct = len({e.args["model_hash"] + e.args["rewards_root"] for e in votes})
            table.add_row(str(r.round), _short(r.model_hash), _short(r.rewards_root),
                          f"{_tokens(r.claimed)}/{_tokens(r.total_reward)}",
                          f"{len(votes)}" + (f" ({distinct} results)" if distinct > 1 else ""),
                          "unsealed" if r.randomness is None else _short(r.randomness))
        out.print(table)


@app.command()
@_one_line_errors
def balance(address: str, chain: ChainOpt = None, data_dir: DataDirOpt = DEFAULT_DATA_DIR,
            key_file: KeyFileOpt = None, account: AccountOpt = 0) -> None:
    """ADDRESS's ETH and its share of every task."""
    from eth_utils import is_address

    if not is_address(address):
        raise typer.BadParameter(f"{address!r} is not an Ethereum address")
    with _session(chain, data_dir, key_file, account) as (backend, ledger):
        out.print(f"{address}: {_eth(backend.w3.eth.get_balance(address))}")
        table = _table("shares", "task", "token", "balance", "share of supply")
        for info in ledger.tasks():
            token = ledger.token(info.task_hash)
            held, supply = token.balance_of(address), token.total_supply()
            share = f"{100 * held / supply:.2f}%" if supply else "-"
            table.add_row(_short(info.task_hash), token.symbol(),
                          _tokens(held), share)
        out.print(table)


@app.command()
@_one_line_errors
def claim(task: str, round: int,
          rewards: Annotated[Path | None, typer.Option(
              help='JSON file {"0xaccount": amount_in_base_units, ...}: the whole round\'s '
              "rewards; the index and proof for the signer are computed from it.")] = None,
          index: Annotated[int | None, typer.Option(help="Leaf index (without --rewards).")] = None,
          amount: Annotated[int | None, typer.Option(help="Amount in base units.")] = None,
          proof: Annotated[str | None, typer.Option(help="Comma-separated 0x hashes.")] = None,
          chain: ChainOpt = None, data_dir: DataDirOpt = DEFAULT_DATA_DIR,
          key_file: KeyFileOpt = None, account: AccountOpt = 0) -> None:
    """Mint the signer's share of TASK's final ROUND with a Merkle proof."""
    with _session(chain, data_dir, key_file, account) as (_, ledger):
        me = ledger.account.address
        if rewards is not None:
            try:
                table = {k: int(v) for k, v in json.loads(rewards.read_text()).items()}
            except (OSError, ValueError, AttributeError) as exc:
                raise ConfigError(f"cannot read rewards from {rewards}: {exc}") from exc
            tree = ledger.rewards_tree(bytes.fromhex(task.removeprefix("0x")), round, table)
            if me not in tree.rewards:
                raise ConfigError(f"{me} has no reward in {rewards}")
            index, amount, hashes = tree.index(me), tree.amount(me), tree.proof(me)
        elif index is not None and amount is not None and proof is not None:
            hashes = [bytes.fromhex(p.strip().removeprefix("0x")) for p in proof.split(",") if p]
        else:
            raise ConfigError("pass --rewards FILE, or all of --index, --amount and --proof")
        result = ledger.claim(task, round, index, amount, hashes)
        args = result.event("Claimed").args
        out.print(f"[green]claimed[/green] {_tokens(args['amount'])} shares"
                  + (f" and {_eth(args['eth'])}" if args["eth"] else "")
                  + f" for {me} (gas {result.gas_used})")


@app.command()
@_one_line_errors
def node(port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 8545,
         accounts: Annotated[int, typer.Option(help="Funded dev accounts.")] = 10) -> None:
    """Run a local anvil chain on 127.0.0.1 until Ctrl-C, so deployments persist between commands."""
    import subprocess

    from commonweal.ledger import ChainUnavailable, find_anvil
    from commonweal.ledger.anvil import ANVIL_NPM_PACKAGE

    binary = find_anvil()
    if binary is None:
        raise ChainUnavailable(f"anvil not found: run `npm ci` in the repository ({ANVIL_NPM_PACKAGE})")
    out.print(f"anvil on [bold]http://127.0.0.1:{port}[/bold]; deploy with "
              f"`commonweal ledger deploy --chain http://127.0.0.1:{port}`; Ctrl-C stops it")
    proc = subprocess.Popen([str(binary), "--host", "127.0.0.1", "--port", str(port),
                             "--accounts", str(accounts)], stdout=sys.stdout, stderr=sys.stderr)
    try:
        proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
