"""Benchmark: embedding near duplicates (jobs/curate.build_embedding_pairs: ids numbered over the
keys, the vectors streamed once into the LSH codes and a memmapped file, the candidate pairs
compared there) against the SQL it replaced (the vectors grouped by key, numbered by a window and
joined to the candidate pairs inside DuckDB), at N and 2N images.

    python bench/duplicates.py [--images 100000] [--quick]

Data: N random whole-image CCIP vectors (768 floats), every 50th image with a near copy, in parts
of 10,000 rows as annotate writes them. Each side runs in its own child process on a DuckDB work
database on disk with 2 threads:
  1. at a memory_limit of 4GB, where both run: seconds and peak anonymous memory (RssAnon,
     sampled; the vector file's pages are the page cache's, not the worker's heap);
  2. at 2N, at a memory_limit below the vectors' bytes (half of them, at least 128MB): whether
     each side completes.
Both sides must find the same pairs. Ends with
    RESULT embedding_pairs_time_vs_duckdb_sql ratio=<SQL seconds / ours, at 2N> goal=0.9
    RESULT embedding_pairs_2x_images_within_2.2x_time ratio=<2.2 / (ours at 2N / at N)> goal=1
    RESULT embedding_pairs_below_the_vectors_bytes ratio=<1 if ours completes there, else 0> goal=1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.results import memory_mib, result  # noqa: E402
from schemas import CCIP_DIM  # noqa: E402

PART_ROWS = 10_000

# The code before this benchmark's change, as it stood (git c17736e): the baseline.
SQL_VECTORS = """
    select (row_number() over (order by key) - 1)::bigint as id, key, vector
    from (select key, any_value(vector)::float[768] as vector from embeddings where crop = -1 group by key)"""
SQL_PAIRS = """
    select va.key as key_a, vb.key as key_b
    from (select distinct id_a, id_b from embedding_candidates) c
    join embedding_vectors va on va.id = c.id_a
    join embedding_vectors vb on vb.id = c.id_b
    where array_cosine_similarity(va.vector, vb.vector) >= $similarity"""


def write_embeddings(root: Path, n: int, seed: int = 0) -> None:
    from store.workspace import Workspace

    ws, rng = Workspace(str(root)), np.random.default_rng(seed)
    for start in range(0, n, PART_ROWS):
        m = min(PART_ROWS, n - start)
        ws.add_part("images", f"b{start}", [{"key": f"bench/{i:08d}"} for i in range(start, start + m)])
        vectors = rng.standard_normal((m, CCIP_DIM)).astype(np.float32)
        vectors[1::50] = vectors[::50][: len(vectors[1::50])] + 0.05 * rng.standard_normal(
            vectors[1::50].shape).astype(np.float32)
        ws.add_part("embeddings", f"b{start}", pa.table({
            "key": [f"bench/{i:08d}" for i in range(start, start + m)], "crop": pa.array(np.full(m, -1), pa.int32()),
            "model": ["ccip"] * m, **{side: pa.array(np.zeros(m), pa.float32()) for side in ("x0", "y0", "x1", "y1")},
            "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), CCIP_DIM)}))


def sql_pairs(con, opts: dict) -> None:
    """The baseline: the vectors in DuckDB tables and joins (the old sql/061 files)."""
    from udfs.curate import near_duplicates

    con.execute("create or replace table embedding_vectors as " + SQL_VECTORS)
    n = con.execute("select count(*) from embedding_vectors").fetchall()[0][0]
    bits = int(opts["lsh_bits"]) + near_duplicates.SORT_BITS
    planes = np.random.default_rng(near_duplicates.LSH_SEED).standard_normal(
        (int(opts["lsh_tables"]), bits, CCIP_DIM)).astype(np.float32)
    powers = 1 << np.arange(bits - 1, -1, -1, dtype=np.int64)
    codes = np.zeros((len(planes), n), np.int64)
    for batch in con.execute("select id, vector from embedding_vectors order by id").to_arrow_reader(50_000):
        ids = batch.column("id").to_numpy()
        vectors = batch.column("vector").flatten().to_numpy().reshape(-1, CCIP_DIM)
        for t in range(len(planes)):
            codes[t, ids] = ((vectors @ planes[t].T) > 0).astype(np.int64) @ powers
    con.execute("create or replace table embedding_candidates (id_a bigint, id_b bigint)")
    for table_codes in codes:
        order = np.argsort(table_codes, kind="stable")
        bucket = table_codes[order] >> near_duplicates.SORT_BITS
        for step in range(1, int(opts["lsh_window"]) + 1):
            same = bucket[:-step] == bucket[step:]
            a, b = order[:-step][same], order[step:][same]
            con.register("part_arrow", pa.table({"id_a": np.minimum(a, b), "id_b": np.maximum(a, b)}))
            con.execute("insert into embedding_candidates select * from part_arrow")
            con.unregister("part_arrow")
    con.execute("create or replace table embedding_pairs as " + SQL_PAIRS,
                {"similarity": float(opts["embedding_similarity"])})


class PeakAnon:
    """Peak RssAnon of this process, sampled every 20 ms while in the block."""

    def __enter__(self) -> PeakAnon:
        self.peak, self._done = memory_mib("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            self.peak = max(self.peak, memory_mib("RssAnon"))

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def child(root: str, side: str, memory_limit: str) -> None:
    from jobs import curate
    from jobs.config import load_config
    from store.workspace import Workspace
    from udfs.curate import near_duplicates

    ws = Workspace(root)
    opts = load_config(None, [f'workspace.path="{root}"'])["curate"]
    near_duplicates.READ_ROWS = 2_000  # 6 MB a read, so that ours also fits the smallest limit tried
    with tempfile.TemporaryDirectory(prefix="booruset-bench-") as tmp:
        con = curate.open_database(Path(tmp) / "work.duckdb", {**opts, "memory_limit": memory_limit, "threads": 2})
        curate.attach_inputs(con, ws)
        before = memory_mib("RssAnon")
        started = time.perf_counter()
        try:
            with PeakAnon() as peak:
                if side == "sql":
                    sql_pairs(con, opts)
                else:
                    curate.build_embedding_pairs(con, curate.sql_params(opts), opts)
        except Exception as exc:  # noqa: BLE001 - the baseline's Out of Memory is a finding, not a crash
            print(json.dumps({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}))
            return
        seconds = time.perf_counter() - started
        pairs = sorted(map(tuple, con.execute("select key_a, key_b from embedding_pairs").fetchall()))
    print(json.dumps({"seconds": seconds, "memory_mib": peak.peak - before, "pairs": len(pairs),
                      "digest": hashlib.sha256(json.dumps(pairs).encode()).hexdigest()}))


def run_child(root: Path, side: str, memory_limit: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", str(root), "--side", side, "--limit", memory_limit],
                          check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="25,000 and 50,000 images (about 2 minutes)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    parser.add_argument("--limit", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.side, args.limit)
        return 0
    if args.quick:
        args.images = 25_000
    runs: dict[tuple[str, int], dict] = {}
    with tempfile.TemporaryDirectory(prefix="booruset-bench-") as tmp:
        for n in (args.images, 2 * args.images):
            root = Path(tmp) / f"ws{n}"
            write_embeddings(root, n)
            for side in ("ours", "sql"):
                runs[side, n] = run_child(root, side, "4GB")
                run = runs[side, n]
                print(f"{n:,} images, {side}: {run['seconds']:.1f} s, +{run['memory_mib']:,.0f} MiB anonymous, "
                      f"{run['pairs']:,} pairs", flush=True)
            assert runs["ours", n]["digest"] == runs["sql", n]["digest"], "both sides must find the same pairs"
        limit = f"{max(128, 2 * args.images * CCIP_DIM * 4 // 2**21)}MB"
        tight = {side: run_child(root, side, limit) for side in ("ours", "sql")}
        for side, run in tight.items():
            print(f"{2 * args.images:,} images at memory_limit {limit}, {side}: "
                  + (run["error"][:120] if "error" in run else f"{run['seconds']:.1f} s, {run['pairs']:,} pairs"))
    n, big = args.images, 2 * args.images
    print(result("embedding_pairs_time_vs_duckdb_sql", runs["sql", big]["seconds"] / runs["ours", big]["seconds"], 0.9))
    print(result("embedding_pairs_2x_images_within_2.2x_time",
                 2.2 / (runs["ours", big]["seconds"] / runs["ours", n]["seconds"]), 1))
    same = "error" not in tight["ours"] and tight["ours"]["digest"] == runs["ours", big]["digest"]
    print(result("embedding_pairs_below_the_vectors_bytes", float(same), 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
