"""Balance (anime_screenshot_pipeline's multiply scheme) as SQL, for curate's groups or for a
folder tree on disk (the scheme's original input), so that an existing dataset can be weighted
the same way:

    python -m jobs.balance DATASET_DIR [--weights weights.csv] [--min-multiply 1] [--max-multiply 100] [--write]

prints each folder's probability and multiply; --write also writes DIR/multiply.txt per folder
as the original tool does. Hidden folders and files (a leading dot) are left out. The
computation is sql/090_balance_folders.sql in both cases.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from pathlib import Path

import duckdb
import pyarrow as pa

SQL = Path(__file__).resolve().parent.parent / "sql" / "090_balance_folders.sql"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp"}  # the original scheme's image extensions
GROUP_SEGMENTS = {"n_characters", "character", "fh_ratio", "n_people", "n_faces", "rating"}


def balance_weights(path: str) -> pa.Table:
    """(ord, pattern, weight) from a `pattern,weight` CSV (no header), with the original's dict
    semantics: a repeated pattern keeps its first place in the order and its last weight."""
    weights: dict[str, float] = {}
    if path:
        with open(path, newline="", encoding="utf-8-sig") as f:
            for row in csv.reader(f):
                if not row or not "".join(row).strip():
                    continue
                if len(row) != 2:
                    raise ValueError(f"{path}: each row must be pattern,weight; got {row!r}")
                weights[row[0]] = positive_weight(path, row)
    return pa.table({"ord": pa.array(range(len(weights)), pa.int32()), "pattern": list(weights),
                     "weight": pa.array(list(weights.values()), pa.float64())})


def positive_weight(path: str, row: list[str]) -> float:
    """The weight of a `pattern,weight` row: a number > 0. A folder of weight 0 has probability 0
    and no smallest per-image weight to divide by: its multiply came out NaN, clipped to
    max_multiply (the most repeats for the folder meant to have none), and `*,0` gave every
    folder max_multiply; a negative weight gave negative multiplies."""
    try:
        weight = float(row[1])
    except ValueError:
        raise ValueError(f"{path}: the weight of {row!r} is not a number") from None
    if not math.isfinite(weight) or weight <= 0:
        raise ValueError(f"{path}: the weight of {row!r} must be a number > 0 (a smaller one weighs a folder less)")
    return weight


def group_format_table(fmt: str, columns: list[str]) -> pa.Table:
    """(level, segment) rows of a group path format such as n_characters/character/fh_ratio."""
    segments = [s.strip() for s in fmt.split("/") if s.strip()]
    unknown = [s for s in segments if s not in GROUP_SEGMENTS and s not in columns]
    if not segments or unknown:
        raise ValueError(f"curate.group_format {fmt!r}: unknown segments {unknown}; "
                         f"use {sorted(GROUP_SEGMENTS)} or image_meta columns")
    return pa.table({"level": pa.array(range(len(segments)), pa.int32()), "segment": segments})


def folder_counts(root: str) -> pa.Table:
    """(path, n_images) of every folder under root that holds images (path relative, '' = root).
    Hidden folders and files (.ipynb_checkpoints, .thumbnails) are no concepts: left out."""
    paths, counts = [], []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        n = sum(1 for f in files if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES)
        if n:
            rel = os.path.relpath(folder, root)
            paths.append("" if rel == "." else Path(rel).as_posix())
            counts.append(n)
    return pa.table({"path": paths, "n_images": pa.array(counts, pa.int64())})


def balance_folders(counts: pa.Table, weights: pa.Table, min_multiply: float = 1.0,
                    max_multiply: float = 100.0) -> pa.Table:
    """Run sql/090_balance_folders.sql on a (path, n_images) table."""
    con = duckdb.connect()
    try:
        con.register("group_counts", counts)
        con.register("balance_weights", weights)
        query = SQL.read_text(encoding="utf-8")
        return con.sql(query, params={"min_multiply": min_multiply, "max_multiply": max_multiply}).to_arrow_table()
    finally:
        con.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root")
    parser.add_argument("--weights", default="")
    parser.add_argument("--min-multiply", type=float, default=1.0)
    parser.add_argument("--max-multiply", type=float, default=100.0)
    parser.add_argument("--write", action="store_true", help="write multiply.txt into each folder")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.root):  # os.walk of a mistyped path finds nothing: an empty answer
        parser.error(f"{args.root} is not a folder")
    if args.min_multiply < 0.01 or args.max_multiply < 0.01:  # as curate.min_multiply / max_multiply
        # multiplies are rounded to 2 decimals: a smaller bound gave multiply.txt files of 0
        parser.error("--min-multiply and --max-multiply must be at least 0.01")
    result = balance_folders(folder_counts(args.root), balance_weights(args.weights),
                             args.min_multiply, args.max_multiply)
    for row in sorted(result.to_pylist(), key=lambda r: r["multiply"]):
        print(f"{row['path'] or '.'}\t{row['n_images']} images\tprobability {row['probability']:.6g}"
              f"\tmultiply {row['multiply']:g}")
        if args.write:
            Path(args.root, row["path"], "multiply.txt").write_text(str(row["multiply"]), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
