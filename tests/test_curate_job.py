"""curate as a job: fills every table, reruns replace (never add), a killed publish is atomic."""

from __future__ import annotations

import shutil
import signal
import threading
from pathlib import Path

import pytest
from curate_data import curate_config, face_row, image_rows, source_rows
from kill_mid_run import booruset

from jobs import caption, curate
from store.workspace import Workspace
from udfs.curate import tag_rules


def _workspace_with(ws, tag: str):
    ws.add_part("images", "p", image_rows(["a", "b"], phash=0x0123_4567_89AB_CDEF))
    ws.add_part("source_tags", "p", source_rows("a", ["1girl", tag]) + source_rows("b", ["1girl", tag]))
    ws.add_part("detections", "p", [face_row("a", 0.1, 0.1, 0.3, 0.3)])


def _snapshot(ws) -> dict[str, list[str]]:
    return {name: sorted(map(str, ws.read_table(name).to_pylist())) for name in curate.OUTPUTS}


def test_every_table_filled_and_rerun_replaces(workspace):
    _workspace_with(workspace, "smile")
    summary = curate.run(curate_config(workspace), workspace)
    first = _snapshot(workspace)
    first_parts = workspace.published()["owned"][curate.OWNER]
    assert all(summary.rows_out[name] > 0 for name in ("tags", "image_meta", "duplicates", "groups", "balance"))
    assert summary.rows_in == 2 and "tags" in summary.notes[0]
    assert curate.run(curate_config(workspace, phash_distance=5), workspace).units_done == 1  # another option: a build
    assert _snapshot(workspace) == first  # the same rows, not twice
    assert _files_on_disk(workspace) - _published(workspace) == {  # the first run's parts, until a job starts
        f"{t}/{p}.parquet" for t in curate.OUTPUTS for p in first_parts[t]}


def test_kill_before_publish_keeps_old_tables(workspace, monkeypatch):
    _workspace_with(workspace, "smile")
    curate.run(curate_config(workspace), workspace)
    old = _snapshot(workspace)
    workspace.add_part("source_tags", "p", source_rows("a", ["frown"]) + source_rows("b", ["frown"]))
    real_publish = workspace.publish

    def killed(owned=None, **options):
        if owned and curate.OWNER in owned:
            raise KeyboardInterrupt("killed before the publish")
        return real_publish(owned, **options)

    monkeypatch.setattr(workspace, "publish", killed)
    with pytest.raises(KeyboardInterrupt):
        curate.run(curate_config(workspace), workspace)
    monkeypatch.undo()
    assert _snapshot(workspace) == old  # the new generation's parts are written but named by no generation
    orphans = _files_on_disk(workspace) - _published(workspace)
    assert len(orphans) >= 5 and workspace.begin_job() == len(orphans)  # the next job's start deletes them
    assert _snapshot(workspace) == old and _files_on_disk(workspace) == _published(workspace)


def test_readers_of_the_previous_generation_keep_their_files_for_a_while(workspace):
    """A rerun of curate replaces every table. A reader that opened the generation before it (a
    `booruset sql` session, the report) still reads its files after the next job's start has
    swept the workspace; that sweep deletes them once they have been retired retired_grace_s."""
    _workspace_with(workspace, "smile")
    curate.run(curate_config(workspace), workspace)
    first = {f"{t}/{p}.parquet" for t, parts in workspace.published()["tables"].items() for p in parts
             if p.startswith("curate-")}
    reader = workspace.connect()  # views over the first run's files
    seen = reader.execute("select key, tag, rank from tags order by all").fetchall()
    curate.run(curate_config(workspace, phash_distance=5), workspace)  # another option: a build
    assert workspace.begin_job() == 0
    assert reader.execute("select key, tag, rank from tags order by all").fetchall() == seen
    workspace.retired_grace_s = 0  # as if the grace had passed
    assert workspace.begin_job() == len(first)
    assert _files_on_disk(workspace) == _published(workspace)


def test_a_rerun_with_nothing_changed_keeps_the_tables_and_any_change_builds_again(workspace, tmp_path):
    """`booruset run` again after an export option changed rebuilt every curate table from the
    same inputs (minutes at a million images). Nothing changed: the tables stay, the summary says
    so with the last build's counts. A new part of an input table, another option or a lookup file
    rewritten each build again."""
    _workspace_with(workspace, "smile")
    first = curate.run(curate_config(workspace), workspace)
    parts = workspace.published()["owned"][curate.OWNER]
    again = curate.run(curate_config(workspace), workspace)
    assert (again.units_done, again.units_skipped, again.rows_in, again.rows_out) == (0, 1, 2, first.rows_out)
    assert "nothing curate reads changed" in again.render()
    assert workspace.published()["owned"][curate.OWNER] == parts

    def built(cfg) -> bool:
        return curate.run(cfg, workspace).units_done == 1

    workspace.add_part("source_tags", "more", source_rows("a", ["frown"]))
    assert built(curate_config(workspace)) and not built(curate_config(workspace))
    assert built(curate_config(workspace, phash_distance=2))
    blacklist = tmp_path / "blacklist.txt"
    blacklist.write_text("frown\n")
    assert built(curate_config(workspace, phash_distance=2, blacklist=str(blacklist)))
    assert not built(curate_config(workspace, phash_distance=2, blacklist=str(blacklist)))
    blacklist.write_text("frown\nsmile\n")
    assert built(curate_config(workspace, phash_distance=2, blacklist=str(blacklist)))
    tags = {r["tag"] for r in workspace.read_table("tags").to_pylist()}
    assert "smile" not in tags and "frown" not in tags


