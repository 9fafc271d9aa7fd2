"""A job's inputs staged per unit: an ordered stream from DuckDB cut into one Parquet file per unit.

The driver plans units in SQL (a `unit_index` column, rows ordered by it) and streams the
result here; each unit's rows go to their own file, which the unit's task reads. The driver
holds one record batch at a time and, per unit, a few counts: never the job's input rows.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from store.workspace import Workspace

HELPER_COLUMNS = ("unit_index", "row_digest")  # used here, not written


def stage_units(ws: Workspace, batches: Iterable[pa.RecordBatch], folder: str,
                first: tuple[str, ...] = ("key",)) -> list[dict]:
    """Write each unit of an ordered stream to `<folder>/<unit_index>.parquet` (folder relative to the
    workspace); per unit: index, rows, path, the `first` columns of its first row, and the sha1 of
    its `row_digest` values in order (when the stream has that column: a digest of the unit's
    values that does not depend on how Arrow laid them out)."""
    clear(ws, folder)
    ws.fs.create_dir(f"{ws.base}/{folder}", recursive=True)
    units: list[dict] = []
    writer = digest = None
    for batch in batches:
        indices = batch["unit_index"].to_pylist()
        digests = batch["row_digest"].to_pylist() if "row_digest" in batch.schema.names else None
        data = batch.drop_columns([c for c in HELPER_COLUMNS if c in batch.schema.names])
        for start, stop in runs(indices):
            if not units or units[-1]["index"] != indices[start]:
                finish(units, writer, digest)
                path = f"{ws.base}/{folder}/{indices[start]}.parquet"
                units.append({"index": indices[start], "rows": 0, "path": path,
                              "first": {c: data[c][start].as_py() for c in first}})
                writer = pq.ParquetWriter(units[-1]["path"], data.schema, filesystem=ws.fs)
                digest = hashlib.sha1() if digests is not None else None
            writer.write_batch(data.slice(start, stop - start))
            units[-1]["rows"] += stop - start
            if digest is not None:
                digest.update("".join(digests[start:stop]).encode())  # fixed-length hex: no separator needed
    finish(units, writer, digest)
    return units


def finish(units: list[dict], writer: pq.ParquetWriter | None, digest) -> None:
    if writer is not None:
        writer.close()
        units[-1]["digest"] = digest.hexdigest() if digest is not None else None


def runs(values: list) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal values."""
    out, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out.append((start, i))
            start = i
    return out


def clear(ws: Workspace, folder: str) -> None:
    """Remove a staging folder (rebuilt by every run; the workspace lock keeps other writers out)."""
    if ws.fs.get_file_info(f"{ws.base}/{folder}").type == pafs.FileType.Directory:
        ws.fs.delete_dir(f"{ws.base}/{folder}")


def read_unit_rows(ws: Workspace, path: str) -> pa.Table:
    return pq.read_table(path, filesystem=ws.fs)
