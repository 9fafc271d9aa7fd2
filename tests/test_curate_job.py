"""curate as a job: fills every table, reruns replace (never add), a killed publish is atomic."""

from __future__ import annotations

import pytest
from curate_data import curate_config, face_row, image_rows, source_rows

from jobs import curate


def _workspace_with(ws, tag: str):
    ws.write_part("images", "p", image_rows(["a", "b"], phash=0x0123_4567_89AB_CDEF))
    ws.write_part("source_tags", "p", source_rows("a", ["1girl", tag]) + source_rows("b", ["1girl", tag]))
    ws.write_part("detections", "p", [face_row("a", 0.1, 0.1, 0.3, 0.3)])


def _snapshot(ws) -> dict[str, list[str]]:
    return {name: sorted(map(str, ws.read_table(name).to_pylist())) for name in curate.OUTPUTS}


def test_every_table_filled_and_rerun_replaces(workspace):
    _workspace_with(workspace, "smile")
    summary = curate.run(curate_config(workspace), workspace)
    first = _snapshot(workspace)
    assert all(summary.rows_out[name] > 0 for name in ("tags", "image_meta", "duplicates", "groups", "balance"))
    assert summary.rows_in == 2 and "tags" in summary.notes[0]
    curate.run(curate_config(workspace), workspace)
    assert _snapshot(workspace) == first  # the same rows, not twice
    assert not (workspace.fs.get_file_info(f"{workspace.state_dir('curate')}/commit.json").is_file)


def test_kill_before_commit_marker_keeps_old_tables(workspace, monkeypatch):
    _workspace_with(workspace, "smile")
    curate.run(curate_config(workspace), workspace)
    old = _snapshot(workspace)
    workspace.write_part("source_tags", "p", source_rows("a", ["frown"]) + source_rows("b", ["frown"]))

    def killed(*_args, **_kwargs):
        raise KeyboardInterrupt("killed before the commit marker")

    monkeypatch.setattr(workspace, "commit_unit", killed)
    with pytest.raises(KeyboardInterrupt):
        curate.run(curate_config(workspace), workspace)
    assert _snapshot(workspace) == old  # hidden parts of the new generation are invisible
    monkeypatch.undo()
    curate.finish_publish(workspace)  # the next run sweeps them
    leftovers = [f for name in curate.OUTPUTS for f in _hidden(workspace, name)]
    assert leftovers == [] and _snapshot(workspace) == old


def test_kill_after_commit_marker_rolls_forward(workspace, monkeypatch):
    _workspace_with(workspace, "smile")
    curate.run(curate_config(workspace), workspace)
    workspace.write_part("source_tags", "p", source_rows("a", ["frown"]) + source_rows("b", ["frown"]))

    def killed(_ws):
        raise KeyboardInterrupt("killed after the commit marker")

    real_finish = curate.finish_publish
    calls = []
    monkeypatch.setattr(curate, "finish_publish", lambda ws: calls.append(1) or (real_finish(ws) if len(calls) == 1
                                                                                 else killed(ws)))
    with pytest.raises(KeyboardInterrupt):
        curate.run(curate_config(workspace), workspace)
    monkeypatch.undo()
    curate.finish_publish(workspace)  # what the next run does first
    tags = {r["tag"] for r in workspace.read_table("tags").to_pylist()}
    assert tags == {"frown"}  # every table is of the new generation
    assert {r["key"] for r in workspace.read_table("groups").to_pylist()} == {"a", "b"}
    assert all(_hidden(workspace, name) == [] for name in curate.OUTPUTS)


def _hidden(ws, name: str) -> list[str]:
    import pyarrow.fs as pafs

    infos = ws.fs.get_file_info(pafs.FileSelector(ws.table_dir(name), allow_not_found=True))
    return [i.path for i in infos if i.base_name.startswith(".curate-")]


def test_empty_workspace_gives_empty_tables(workspace):
    summary = curate.run(curate_config(workspace), workspace)
    assert summary.rows_out == {name: 0 for name in curate.OUTPUTS}
    con = workspace.connect()
    assert con.execute("select count(*) from balance").fetchone() == (0,)
