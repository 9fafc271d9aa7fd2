"""Benchmark: one block of crops larger than a window (udfs/curate/ccip_cluster.LargeBlock, read
from DuckDB a window of its k-means cells at a time) against the same block held whole in memory
(the code before LargeBlock: the block's vectors in one array, cut and merged by BlockPlan), at
two sizes.

    python bench/large_block.py [--crops 120000] [--window 20000] [--quick]

Data: one block of --crops CCIP vectors (identities of ~50 crops, 768 floats, spread 0.3), then
one of twice as many, each in a DuckDB database file as curate's work database holds them. Each
side clusters in a child process without Ray (its peak RSS is its own), DuckDB's memory_limit at
128MB (reached at both sizes). Ours runs with WINDOW_ROWS = --window, READ_ROWS a quarter of it and KMEANS_SAMPLE half
of it, as they stand to a real run's window of 200,000 crops (--window stands for it at sizes
this machine clusters in minutes); the baseline with WINDOW_ROWS above the block (and the same
KMEANS_SAMPLE). Memory is the peak RSS above the RSS before
clustering (DuckDB's part of it is bounded by memory_limit at both sizes).
Ends with
    RESULT large_block_memory_2x_crops ratio=<1.25 / (our memory at 2N / at N)> goal=1
    RESULT large_block_time_vs_whole_block ratio=<whole block seconds / ours, at 2N> goal=0.9
after checking that both sides find the same clusters (adjusted Rand index >= 0.999: the k-means
samples differ, so a crop at a boundary may differ).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.cluster import identity_vectors  # noqa: E402
from bench.results import memory_mib, result  # noqa: E402
from schemas import CCIP_DIM  # noqa: E402


def write_block(path: Path, n: int, seed: int = 0) -> None:
    """A DuckDB database at `path` with the table `crops`: one block of n crops."""
    import duckdb

    vectors = identity_vectors(np.random.default_rng(seed), n)
    crops = pa.table({
        "key": [f"bench/{i:08d}" for i in range(n)], "crop": pa.array(np.zeros(n), pa.int32()),
        "block": [""] * n, "block_characters": pa.array(np.zeros(n), pa.int32()),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), CCIP_DIM)})
    with duckdb.connect(str(path)) as con:
        con.register("crops_arrow", crops)
        con.execute("create table crops as select * from crops_arrow")
        con.execute("checkpoint")  # else the first child to open it replays the log into memory


def child(path: Path, window: int, sample: int) -> None:
    """Cluster the block with WINDOW_ROWS = window and KMEANS_SAMPLE = sample; print seconds,
    clusters and memory growth."""
    import duckdb

    from udfs.curate import ccip_cluster

    # the k-means sample and the reads scale with the window as they stand to it in a real run
    ccip_cluster.WINDOW_ROWS, ccip_cluster.READ_ROWS = window, max(1000, window // 4)
    ccip_cluster.KMEANS_SAMPLE = sample
    con = duckdb.connect(str(path), config={"memory_limit": "128MB", "preserve_insertion_order": False})
    ccip_cluster.cluster_vectors(  # imports and first calls (scikit-learn, BLAS) before the timing
        np.random.default_rng(1).standard_normal((300, CCIP_DIM)).astype(np.float32),
        ccip_cluster.ClusterSettings(max_block=100), ccip_cluster.Differences())
    before = memory_mib("VmRSS")
    started = time.perf_counter()
    labels = ccip_cluster.cluster_blocks(con, "crops", ccip_cluster.ClusterSettings())
    seconds = time.perf_counter() - started
    growth = memory_mib() - before
    cluster = labels.sort_by("key")["cluster"].to_numpy()
    np.save(f"{path}.{window}.npy", cluster)
    print(json.dumps({"seconds": seconds, "clusters": len(set(cluster.tolist()) - {-1}), "memory_mib": growth}))


def run_child(path: Path, window: int, sample: int) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(path), "--window", str(window),
                           "--sample", str(sample)],
                          check=True, capture_output=True, text=True, env={**os.environ, "RAY_ADDRESS": ""})
    return json.loads(done.stdout.strip().splitlines()[-1])


def same_clusters(path: Path, a: int, b: int) -> float:
    from sklearn.metrics import adjusted_rand_score

    return adjusted_rand_score(np.load(f"{path}.{a}.npy"), np.load(f"{path}.{b}.npy"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=120_000)
    parser.add_argument("--window", type=int, default=20_000)
    parser.add_argument("--quick", action="store_true", help="30,000 crops, windows of 5,000 (about 3 minutes)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--sample", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(Path(args.child), args.window, args.sample)
        return 0
    if args.quick:
        args.crops, args.window = 30_000, 5_000
    ours, whole = {}, {}
    with tempfile.TemporaryDirectory(prefix="booruset-bench-") as tmp:
        for n in (args.crops, 2 * args.crops):
            path = Path(tmp) / f"block{n}.duckdb"
            write_block(path, n)
            sample = max(1000, args.window // 2)
            ours[n], whole[n] = run_child(path, args.window, sample), run_child(path, 2 * n, sample)
            agreement = same_clusters(path, args.window, 2 * n)
            print(f"one block of {n:,} crops: ours {ours[n]['seconds']:.1f} s, +{ours[n]['memory_mib']:,.0f} MiB; "
                  f"held whole {whole[n]['seconds']:.1f} s, +{whole[n]['memory_mib']:,.0f} MiB; "
                  f"{ours[n]['clusters']:,} clusters, adjusted Rand index {agreement:.4f}", flush=True)
            assert agreement >= 0.999, "both sides must find the same clusters"
    n, big = args.crops, 2 * args.crops
    print(f"twice the crops: ours {ours[big]['memory_mib'] / ours[n]['memory_mib']:.2f}x the memory, "
          f"held whole {whole[big]['memory_mib'] / whole[n]['memory_mib']:.2f}x")
    print(result("large_block_memory_2x_crops", 1.25 / (ours[big]["memory_mib"] / ours[n]["memory_mib"]), 1))
    print(result("large_block_time_vs_whole_block", whole[big]["seconds"] / ours[big]["seconds"], 0.9))
    return 0


if __name__ == "__main__":
    sys.exit(main())
