"""Related-tag suggestions for one unit of images (a CPU task per unit).

The driver computes the related pairs once, over the whole dataset (sql/caption_related_pairs.sql:
an aggregate per pair of tags) and stages each unit's image tags in a file of its own; this task
joins the two for its unit (sql/caption_related_tags.sql) and writes the unit's
`tag_suggestions` part. Per-image candidates, tens of millions at 20k images, never reach the
driver, and a unit's memory is bounded by its images, not by the dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from store.staging import read_unit_rows
from store.workspace import Workspace

SQL = Path(__file__).resolve().parents[2] / "sql" / "caption_related_tags.sql"


def suggest_units_task(batch: dict[str, Any], workspace: str, pairs_path: str, part_prefix: str,
                       top_k: int, impossible: pa.Table) -> dict[str, list]:
    """map_batches UDF: for each staged unit of the batch, write `tag_suggestions/<prefix><index>`;
    return the part names and their rows. `impossible`: curate's impossible tag combinations
    (udfs/curate/tag_rules.impossible), whose tags are not suggested beside each other."""
    ws = Workspace(workspace, create=False)
    query = SQL.read_text(encoding="utf-8")
    out: dict[str, list] = {"part": [], "rows": [], "images": []}
    for index, path in zip(batch["index"], batch["path"], strict=True):
        image_tags = read_unit_rows(ws, path)
        tags = pc.unique(image_tags["tag"])
        # the pairs file is sorted by tag: its row groups' statistics skip the tags this unit lacks
        pairs = pq.read_table(pairs_path, filesystem=ws.fs, filters=pc.field("tag").isin(tags))
        con = duckdb.connect(config={"threads": 1})
        try:
            con.register("image_tags", image_tags)
            con.register("related_pairs", pairs)
            con.register("impossible_tags", impossible)
            suggestions = con.sql(query, params={"top_k": top_k}).to_arrow_table()
        finally:
            con.close()
        part = f"{part_prefix}{int(index)}"
        ws.write_part("tag_suggestions", part, suggestions)
        out["part"].append(part)
        out["rows"].append(suggestions.num_rows)
        out["images"].append(len(pc.unique(image_tags["key"])))
    return out
