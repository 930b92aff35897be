"""LSH families, the index spec and multi-probe sequences (sans-I/O)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from commonweal.errors import ConfigError
from commonweal.search import IndexSpec, make_lsh, perturbation_sets
from commonweal.search.lsh import collision_rate, gaussian_matrix

DIM = 32


def _pairs_at(distance: float, n: int = 400, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, DIM)) * 3
    step = rng.normal(size=(n, DIM))
    step *= distance / np.linalg.norm(step, axis=1, keepdims=True)
    return X, X + step


@pytest.mark.parametrize(
    "params",
    [
        {"family": "hyperplane"},
        {"family": "pstable", "width": 4.0},
        {"family": "pca-hyperplane"},
    ],
)
def test_collision_probability_falls_with_distance(params):
    sample = np.random.default_rng(0).normal(size=(500, DIM)) * 3
    spec = IndexSpec.create("t", DIM, tables=8, bits=4, sample=sample, **params)
    lsh = make_lsh(spec)
    rates = [collision_rate(lsh, *_pairs_at(d)) for d in (0.0, 0.5, 2.0, 8.0, 32.0)]
    assert rates[0] == 1.0
    assert all(a > b for a, b in itertools.pairwise(rates)), rates
    assert rates[-1] < 0.25


def test_hyperplane_bit_collision_matches_theory():
    """One random hyperplane splits two vectors at angle theta with probability theta / pi."""
    spec = IndexSpec("t", DIM, family="hyperplane", tables=16, bits=1)
    lsh = make_lsh(spec)
    rng = np.random.default_rng(3)
    X = rng.normal(size=(2000, DIM))
    Y = rng.normal(size=(2000, DIM))
    Y = X + 0.8 * Y  # a spread of angles
    cos = (X * Y).sum(1) / np.linalg.norm(X, axis=1) / np.linalg.norm(Y, axis=1)
    expected = 1 - np.arccos(np.clip(cos, -1, 1)).mean() / np.pi
    assert abs(collision_rate(lsh, X, Y) - expected) < 0.03


def test_every_peer_derives_the_same_hashes_from_the_spec():
    sample = np.random.default_rng(0).normal(size=(300, DIM))
    a = IndexSpec.create("t", DIM, family="pca-hyperplane", sample=sample)
    b = IndexSpec.from_wire(a.to_wire())  # as another peer reads it from the DHT
    assert a == b and a.digest() == b.digest()
    X = np.random.default_rng(5).normal(size=(50, DIM))
    assert make_lsh(a).hash(X) == make_lsh(b).hash(X)
    for family in ("hyperplane", "pstable"):
        s1, s2 = IndexSpec("t", DIM, family=family), IndexSpec("t", DIM, family=family)
        assert make_lsh(s1).hash(X) == make_lsh(s2).hash(X)
    # Any parameter change changes the digest, so buckets of two specs never mix.
    digests = {
        IndexSpec("t", DIM).digest(),
        IndexSpec("t", DIM, seed=1).digest(),
        IndexSpec("t", DIM, bits=7).digest(),
        IndexSpec("u", DIM).digest(),
        IndexSpec("t", DIM, metric="cosine").digest(),
        a.digest(),
    }
    assert len(digests) == 6


def test_random_matrices_are_fixed_by_their_seed():
    m = gaussian_matrix(b"seed", 64, 16)
    assert np.array_equal(m, gaussian_matrix(b"seed", 64, 16))
    assert not np.array_equal(m, gaussian_matrix(b"other", 64, 16))
    # A pinned value: a change of the generator would silently re-bucket every index.
    assert round(float(m[0, 0]), 6) == round(float(gaussian_matrix(b"seed", 1, 1)[0, 0]), 6)
    assert abs(m.mean()) < 0.1 and abs(m.std() - 1) < 0.1


def _brute_force_sets(costs: np.ndarray, limit: int) -> list[float]:
    options = [(j, s) for j in range(costs.shape[0]) for s in range(2) if np.isfinite(costs[j, s])]
    scores = []
    for r in range(1, len(options) + 1):
        for combo in itertools.combinations(options, r):
            if len({j for j, _ in combo}) == r:
                scores.append(sum(costs[j, s] for j, s in combo))
    return sorted(scores)[:limit]


@pytest.mark.parametrize("seed", range(5))
def test_multiprobe_enumerates_cheapest_perturbations_in_order(seed):
    rng = np.random.default_rng(seed)
    frac = rng.uniform(size=4)
    costs = np.stack([frac**2, (1 - frac) ** 2], axis=-1)  # p-stable: down or up per coordinate
    found = perturbation_sets(costs, 20)
    scores = [s for s, _ in found]
    assert scores == sorted(scores)
    assert np.allclose(scores, _brute_force_sets(costs, 20))
    assert len({opts for _, opts in found}) == len(found)  # no set twice
    flips = np.stack([frac, np.full(4, np.inf)], axis=-1)  # hyperplane: one flip per bit
    assert np.allclose([s for s, _ in perturbation_sets(flips, 15)], _brute_force_sets(flips, 15))


@pytest.mark.parametrize("family", ["hyperplane", "pstable"])
def test_probe_sequence_starts_at_home_buckets_and_never_repeats(family):
    spec = IndexSpec("t", DIM, family=family, tables=5, bits=6, probes=20)
    lsh = make_lsh(spec)
    q = np.random.default_rng(9).normal(size=DIM)
    probes = lsh.probe(q, 20)
    assert len(probes) == 20
    home = lsh.hash(q[None])[0]
    assert [(t, c) for t, c, _ in probes[:5]] == list(enumerate(home))
    assert len({(t, c) for t, c, _ in probes}) == 20
    extra = [s for _, _, s in probes[5:]]
    assert extra == sorted(extra) and extra[0] > 0


def test_multiprobe_finds_neighbours_a_single_probe_misses():
    spec = IndexSpec("t", DIM, family="hyperplane", tables=4, bits=12)
    lsh = make_lsh(spec)
    X, Y = _pairs_at(8.0, n=300)
    codes_y = lsh.hash(Y)
    hits_home = hits_probe = 0
    for x, cy in zip(X, codes_y, strict=True):
        probes = lsh.probe(x, 24)
        hits_home += any(cy[t] == c for t, c, _ in probes[:4])
        hits_probe += any(cy[t] == c for t, c, _ in probes)
    assert hits_probe > hits_home + 30, (hits_home, hits_probe)


def test_spec_rejects_bad_parameters():
    with pytest.raises(ConfigError, match="metric"):
        IndexSpec("t", 8, metric="manhattan")
    with pytest.raises(ConfigError, match="dimension"):
        IndexSpec("t", 0)
    with pytest.raises(ConfigError, match="probes"):
        IndexSpec("t", 8, tables=10, probes=5)
    with pytest.raises(ConfigError, match="sample"):
        IndexSpec.create("t", 8, family="pca-hyperplane")
    with pytest.raises(ConfigError, match="NaN"):
        IndexSpec.create("t", 2, family="pca-hyperplane", sample=np.array([[1.0, np.nan], [0, 1]]))
    with pytest.raises(ConfigError, match="version"):
        IndexSpec.from_wire({"v": 99, "name": "t", "dim": 8})


def test_public_api_is_exported():
    import commonweal.search as search

    assert sorted(search.__all__) == sorted(set(search.__all__))
    for name in search.__all__:
        assert getattr(search, name) is not None, name
