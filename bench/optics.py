"""Benchmark: OPTICS on one cell's difference matrix, udfs/curate/optics.py against scikit-learn's
OPTICS as curate ran it before (metric "precomputed", assume_finite and skip_parameter_validation
on, imgutils' defaults max_eps 0.5 and min_samples 5), the same matrices, in the same run.

    python bench/optics.py [--sizes 500 1000 2000] [--rounds 3] [--quick]

Data: cells of CCIP-like vectors (identities of ~50 crops, 768 floats, spread 0.3, as
bench/cluster.py), up to curate.max_block (2,000) crops, the size k-means cuts a large block
into. Differences as curate computes them (1 - cosine). Both sides run one after the other,
--rounds times (median); the labels must be equal. The difference matrix is not timed (the
same on both sides). Ends with
    RESULT optics_cell_vs_sklearn ratio=<sklearn seconds / ours, all cells> goal=10
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import numpy as np
import sklearn
from sklearn.cluster import OPTICS

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.cluster import identity_vectors  # noqa: E402
from bench.results import alternated, result  # noqa: E402
from udfs.curate.ccip_cluster import ClusterSettings, Differences  # noqa: E402
from udfs.curate.optics import optics_labels  # noqa: E402

GOAL = 10


def cell(n: int, seed: int) -> np.ndarray:
    return Differences()(identity_vectors(np.random.default_rng(seed), n))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[500, 1000, 2000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="the default sizes (about 1 minute on 2 cores)")
    args = parser.parse_args()
    settings = ClusterSettings()
    cells = [cell(n, seed) for seed, n in enumerate(args.sizes)]
    labels: dict[str, list[np.ndarray]] = {"sklearn": [], "ours": []}

    def sklearn_side() -> None:
        labels["sklearn"] = [OPTICS(max_eps=settings.eps, min_samples=settings.min_samples, metric="precomputed")
                             .fit(diff).labels_ for diff in cells]

    def our_side() -> None:
        labels["ours"] = [optics_labels(diff, settings.min_samples, settings.eps) for diff in cells]

    with warnings.catch_warnings(), sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        warnings.simplefilter("ignore", UserWarning)
        our_side()  # imports and first calls outside the timing
        seconds = alternated({"sklearn": sklearn_side, "ours": our_side}, args.rounds)
    for n, theirs, ours in zip(args.sizes, labels["sklearn"], labels["ours"], strict=True):
        assert np.array_equal(theirs, ours), f"labels differ on the cell of {n} crops"
        print(f"cell of {n:,} crops: {theirs.max() + 1} clusters, {(theirs < 0).sum()} noise, same labels")
    crops = sum(args.sizes)
    for side, value in seconds.items():
        print(f"{side}: {value:.3f} s for {crops:,} crops ({1e3 * value / crops:.3f} ms per crop), "
              f"median of {args.rounds}")
    print(result("optics_cell_vs_sklearn", seconds["sklearn"] / seconds["ours"], GOAL))
    return 0


if __name__ == "__main__":
    sys.exit(main())
