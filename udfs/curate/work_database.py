"""Helpers for curate's steps that read vectors out of the work database (DuckDB).

DuckDB 2.0.1 cannot spill a sort, aggregate or hash table whose rows carry 768-float vectors: it
fails with Out of Memory once the vectors outgrow memory_limit. The steps that need vectors in
an order of their own (clustering, near-duplicate pairs) stream them once in storage order,
joined to small tables of keys, and keep them in files of their own under DuckDB's temp folder.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import duckdb


@contextlib.contextmanager
def joins_as_written(con: duckdb.DuckDBPyConnection) -> Iterator[None]:
    """Each join's hash table on its right side as written (the keys), never on the rows with
    their vectors: with about as many rows on both sides, DuckDB's optimizer may pick either.
    Whatever the queries read must be drained inside (a setting cannot change under an open
    result)."""
    con.execute("set disabled_optimizers = 'join_order,build_side_probe_side'")
    try:
        yield
    finally:
        con.execute("reset disabled_optimizers")


def spill_dir(con: duckdb.DuckDBPyConnection) -> str | None:
    """DuckDB's temp directory (curate's is on the work database's disk), made if missing; None
    (the system's) for an in-memory database, whose default is '.tmp' in the working directory."""
    folder = con.execute("select current_setting('temp_directory')").fetchall()[0][0]
    if not folder or not Path(folder).is_absolute():
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return folder
