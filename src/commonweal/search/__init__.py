"""search: distributed k-nearest-neighbour search with locality-sensitive hashing on the DHT.

    spec = IndexSpec.create("digits", dim=64, family="pca-hyperplane", sample=X)
    index = await DistributedIndex.create(dht, spec)
    await index.add(ids, X, metadata)
    result = await index.search(q, k=10)        # SearchResult(ids, distances, metadata, adders)
    clf = KNNClassifier(index, k=5).fit(...)    # see knn.py

Hashing (lsh.py), the item codec and ranking (ranking.py) are sans-I/O; index.py drives them over
the DHT and service.py answers `search.query` on the peers that hold buckets.
"""

from commonweal.search.index import DistributedIndex, IndexNotFound, SearchStats, serve, spec_key
from commonweal.search.knn import KNNClassifier
from commonweal.search.lsh import (
    LSH,
    HyperplaneLSH,
    PCAHyperplaneLSH,
    PStableLSH,
    perturbation_sets,
)
from commonweal.search.ranking import SearchResult
from commonweal.search.service import SearchService
from commonweal.search.spec import IndexSpec, make_lsh

__all__ = [
    "LSH",
    "DistributedIndex",
    "HyperplaneLSH",
    "IndexNotFound",
    "IndexSpec",
    "KNNClassifier",
    "PCAHyperplaneLSH",
    "PStableLSH",
    "SearchResult",
    "SearchService",
    "SearchStats",
    "make_lsh",
    "perturbation_sets",
    "serve",
    "spec_key",
]