def test_an_edit_of_the_bundled_rules_builds_again(workspace, tmp_path, monkeypatch):
    """With curate.rules_dir and curate.blacklist "" (the defaults) a build reads data/rules/: a
    person's edit of its blacklist.txt (or a new version's aliases.csv) left the tags as they were,
    curate saying "nothing curate reads changed"; the related tags, which read its rules, too."""
    rules = tmp_path / "rules"
    shutil.copytree(tag_rules.RULES_DIR, rules)
    monkeypatch.setattr(tag_rules, "RULES_DIR", rules)
    _workspace_with(workspace, "smile")
    cfg = curate_config(workspace)
    assert curate.run(cfg, workspace).units_done == 1
    assert curate.run(cfg, workspace).units_skipped == 1
    with (rules / "blacklist.txt").open("a", encoding="utf-8") as f:
        f.write("smile\n")
    assert curate.run(cfg, workspace).units_done == 1
    related = caption.related_fingerprint(cfg, workspace)
    with (rules / "impossible_tags.csv").open("a", encoding="utf-8") as f:
        f.write("solo,3girls,score\n")
    assert caption.related_fingerprint(cfg, workspace) != related


def test_options_that_say_how_it_runs_build_nothing_again(workspace):
    """curate's DuckDB threads and memory, and annotate's CCIP batch size and actors, change no row:
    changed, they rebuilt every table (minutes at a million images, then the related tags and the
    caption staging after it). annotate's CCIP model does matter where references are embedded."""
    _workspace_with(workspace, "smile")
    curate.run(curate_config(workspace), workspace)
    tuned = curate_config(workspace, threads=1, memory_limit="2GB")
    tuned["annotate"]["ccip"].update(batch_size=64, concurrency=2, threads=1)
    assert curate.run(tuned, workspace).units_skipped == 1
    opts = {**tuned["curate"], "tag_list": "", "cascade_face_model": "", "references": "refs"}
    ccip = curate.ccip_spec(tuned)
    assert curate.inputs_fingerprint(workspace, opts, {**ccip, "revision": "v2"}, []) != \
        curate.inputs_fingerprint(workspace, opts, ccip, [])


def _published(ws) -> set[str]:
    return {f"{t}/{p}.parquet" for t, parts in ws.published()["tables"].items() for p in parts}


def _files_on_disk(ws) -> set[str]:
    root = Path(ws.base) / "tables"
    return {str(p.relative_to(root)) for p in root.rglob("*.parquet")}


CURATE_KILL_POINTS = {
    "after its start publish": {"BOORUSET_KILL_AFTER_PUBLISHES": "1"},
    "mid-way through writing its tables": {"BOORUSET_KILL_AFTER_CURATE_PARTS": "3"},
    "the moment its generation is published": {"BOORUSET_KILL_AFTER_PUBLISHES": "2"},
}


@pytest.mark.parametrize("point", list(CURATE_KILL_POINTS))
def test_sigkilled_curate_readers_see_old_or_new_never_both(tmp_path, point):
    """A real `booruset curate` process SIGKILLed at each step of its publish while a reader polls
    the tables: every read sees one whole generation (old or new tags, all six tables of one
    run); the next run ends with the new tables and no file that no generation names."""
    ws = Workspace(str(tmp_path / "ws"))
    keys = [f"k{i:03d}" for i in range(200)]
    ws.add_part("images", "p", image_rows(keys, phash=0x0123_4567_89AB_CDEF))
    ws.add_part("source_tags", "p", [r for k in keys for r in source_rows(k, ["1girl", "smile"])])
    curate.run(curate_config(ws), ws)
    old = _tag_rows(ws)
    ws.add_part("source_tags", "p", [r for k in keys for r in source_rows(k, ["1girl", "frown"])])
    new = {(k, t) for k, t in old if t != "smile"} | {(k, "frown") for k in keys}

    seen: list[frozenset] = []
    generations: list[set[str]] = []
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            reader = Workspace(ws.root, create=False)
            owned = reader.published()["owned"].get(curate.OWNER, {})
            generations.append({p.rsplit("-", 1)[0] for parts in owned.values() for p in parts})
            rows = reader.connect().execute("select key, tag from tags").fetchall()
            assert len(rows) == len(set(rows)), "a row twice"
            seen.append(frozenset(rows))

    reader = threading.Thread(target=poll)
    reader.start()
    victim = booruset("curate", "-w", str(ws.root), "--set", "curate.threads=2", **CURATE_KILL_POINTS[point])
    out, _ = victim.communicate(timeout=600)
    stop.set()
    reader.join(timeout=60)
    assert victim.returncode == -signal.SIGKILL, out
    assert seen and set(seen) <= {frozenset(old), frozenset(new)}
    assert all(len(g) == 1 for g in generations)  # the six tables of one run, never a mix
    expected = new if point == "the moment its generation is published" else old
    assert _tag_rows(ws) == expected

    last_published = _published(ws)
    again = booruset("curate", "-w", str(ws.root), "--set", "curate.threads=2")
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    assert _tag_rows(ws) == new
    # the killed run's unpublished parts are gone; the generations before stay for their readers
    # (until the next job starts, and for parts retired less than retired_grace_s ago, after that)
    retired = {f"{t}/{p}.parquet" for t, parts in ws.published()["retired"].items() for p in parts}
    assert _files_on_disk(ws) - _published(ws) <= last_published | retired


def _tag_rows(ws) -> set[tuple[str, str]]:
    return set(Workspace(ws.root, create=False).connect().execute("select key, tag from tags").fetchall())


def test_empty_workspace_gives_empty_tables(workspace):
    summary = curate.run(curate_config(workspace), workspace)
    assert summary.rows_out == {name: 0 for name in curate.OUTPUTS}
    con = workspace.connect()
    assert con.execute("select count(*) from balance").fetchone() == (0,)
