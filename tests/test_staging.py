"""store/staging.py: an ordered stream cut into one Parquet file per unit, whatever its batches."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

from store.staging import stage_units


def stream(batch_rows: int) -> list[pa.RecordBatch]:
    table = pa.table({"key": [f"k{i:02d}" for i in range(10)], "value": list(range(10)),
                      "unit_index": [0, 0, 0, 1, 1, 1, 1, 2, 2, 3],
                      "row_digest": [f"{i:032x}" for i in range(10)]})
    return table.to_batches(max_chunksize=batch_rows)


def test_units_are_cut_across_batches_and_digests_ignore_the_batch_layout(workspace):
    whole = stage_units(workspace, stream(100), "state/t")
    pieces = stage_units(workspace, stream(2), "state/t")  # unit 1 spans three batches
    assert [u["rows"] for u in pieces] == [3, 4, 2, 1]
    assert [u["first"]["key"] for u in pieces] == ["k00", "k03", "k07", "k09"]
    assert [u["digest"] for u in pieces] == [u["digest"] for u in whole]
    assert len({u["digest"] for u in pieces}) == 4
    second = pq.read_table(pieces[1]["path"])
    assert second.column_names == ["key", "value"]  # the helper columns are not written
    assert second["value"].to_pylist() == [3, 4, 5, 6]


def test_a_changed_value_changes_only_its_units_digest(workspace):
    before = stage_units(workspace, stream(3), "state/t")
    batches = stream(100)
    changed = batches[0].to_pydict()
    changed["row_digest"][8] = "f" * 32
    after = stage_units(workspace, [pa.RecordBatch.from_pydict(changed)], "state/t")
    assert [a["digest"] == b["digest"] for a, b in zip(after, before, strict=True)] == [True, True, False, True]
