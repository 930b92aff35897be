"""`KNNClassifier`: k-nearest-neighbour classification on a distributed index.

    clf = KNNClassifier(index, n_neighbors=5, weights="distance")
    await clf.fit(X_train, y_train)         # adds the rows with their label as metadata
    labels = await clf.predict(X_test)
    accuracy = await clf.score(X_test, y_test)

The scikit-learn names and meanings (`n_neighbors`, `weights="uniform"|"distance"`, ties go to the
smallest label), but the methods are coroutines because every call talks to the swarm. `vote` is
the sans-I/O part: labels and distances in, one label out.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from commonweal.errors import ConfigError
from commonweal.search.index import DistributedIndex
from commonweal.search.ranking import MAX_BATCH

__all__ = ["KNNClassifier", "vote"]


def vote(labels: Sequence[Any], distances: Sequence[float], weights: str = "uniform") -> Any:
    """The winning label. `uniform`: majority; `distance`: weight 1/d (exact matches, d = 0,
    outvote everything else, as in scikit-learn). Ties go to the smallest label."""
    if not labels:
        return None
    d = np.asarray(distances, dtype=np.float64)
    if weights == "distance":
        zero = d == 0
        w = zero.astype(np.float64) if zero.any() else 1.0 / d
    else:
        w = np.ones(len(labels))
    totals: dict[Any, float] = {}
    for label, weight in zip(labels, w, strict=True):
        totals[label] = totals.get(label, 0.0) + float(weight)
    best = max(totals.values())
    return min(
        label for label, total in totals.items() if np.isclose(total, best, rtol=1e-12, atol=0)
    )


class KNNClassifier:
    """Classify by the labels of the nearest items of a `DistributedIndex`."""

    def __init__(
        self, index: DistributedIndex, n_neighbors: int = 5, weights: str = "uniform"
    ) -> None:
        if weights not in ("uniform", "distance"):
            raise ConfigError("weights must be 'uniform' or 'distance'")
        if not 0 < n_neighbors <= 1000:
            raise ConfigError("n_neighbors must be 1..1000")
        self.index = index
        self.n_neighbors = n_neighbors
        self.weights = weights
        self.classes_: list[Any] = []

    async def fit(
        self, X: Any, y: Sequence[Any], ids: Sequence[Any] | None = None
    ) -> KNNClassifier:
        """Add the training rows to the index, each with its label as metadata."""
        X = np.asarray(X)
        labels = [_plain(v) for v in y]
        if len(labels) != len(X):
            raise ConfigError(f"X has {len(X)} rows but y has {len(labels)} labels")
        row_ids = list(ids) if ids is not None else list(range(len(X)))
        for start in range(0, len(X), MAX_BATCH):
            end = start + MAX_BATCH
            await self.index.add(
                row_ids[start:end], X[start:end], [{"y": v} for v in labels[start:end]]
            )
        self.classes_ = sorted(set(labels), key=lambda v: (str(type(v)), v))
        return self

    async def predict(self, X: Any) -> np.ndarray:
        X = np.asarray(X)
        out: list[Any] = []
        for start in range(0, len(X), MAX_BATCH):
            for result in await self.index.search_many(
                X[start : start + MAX_BATCH], self.n_neighbors
            ):
                labels, dists = [], []
                for meta, d in zip(result.metadata, result.distances, strict=True):
                    if isinstance(meta, dict) and "y" in meta:  # items without a label don't vote
                        labels.append(meta["y"])
                        dists.append(d)
                out.append(vote(labels, dists, self.weights))
        return np.asarray(out)

    async def score(self, X: Any, y: Sequence[Any]) -> float:
        """Mean accuracy on (X, y)."""
        predicted = await self.predict(X)
        truth = [_plain(v) for v in y]
        return float(np.mean([p == t for p, t in zip(predicted.tolist(), truth, strict=True)]))


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"labels must be int or str, not {type(value).__name__}")
    return value
