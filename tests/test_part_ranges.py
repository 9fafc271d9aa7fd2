"""A query of one key range opens only the parts that can hold its keys (store/part_ranges.py)."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from store.part_ranges import PartKeyRanges
from store.workspace import Workspace


def write_source_tags(ws: Workspace, part: str, keys: list[str | None]) -> None:
    ws.write_part("source_tags", part, [{"key": key, "tag": "1girl", "category": "general", "origin": "txt",
                                         "position": 0} for key in keys])


def test_bounds_from_the_footers_of_both_writers(tmp_path):
    pq.write_table(pa.table({"tag": ["a", "b"], "key": ["in/b", "in/a"]}), tmp_path / "arrow.parquet",
                   row_group_size=1)
    long_low, long_high = "in/c" + "x" * 5000, "in/d" + "y" * 5000
    duckdb.execute(f"copy (select unnest([$a, $b]) as key) to '{tmp_path / 'duck.parquet'}'",
                   {"a": long_low, "b": long_high})
    pq.write_table(pa.table({"key": pa.array([None, None], pa.string())}), tmp_path / "nulls.parquet")
    pq.write_table(pa.table({"name": ["x"]}), tmp_path / "keyless.parquet")
    ranges = PartKeyRanges(pafs.LocalFileSystem())
    paths = [str(tmp_path / f"{name}.parquet") for name in ("arrow", "duck", "nulls", "keyless")]
    arrow, duck, nulls, keyless = (ranges.bounds(paths)[path] for path in paths)

    assert arrow == ("in/a", "in/b")  # over both row groups
    # DuckDB cuts long bounds at 256 bytes: still a lower and an upper bound of the keys
    assert duck[0] <= long_low and duck[1] >= long_high and len(duck[1]) < 300
    assert nulls == ("", "")
    assert keyless == (None, None)  # unknown: met by every range
    assert ranges.meeting(paths, "in/c", "in/c~") == paths[1:2] + paths[3:]
    assert ranges.meeting(paths, "in/b", None) == paths[:2] + paths[3:]
    assert ranges.meeting(paths, "", "in/a") == paths[:1] + paths[2:]


def test_a_key_range_reads_only_the_parts_that_can_hold_its_keys(tmp_path):
    ws = Workspace(str(tmp_path / "ws"))
    write_source_tags(ws, "shard-a", ["in/a/1", "in/a/2"])
    write_source_tags(ws, "shard-b", ["in/b/1", "in/b/2", None])
    write_source_tags(ws, "shard-c", ["in/c/1"])
    ws.publish({"test": {"source_tags": ["shard-a", "shard-b", "shard-c"]}})
    published = ws.published()
    con = ws.connect(published=published)
    query = "select key from source_tags where key between $first and $last order by key"

    with ws.key_range_cursor(con, ["source_tags"], "in/b/", "in/b/~", published) as cursor:
        assert cursor.execute(query, {"first": "in/b/", "last": "in/b/~"}).fetchall() == [("in/b/1",), ("in/b/2",)]
        assert cursor.execute("select count(*) from images").fetchall() == [(0,)]  # other tables as on con

    (tmp_path / "ws" / "tables" / "source_tags" / "shard-a.parquet").write_bytes(b"not parquet")
    with ws.key_range_cursor(con, ["source_tags"], "in/c/", None, published) as cursor:
        assert cursor.execute(query, {"first": "in/c/", "last": "in/z"}).fetchall() == [("in/c/1",)]
    # the connection's own view still reads every part, the broken one too
    try:
        con.execute("select count(*) from source_tags").fetchall()
    except duckdb.Error as exc:
        assert "shard-a" in str(exc)
    else:
        raise AssertionError("the whole table's view read a broken part")
