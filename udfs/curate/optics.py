"""OPTICS on a precomputed difference matrix: scikit-learn's result, without its per-point query.

sklearn's compute_optics_graph visits the points one at a time and, for each, asks a
NearestNeighbors for the neighbours within max_eps (radius_neighbors: input checks and a
chunked pairwise pass per call, about 0.3 ms). That query is the clustering step's cost: a
crop costs 0.3-0.4 ms whatever the cell size. With the difference matrix in memory it is one
compare of the point's row. This module runs sklearn's loop on the rows: the same visiting
order and tie rule, the same rounding of the distances. It then hands the graph to sklearn's
own cluster_optics_xi with OPTICS's own parameters, as OPTICS.fit does. The labels equal those
of OPTICS(metric="precomputed"); tests/test_curate_optics.py checks the graph and the labels
against sklearn.
"""

from __future__ import annotations

import numpy as np

# np.around(..., decimals=np.finfo(float64).precision), as sklearn rounds reachability distances
DECIMALS = np.finfo(np.float64).precision


def optics_graph(diff: np.ndarray, min_samples: int, max_eps: float) -> tuple[np.ndarray, ...]:
    """(ordering, core distances, reachability, predecessor) of sklearn.cluster.compute_optics_graph
    for a float64 difference matrix (metric "precomputed"), 2 <= min_samples <= len(diff)."""
    n = len(diff)
    # sklearn: the min_samples-th nearest, the point itself included (kneighbors of the matrix);
    # copied out, so that the partitioned copy of the matrix is freed before the loop
    core = np.partition(diff, min_samples - 1, axis=1)[:, min_samples - 1].copy()
    core[core > max_eps] = np.inf
    np.around(core, decimals=DECIMALS, out=core)
    reachability = np.full(n, np.inf)
    predecessor = np.full(n, -1, dtype=np.int64)
    processed = np.zeros(n, dtype=bool)
    ordering = np.zeros(n, dtype=np.int64)
    # the reachability of the points not yet processed (inf once processed): one argmin picks
    # the next point, where sklearn gathers the unprocessed indices first
    open_reachability = np.full(n, np.inf)
    for position in range(n):
        point = int(open_reachability.argmin())
        if open_reachability[point] == np.inf:  # sklearn's tie rule: the smallest unprocessed id
            point = int(processed.argmin())
        processed[point] = True
        open_reachability[point] = np.inf
        ordering[position] = point
        if core[point] == np.inf:
            continue
        row = diff[point]
        neighbours = np.flatnonzero((row <= max_eps) & ~processed)  # radius_neighbors: d <= radius
        if not neighbours.size:
            continue
        reach = np.maximum(row[neighbours], core[point])
        np.around(reach, decimals=DECIMALS, out=reach)
        better = reach < reachability[neighbours]
        improved = neighbours[better]
        reachability[improved] = open_reachability[improved] = reach[better]
        predecessor[improved] = point
    return ordering, core, reachability, predecessor


def optics_labels(diff: np.ndarray, min_samples: int, max_eps: float) -> np.ndarray:
    """Labels (-1: noise) of OPTICS(max_eps, min_samples, metric="precomputed").fit(diff)."""
    from sklearn.cluster import OPTICS, cluster_optics_xi

    defaults = OPTICS(max_eps=max_eps, min_samples=min_samples, metric="precomputed")
    ordering, _, reachability, predecessor = optics_graph(np.asarray(diff, dtype=np.float64), min_samples, max_eps)
    labels, _ = cluster_optics_xi(reachability=reachability, predecessor=predecessor, ordering=ordering,
                                  min_samples=min_samples, min_cluster_size=defaults.min_cluster_size,
                                  xi=defaults.xi, predecessor_correction=defaults.predecessor_correction)
    return labels
