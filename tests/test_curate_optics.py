"""udfs/curate/optics.py against scikit-learn's OPTICS on the same difference matrices: the
graph (ordering, core distances, reachability, predecessors) and the labels must be equal."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from sklearn.cluster import OPTICS, compute_optics_graph

from udfs.curate.ccip_cluster import ClusterSettings, Differences, cluster_matrix
from udfs.curate.optics import optics_graph, optics_labels


def identities(seed: int, n: int, people: int, spread: float, copies: int = 0) -> np.ndarray:
    """CCIP-like vectors: `people` identities, `spread` apart within one; the first `copies`
    rows repeat the next ones exactly (ties everywhere: differences of 0)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(people, 768))
    vectors = centres[rng.integers(0, people, n)] + spread * rng.normal(size=(n, 768))
    vectors[:copies] = vectors[copies : 2 * copies]
    return vectors.astype(np.float32)


CASES = {  # name: (vectors, min_samples, max_eps)
    "identities": (identities(0, 300, 8, 0.8), 5, 0.5),
    "identities_with_copies": (identities(1, 400, 12, 0.9, copies=60), 5, 0.5),
    "dbscan_like_parameters": (identities(2, 300, 10, 0.5), 2, 0.17),
    "all_the_same": (identities(3, 120, 1, 0.0), 5, 0.5),
    "eps_equal_to_the_differences": (identities(3, 120, 1, 0.0), 5, 0.0),  # a neighbour is d <= eps
    "all_noise": (identities(4, 200, 4, 3.0), 5, 0.5),
    "eps_below_every_difference": (identities(5, 150, 5, 1.0), 5, 0.01),
    "min_samples_large": (identities(6, 250, 4, 0.8), 40, 0.5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_graph_and_labels_equal_sklearn(case: str) -> None:
    vectors, min_samples, max_eps = CASES[case]
    diff = Differences()(vectors)
    expected = compute_optics_graph(diff, min_samples=min_samples, max_eps=max_eps, metric="precomputed", p=2,
                                    metric_params=None, algorithm="auto", leaf_size=30, n_jobs=None)
    for name, ours, theirs in zip(("ordering", "core", "reachability", "predecessor"),
                                  optics_graph(diff, min_samples, max_eps), expected, strict=True):
        np.testing.assert_array_equal(ours, theirs, err_msg=name)
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.simplefilter("ignore", UserWarning)  # all-noise cases: "All reachability values are inf"
        labels = OPTICS(max_eps=max_eps, min_samples=min_samples, metric="precomputed").fit(diff).labels_
        np.testing.assert_array_equal(optics_labels(diff, min_samples, max_eps), labels)


def test_cluster_matrix_finds_the_identities() -> None:
    """Through cluster_matrix (curate's entry point): the identities come out as clusters."""
    vectors = identities(7, 200, 4, 0.3)
    labels = cluster_matrix(Differences()(vectors), ClusterSettings())
    assert labels.max() + 1 == 4 and (labels >= 0).all()
