"""Benchmark: curate's identity clustering (udfs/curate/ccip_cluster.cluster_blocks) at two
sizes, its sets clustered in Ray tasks against the same code in one process.

    python bench/cluster.py [--crops 160000] [--rounds 3] [--quick]

Data: --crops CCIP vectors of identities of ~50 crops each (768 floats, spread 0.3), half of
them in one block with no character tag (most crops of a real set: the block that k-means cuts
into cells), the other half in blocks of 1,000 character tags. OPTICS, imgutils' defaults.
Sides, alternated --rounds times (median):
  - ours: cluster_blocks with a local Ray on every core (started outside the timing), as curate
    runs it in its Ray worker: the window's vector sets clustered in Ray tasks (a window of
    fewer than PARALLEL_MIN_ROWS crops, such as the small size of --quick, in the process);
  - one process: the same cluster_blocks in a child process without Ray (every set in turn).
Both read the crops from the same Parquet file into DuckDB. Ends with
    RESULT cluster_tasks_per_core_vs_one_process ratio=<speed-up / cores> goal=0.8
    RESULT cluster_4x_crops_within_4.4x_time ratio=<4.4 / (ours at N / at N/4)> goal=1
and prints the seconds per million crops on this machine, both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.results import memory_mib, result  # noqa: E402
from schemas import CCIP_DIM  # noqa: E402
from udfs.curate.ccip_cluster import ClusterSettings, cluster_blocks  # noqa: E402

GOAL_PER_CORE = 0.8


def identity_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    """n CCIP-like vectors: identities of ~50 crops each, spread 0.3 (the benches' crops)."""
    identities = rng.standard_normal((max(1, n // 50), CCIP_DIM)).astype(np.float32)
    vectors = identities[rng.integers(0, len(identities), n)]
    vectors += 0.3 * rng.standard_normal((n, CCIP_DIM)).astype(np.float32)
    return vectors


def write_crops(path: Path, n: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    vectors = identity_vectors(rng, n)
    named = rng.random(n) < 0.5
    blocks = np.where(named, np.char.add("character_", rng.integers(0, 1000, n).astype(str)), "")
    pq.write_table(pa.table({
        "key": [f"bench/{i:08d}" for i in range(n)], "crop": pa.array(np.zeros(n), pa.int32()),
        "block": blocks, "block_characters": pa.array(named.astype(np.int32)),
        "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), CCIP_DIM)}), path)


def clustered(path: Path) -> tuple[float, int]:
    """(seconds, clusters found) of cluster_blocks over the crops."""
    started = time.perf_counter()
    con = duckdb.connect()
    con.execute(f"create view crops as select * from read_parquet('{path}')")
    labels = cluster_blocks(con, "crops", ClusterSettings())
    con.close()
    return time.perf_counter() - started, len(set(labels["cluster"].to_pylist()) - {-1})


def warm_up() -> None:
    """Imports and first calls (scikit-learn's, threadpoolctl's look at the BLAS on the first
    k-means) before the timing: the other side is a process that has clustered before."""
    from udfs.curate.ccip_cluster import Differences, cluster_vectors

    vectors = np.random.default_rng(1).standard_normal((300, CCIP_DIM)).astype(np.float32)
    cluster_vectors(vectors, ClusterSettings(max_block=100), Differences())


def one_process(path: Path) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(path)], check=True, capture_output=True,
                          text=True, env={**os.environ, "RAY_ADDRESS": ""})
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=160_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="60,000 crops (about 3 minutes on 2 cores)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        warm_up()
        seconds, clusters = clustered(Path(args.child))
        peak = memory_mib()
        print(json.dumps({"seconds": seconds, "clusters": clusters, "peak_mib": peak}))
        return 0
    if args.quick:
        args.crops = 60_000
    import ray

    from jobs.config import load_config
    from jobs.ray_env import init_ray

    with tempfile.TemporaryDirectory(prefix="booruset-bench-") as tmp:
        init_ray(load_config(None, [f'workspace.path="{tmp}/ws"']))  # outside the timing, as for a job
        cores = int(ray.cluster_resources()["CPU"])
        ours: dict[int, float] = {}
        for n in (args.crops // 4, args.crops):  # two sizes: the cost must grow linearly
            path = Path(tmp) / f"crops{n}.parquet"
            write_crops(path, n)
            times, alone, peaks = [], [], []
            for round_ in range(args.rounds):
                seconds, clusters = clustered(path)
                child = one_process(path)
                assert child["clusters"] == clusters, "both sides must find the same clusters"
                times.append(seconds)
                alone.append(child["seconds"])
                peaks.append(child["peak_mib"])
                print(f"{n:,} crops, round {round_ + 1}: in Ray tasks {seconds:.1f} s, one process "
                      f"{child['seconds']:.1f} s; {clusters:,} clusters", flush=True)
            ours[n], serial = statistics.median(times), statistics.median(alone)
            print(f"{n:,} crops: in Ray tasks {ours[n]:.1f} s ({ours[n] / n * 1e6:,.0f} s per million crops), "
                  f"one process {serial:.1f} s ({serial / n * 1e6:,.0f} s per million), "
                  f"speed-up {serial / ours[n]:.2f} on {cores} cores; one process peaks at {max(peaks):,.0f} MiB "
                  "(DuckDB's memory included)",
                  flush=True)
    small, big = ours[args.crops // 4], ours[args.crops]
    print(result("cluster_tasks_per_core_vs_one_process", serial / big / cores, GOAL_PER_CORE))
    print(result("cluster_4x_crops_within_4.4x_time", 4.4 / (big / small), 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
