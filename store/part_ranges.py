"""The smallest and largest key of each part file, from its Parquet footer.

A job that reads a table one key range at a time (curate's tag partitions, export's selection,
the review table) gives DuckDB the key bounds, and the Parquet statistics then skip other keys'
row groups, but DuckDB still opens the footer of every file it is given: over a table of F
parts, R ranges opened R x F footers, which grows with the square of the images (8,000 parts on
local disk: 1.0 s a range against 0.25 s over the 500 it needed; on object storage a request
each). With each part's key bounds known, a range reads only the parts it can meet, and each
footer is read once per process.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pyarrow.fs as pafs
import pyarrow.parquet as pq

KeyBounds = tuple[str | None, str | None]  # (None, None): not known, the part may hold any key
# Footers read side by side: one small request each, which object storage answers in parallel.
FOOTER_READERS = 16


class PartKeyRanges:
    """Key bounds of part files, cached by path. A job's parts keep their keys under their names
    (a unit done again writes the same images' rows; curate and caption write new names); a part
    rewritten with other keys (Workspace.add_part) is forgotten by the workspace that writes it."""

    def __init__(self, fs: pafs.FileSystem) -> None:
        self.fs = fs
        self._bounds: dict[str, KeyBounds] = {}

    def bounds(self, paths: list[str]) -> dict[str, KeyBounds]:
        missing = [path for path in paths if path not in self._bounds]
        if missing:
            with ThreadPoolExecutor(FOOTER_READERS) as pool:
                self._bounds.update(zip(missing, pool.map(self._read_bounds, missing), strict=True))
        return {path: self._bounds[path] for path in paths}

    def forget(self, path: str) -> None:
        self._bounds.pop(path, None)

    def meeting(self, paths: list[str], first: str, last: str | None) -> list[str]:
        """The paths whose keys can fall in [first, last] (last None: no upper end)."""
        bounds = self.bounds(paths)
        return [path for path in paths if meets(bounds[path], first, last)]

    def _read_bounds(self, path: str) -> KeyBounds:
        metadata = pq.read_metadata(path, filesystem=self.fs)
        column = next((i for i in range(metadata.num_columns) if metadata.schema.column(i).path == "key"), None)
        if column is None:
            return None, None
        low = high = None
        for group in range(metadata.num_row_groups):
            stats = metadata.row_group(group).column(column).statistics
            if stats is None:
                return None, None
            if not stats.has_min_max:
                if stats.num_values == 0:  # counts the values that are not null
                    continue  # keys all null: no key range can meet this row group
                return None, None
            try:
                group_low, group_high = stats.min, stats.max
            except UnicodeDecodeError:  # a bound cut inside a character by another writer
                return None, None
            low = group_low if low is None else min(low, group_low)
            high = group_high if high is None else max(high, group_high)
        return (low, high) if low is not None else ("", "")  # no key at all: only the empty key


def meets(bounds: KeyBounds, first: str, last: str | None) -> bool:
    low, high = bounds
    if low is None or high is None:
        return True
    return high >= first and (last is None or low <= last)
