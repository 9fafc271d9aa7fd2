"""`booruset inputs`: the list of a workspace's inputs, and forgetting one, whose images then
leave every table and the export (inputs add up over runs: one no run names kept its rows)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.export_data import base_config
from tests.hostile_data import encode, picture


def collection(folder: Path, names: list[str], seed: int) -> Path:
    folder.mkdir()
    for i, name in enumerate(names):
        (folder / f"{name}.png").write_bytes(encode(picture(seed=seed + i), "PNG"))
        (folder / f"{name}.txt").write_text("1girl, solo, smile, long hair")
    return folder


def keys_by_table(ws) -> dict[str, set[str]]:
    """{table: its keys} for every workspace view with a key column."""
    con = ws.connect()
    tables = [t for (t,) in con.execute("select distinct table_name from information_schema.columns "
                                        "where column_name = 'key'").fetchall()]
    return {t: {k for (k,) in con.execute(f'select distinct key from "{t}"').fetchall()} for t in tables}


def exported_keys(out: Path) -> set[str]:
    import webdataset as wds

    shards = sorted(str(p) for p in (out / "webdataset").glob("shard-*.tar"))
    # a sample's name is its key with `/` as `__` (webdataset splits the extension at the first dot)
    return {s["__key__"].replace("__", "/") for s in wds.WebDataset(shards, shardshuffle=False)} if shards else set()


@pytest.fixture
def two_inputs(tmp_path, ray_local):
    from jobs.cli import run_jobs
    from store.workspace import Workspace

    a = collection(tmp_path / "a", ["p0", "p1", "p2"], seed=0)
    b = collection(tmp_path / "b", ["q0", "q1"], seed=10)
    ws_path, out = tmp_path / "ws", tmp_path / "out"
    cfg = base_config(ws_path, f'ingest.inputs=["{a}", "{b}"]', 'annotate.models=["cascade_face"]',
                      f'export.out="{out}"')
    ws = Workspace(str(ws_path))
    assert run_jobs(cfg, ws, ["ingest", "annotate", "curate", "caption", "export"]) == 0
    return cfg, ws, a, b, out


def test_a_forgotten_input_leaves_every_table_and_the_export_and_comes_back_when_named(two_inputs, capsys):
    from jobs.cli import main, run_jobs
    from jobs.config import merge

    cfg, ws, a, b, out = two_inputs
    before = keys_by_table(ws)
    for table in ("images", "source_tags", "tags", "captions", "image_meta"):
        assert {k for k in before[table] if k.startswith("b/")} == {"b/q0", "b/q1"}, table
    assert len([k for k in exported_keys(out)]) == 5
    b_units = {u for u, m in ws.done_units("ingest").items() if m["input"] == "b"}
    assert b_units and b_units <= set(ws.done_units("annotate"))

    capsys.readouterr()
    assert main(["inputs", "-w", str(ws.root), "--forget", "b"]) == 0
    said = capsys.readouterr().out
    assert "inputs: forgot b: 2 images of 1 units" in said and "still names" not in said
    now = keys_by_table(ws)
    for table in ("images", "source_tags"):  # at once: the ingest rows
        assert now[table] == {"a/p0", "a/p1", "a/p2"}, table
    assert not b_units & set(ws.done_units("annotate"))  # no model runs again for the rest

    merge(cfg, {"ingest": {"inputs": [str(a)]}})  # the next run names the other input only
    assert run_jobs(cfg, ws, ["ingest", "annotate", "curate", "caption", "export"]) == 0
    for table, keys in keys_by_table(ws).items():
        assert not {k for k in keys if k.startswith("b/")}, table
    assert exported_keys(out) == {"a/p0", "a/p1", "a/p2"}

    assert main(["inputs", "-w", str(ws.root)]) == 0
    listed = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert listed["a"][1:4] == ["3", "1", "here"] and listed["b"][1:4] == ["0", "0", "forgotten"]

    merge(cfg, {"ingest": {"inputs": [str(a), str(b)]}})  # named again: ingested anew, same keys
    assert run_jobs(cfg, ws, ["ingest", "curate", "caption", "export"]) == 0
    assert {k for k in keys_by_table(ws)["images"] if k.startswith("b/")} == {"b/q0", "b/q1"}
    assert exported_keys(out) == {"a/p0", "a/p1", "a/p2", "b/q0", "b/q1"}


def test_forgetting_an_unknown_input_is_one_line_and_a_named_one_says_so(two_inputs, capsys):
    from jobs.cli import main

    cfg, ws, a, b, out = two_inputs
    capsys.readouterr()
    assert main(["inputs", "-w", str(ws.root), "--forget", "c"]) == 2
    assert "no input 'c' in this workspace (its inputs: a, b;" in capsys.readouterr().err
    assert main(["inputs", "-w", str(ws.root), "--forget", "b", "--set", f'ingest.inputs=["{a}", "{b}"]']) == 0
    assert f"inputs: ingest.inputs still names {b}: the next ingest reads it again" in capsys.readouterr().out
    assert main(["inputs", "-w", str(ws.root), "--forget", "b"]) == 0  # again: it printed "forgot b: 0 images"
    assert capsys.readouterr().out.strip() == "inputs: b is forgotten already: nothing to do"


def test_a_forget_stopped_part_way_leaves_the_input_whole_until_one_ends(tmp_path, ray_local, monkeypatch):
    """Forgetting retires the input's units one marker at a time, then publishes: one killed after
    the first (a preempted node, ^C) left the next job to publish part of the input gone and part
    there ("its rows leave the tables at once"). Now readers keep it whole until a forget of it
    ends."""
    from jobs.cli import run_jobs
    from jobs.inputs import forget
    from store.workspace import Workspace

    a = collection(tmp_path / "a", ["p0"], seed=0)
    b = collection(tmp_path / "b", ["q0", "q1", "q2", "q3"], seed=10)
    cfg = base_config(tmp_path / "ws", f'ingest.inputs=["{a}", "{b}"]', "ingest.folder_unit_size=1")
    ws = Workspace(str(tmp_path / "ws"))
    assert run_jobs(cfg, ws, ["ingest"]) == 0

    def b_images(ws: Workspace) -> int:
        return ws.connect().execute("select count(*) from images where key like 'b/%'").fetchone()[0]

    assert b_images(ws) == 4 and len(ws.done_units("ingest")) > 2
    commit_unit = Workspace.commit_unit
    commits = []

    def killed_after_one(self, job: str, unit: str, info: dict, parts: dict) -> None:
        if commits:
            raise KeyboardInterrupt("killed")
        commits.append(unit)
        commit_unit(self, job, unit, info, parts)

    monkeypatch.setattr(Workspace, "commit_unit", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        forget(cfg, Workspace(str(tmp_path / "ws")), "b")
    monkeypatch.setattr(Workspace, "commit_unit", commit_unit)
    nxt = Workspace(str(tmp_path / "ws"))
    nxt.begin_job()  # the next job to start publishes
    assert b_images(nxt) == 4

    forget(cfg, Workspace(str(tmp_path / "ws")), "b")
    assert b_images(Workspace(str(tmp_path / "ws"))) == 0
    assert Workspace(str(tmp_path / "ws")).holds() == {}


def test_a_forget_stopped_after_its_last_marker_ends_at_the_next_forget(tmp_path, ray_local, monkeypatch):
    """A forget killed after it retired the input's last unit, before it ended its holds: every
    marker says forgotten, so the next forget said "forgotten already: nothing to do" and left
    the holds, and readers saw the forgotten input's rows for good (no ingest plans it again)."""
    from jobs.cli import run_jobs
    from jobs.inputs import forget
    from store.workspace import Workspace

    a = collection(tmp_path / "a", ["p0"], seed=0)
    b = collection(tmp_path / "b", ["q0", "q1"], seed=10)
    cfg = base_config(tmp_path / "ws", f'ingest.inputs=["{a}", "{b}"]', "ingest.folder_unit_size=1")
    ws = Workspace(str(tmp_path / "ws"))
    assert run_jobs(cfg, ws, ["ingest"]) == 0

    def b_images(ws: Workspace) -> int:
        return ws.connect().execute("select count(*) from images where key like 'b/%'").fetchone()[0]

    def killed(self, job: str, planned=None) -> None:
        raise KeyboardInterrupt("killed")

    release_hold = Workspace.release_hold
    monkeypatch.setattr(Workspace, "release_hold", killed)
    with pytest.raises(KeyboardInterrupt):
        forget(cfg, Workspace(str(tmp_path / "ws")), "b")
    monkeypatch.setattr(Workspace, "release_hold", release_hold)
    assert b_images(Workspace(str(tmp_path / "ws"))) == 2  # held: whole until a forget of it ends

    forget(cfg, Workspace(str(tmp_path / "ws")), "b")
    assert b_images(Workspace(str(tmp_path / "ws"))) == 0
    assert Workspace(str(tmp_path / "ws")).holds() == {}
