"""annotate runs its models only on images whose bytes it has not annotated: an ingest unit that
ingest replaced because a sidecar changed (a `.txt` edited, a shard written again with other
tags), or that gained an image, keeps the rows of the images whose sha256 is the same, and its
rows are those of a fresh workspace."""

from __future__ import annotations

import pytest

from jobs import annotate, ingest
from jobs.config import load_config
from store.workspace import Workspace
from tests.hostile_data import write_tar
from tests.onnx_fakes import face_model_dir
from tests.test_annotate_identity import sample_pngs

pytestmark = pytest.mark.usefixtures("ray_local")

TABLES = {"detections": "key, model, index, label, score, x0, y0, x1, y1",
          "embeddings": "key, crop, model, vector::float[]",
          "tag_scores": "key, crop, tag, score, model",
          "errors": "key, source, member, stage, kind, message"}


def annotated(ws_path, folder, models, *overrides: str, models_too: bool = True) -> tuple[object, dict[str, list]]:
    """ingest then annotate (the cascade and the fake face YOLO); the summary and every annotate table."""
    cfg = load_config(None, [f'workspace.path="{ws_path}"', f'ingest.inputs=["{folder}"]', "ray.num_cpus=2",
                             'annotate.models=["cascade_face", "face"]', f'annotate.models_dir="{models}"',
                             *overrides])
    ws = Workspace(str(ws_path))
    summary = ingest.run(cfg, ws)
    if not models_too:
        return summary, {}
    summary = annotate.run(cfg, ws)
    con = ws.connect()
    only = {"errors": "where stage like 'annotate%'"}  # ingest's rows differ: an edit is no error
    tables = {t: con.execute(f"select {cols} from {t} {only.get(t, '')} order by all").fetchall()
              for t, cols in TABLES.items()}
    return summary, tables


def test_a_changed_sidecar_runs_no_model_and_a_new_image_only_its_own(tmp_path):
    images = sample_pngs(7)
    folder, models = tmp_path / "art", face_model_dir(tmp_path / "models")
    folder.mkdir()
    for name, data in images[:6]:
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text("1girl, solo")
    first, rows = annotated(tmp_path / "ws", folder, models)
    assert first.rows_run == 6 and rows["detections"]

    (folder / images[0][0]).with_suffix(".txt").write_text("1girl, solo, smile")  # a tag edited
    edited, rows = annotated(tmp_path / "ws", folder, models)
    assert edited.units_done == 1 and edited.rows_run == 0 and edited.rows_in == 6
    assert edited.rows_out == first.rows_out and edited.rows_out["detections"] == len(rows["detections"])
    assert rows == annotated(tmp_path / "fresh1", folder, models)[1]

    (folder / images[6][0]).write_bytes(images[6][1])  # one image added to the folder's unit
    grown, rows = annotated(tmp_path / "ws", folder, models)
    assert grown.units_done == 1 and grown.rows_run == 1 and grown.rows_in == 7
    assert rows == annotated(tmp_path / "fresh2", folder, models)[1]


def test_kept_rows_of_every_model_are_a_fresh_runs(tmp_path):
    """The person crops' CCIP vectors and tag scores, the 2x2 regions' scores: kept as written."""
    from tests.conftest import shared_path
    from tests.onnx_fakes import build_models_dir

    models = build_models_dir(tmp_path / "models", shared_path("tagdata", "wd_v3_selected_tags.csv"))
    every = ('annotate.models=["cascade_face", "face", "head", "person", "ccip", "tagger"]',
             "annotate.tagger.regions=true", "annotate.draft_size=256")
    folder = tmp_path / "art"
    folder.mkdir()
    for name, data in sample_pngs(3):
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text("1girl")
    annotated(tmp_path / "ws", folder, models, *every)
    next(folder.glob("*.txt")).write_text("1girl, smile")
    edited, rows = annotated(tmp_path / "ws", folder, models, *every)
    assert edited.rows_run == 0 and all(rows[t] for t in ("detections", "embeddings", "tag_scores"))
    assert {r[1] for r in rows["embeddings"]} > {-1} and {r[1] for r in rows["tag_scores"]} > {-1}
    assert rows == annotated(tmp_path / "fresh", folder, models, *every)[1]


def test_units_annotated_before_records_were_kept_get_theirs_at_the_next_run(tmp_path):
    """A workspace annotated by a version that kept no record of the images' bytes: its next
    annotate (nothing to run) writes the records, and a sidecar edited after that runs no model."""
    import shutil

    folder, models = tmp_path / "art", face_model_dir(tmp_path / "models")
    folder.mkdir()
    for name, data in sample_pngs(3):
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text("1girl")
    annotated(tmp_path / "ws", folder, models)
    shutil.rmtree(tmp_path / "ws" / "state" / "annotate" / "images")
    assert annotated(tmp_path / "ws", folder, models)[0].units_done == 0
    next(folder.glob("*.txt")).write_text("1girl, smile")
    edited, _ = annotated(tmp_path / "ws", folder, models)
    assert edited.units_done == 1 and edited.rows_run == 0


def test_a_shard_written_again_reruns_only_its_changed_image(tmp_path):
    """A shard rewritten with other tags and one image replaced by another picture: only that
    image goes through the models."""
    images = sample_pngs(5)
    shards, models = tmp_path / "shards", face_model_dir(tmp_path / "models")
    shards.mkdir()

    def shard(tags: str, last: bytes) -> None:
        members = [(f"s/{i}.png", data) for i, (_, data) in enumerate(images[:4])] + [("s/4.png", last)]
        write_tar(shards / "a.tar", [m for name, data in members for m in ((name, data), (name[:-4] + ".txt",
                                                                                         tags.encode()))])

    shard("1girl", images[3][1])
    first, _ = annotated(tmp_path / "ws", shards, models)
    assert first.rows_run == 5
    shard("1girl, smile", images[4][1])
    again, rows = annotated(tmp_path / "ws", shards, models)
    assert again.units_done == 1 and again.rows_run == 1 and again.rows_in == 5
    assert rows == annotated(tmp_path / "fresh", shards, models)[1]


def write_three_shards(shards, images: list, per_shard: int, tags: str, last: bytes) -> None:
    """Shards 0-2 of `per_shard` of the `images` each, every picture with `tags` as its .txt, and
    `last` as the last picture of shard 0."""
    for s in range(3):
        pictures = [data for _, data in images[per_shard * s : per_shard * (s + 1)]]
        if s == 0:
            pictures[-1] = last
        write_tar(shards / f"{s}.tar", [m for i, data in enumerate(pictures)
                                        for m in ((f"{i}.png", data), (f"{i}.txt", tags.encode()))])


def test_killed_runs_that_keep_rows_end_with_the_rows_of_a_fresh_workspace(tmp_path):
    """Shards written again with other tags (and one picture replaced): a run killed after its
    first kept batch, then one killed after its first unit, then one to the end give the rows
    of one annotate of a fresh workspace."""
    import signal

    from tests.test_annotate_resume import annotate_process, rows

    images = sample_pngs(13)
    shards, models = tmp_path / "shards", face_model_dir(tmp_path / "models")
    shards.mkdir()

    def write(tags: str, last: bytes) -> None:
        write_three_shards(shards, images, 4, tags, last)

    def done(process, code: int) -> str:
        out, _ = process.communicate(timeout=900)
        assert process.returncode == code, out
        return out

    as_killed = ("annotate.draft_size=0",)  # annotate_process's options
    write("1girl", images[3][1])
    annotated(tmp_path / "ws", shards, models, *as_killed)
    write("1girl, smile", images[12][1])
    annotated(tmp_path / "ws", shards, models, *as_killed, models_too=False)
    killed = done(annotate_process(tmp_path / "ws", models, BOORUSET_KILL_AFTER_BATCHES="1"), -signal.SIGKILL)
    ws = Workspace(str(tmp_path / "ws"))
    batches = [m for unit in ws.batch_units("annotate") for m in ws.done_batches("annotate", unit).values()]
    assert [m for m in batches if m["info"].get("reused")], killed  # killed after a batch of kept rows
    done(annotate_process(tmp_path / "ws", models, BOORUSET_KILL_AFTER_COMMITS="1"), -signal.SIGKILL)
    done(annotate_process(tmp_path / "ws", models), 0)

    annotated(tmp_path / "fresh", shards, models, *as_killed)
    fresh = Workspace(str(tmp_path / "fresh"))
    for table in ("detections", "embeddings", "tag_scores", "errors"):
        expected = [r for r in rows(fresh, table) if table != "errors" or r[3] != "ingest"]
        found = [r for r in rows(Workspace(str(tmp_path / "ws")), table) if table != "errors" or r[3] != "ingest"]
        assert found == expected, table


def test_every_unit_replaced_is_planned_from_footers_and_each_paired_with_its_own(tmp_path, monkeypatch):
    """Every shard written again with other tags (as a new ingest READER_VERSION replaces every
    unit): the driver plans reading no `images`, errors or record row (a million of each at a
    million images), only Parquet footers, and each new unit's task reads the one replaced unit
    its keys can be in, not every one; the rows are those of a fresh workspace."""
    import pyarrow.parquet as pq

    images = sample_pngs(10)
    shards, models = tmp_path / "shards", face_model_dir(tmp_path / "models")
    shards.mkdir()

    def write(tags: str, last: bytes) -> None:
        write_three_shards(shards, images, 3, tags, last)

    write("1girl", images[2][1])
    annotated(tmp_path / "ws", shards, models)
    write("1girl, smile", images[9][1])

    planning, reads, plans = [], [], []
    plan_kept_rows, read_part, read_table = annotate.plan_kept_rows, Workspace.read_part, pq.read_table

    def plan(*args, **kwargs) -> list[dict]:
        planning.append(True)
        try:
            found = plan_kept_rows(*args, **kwargs)
        finally:
            planning.clear()
        plans.extend(found)
        return found

    def spy_part(self, name: str, part: str, columns: list[str]) -> list[dict]:
        if planning:
            reads.append((name, part))
        return read_part(self, name, part, columns)

    def spy_table(source, *args, **kwargs):
        if planning:
            reads.append(("read_table", str(source)))
        return read_table(source, *args, **kwargs)

    monkeypatch.setattr(annotate, "plan_kept_rows", plan)
    monkeypatch.setattr(Workspace, "read_part", spy_part)
    monkeypatch.setattr(pq, "read_table", spy_table)  # the records (tasks run in Ray's worker processes)
    again, rows = annotated(tmp_path / "ws", shards, models)
    assert reads == []
    assert sorted(len(item["replaced"]) for item in plans) == [1, 1, 1]
    assert again.units_done == 3 and again.rows_run == 1 and again.rows_in == 9
    monkeypatch.undo()
    assert rows == annotated(tmp_path / "fresh", shards, models)[1]


def test_key_ranges_meet_as_every_pair_compared():
    """meeting_ranges (a sweep) pairs the ranges that share a key, ends included, as comparing
    every pair would; a range not known meets every one."""
    import random

    chance = random.Random(7)

    def ranges(n: int, prefix: str) -> dict:
        found = {}
        for i in range(n):
            low, high = sorted(f"{chance.randrange(60):02d}" for _ in range(2))
            found[f"{prefix}{i}"] = (low, high) if chance.random() > 0.1 else (None, None)
        return found

    for _ in range(20):
        first, second = ranges(30, "a"), ranges(25, "b")
        expected = {a: sorted(b for b, (low, high) in second.items()
                              if None in (first[a][0], low) or (low <= first[a][1] and high >= first[a][0]))
                    for a in first}
        met = annotate.meeting_ranges(first, second)
        assert {a: sorted(met[a]) for a in first} == expected


def test_rows_of_a_model_whose_file_was_replaced_are_not_kept(tmp_path):
    """A sidecar edited and the face model replaced at its path before the next annotate: the
    replaced unit's face rows are of the old weights, so its images run again, and the rows are
    those of a fresh workspace with the new model."""
    from tests.onnx_fakes import DETECTORS, yolo_model

    images = sample_pngs(3)
    folder, models = tmp_path / "art", face_model_dir(tmp_path / "models")
    folder.mkdir()
    for name, data in images:
        (folder / name).write_bytes(data)
        (folder / name).with_suffix(".txt").write_text("1girl")
    annotated(tmp_path / "ws", folder, models)
    (folder / images[0][0]).with_suffix(".txt").write_text("1girl, smile")
    repo, model_folder, label, batch = DETECTORS["face"]
    yolo_model(models / repo / model_folder / "model.onnx", label, batch, seed=7)
    again, rows = annotated(tmp_path / "ws", folder, models)
    assert again.rows_run == 3
    assert rows == annotated(tmp_path / "fresh", folder, models)[1]



def test_records_are_written_in_tasks_not_the_driver(tmp_path, monkeypatch):
    """The record of each committed unit (its images' key and sha256) is written by a Ray task:
    the driver reads no `images` row for it, neither when a run commits its units nor when the
    next start writes the records a run left unwritten (killed, or a version that kept none);
    the records hold every image of their unit."""
    import shutil

    import pyarrow.parquet as pq

    images = sample_pngs(6)
    shards, models = tmp_path / "shards", face_model_dir(tmp_path / "models")
    shards.mkdir()
    for s in range(2):
        write_tar(shards / f"{s}.tar", [m for i, (_, data) in enumerate(images[3 * s : 3 * s + 3])
                                        for m in ((f"{i}.png", data), (f"{i}.txt", b"1girl"))])
    annotated(tmp_path / "ws", shards, models, models_too=False)
    reads = []
    read_part = Workspace.read_part

    def spy_part(self, name: str, part: str, columns: list[str]) -> list[dict]:
        reads.append(name)  # in the driver: the tasks run in Ray's worker processes
        return read_part(self, name, part, columns)

    monkeypatch.setattr(Workspace, "read_part", spy_part)
    records = tmp_path / "ws" / "state" / "annotate" / "images"
    for _ in range(2):  # a run that commits both units, then a start that finds no record
        summary, _ = annotated(tmp_path / "ws", shards, models)
        assert "images" not in reads
        found = sorted(row for path in records.glob("*.parquet")
                       for row in zip(*pq.read_table(path).to_pydict().values(), strict=True))
        assert len(list(records.glob("*.parquet"))) == 2 and len(found) == 6 and all(sha for _, sha in found)
        shutil.rmtree(records)
    assert summary.units_done == 0


def test_a_key_two_replaced_units_hold_is_copied_once(tmp_path):
    """A key that two replaced units both hold, each with its rows, is kept from the first alone
    (kept_keys chooses it), as copy_kept_rows says: the parts of every replaced unit that a new
    unit keeps rows of were read for every key it kept, and a key of the first that the second
    also holds came twice when the second gave another key. The twin is made here (copies of a
    unit's parts and record under another name, the first's record without one image): no ingest
    gives two of its units one key, so this is the task's own promise, checked on it directly."""
    import shutil

    import pyarrow.parquet as pq

    from udfs.annotate.annotate_parts import copy_kept_rows

    folder, models = tmp_path / "art", face_model_dir(tmp_path / "models")
    folder.mkdir()
    for name, data in sample_pngs(3):
        (folder / name).write_bytes(data)
    annotated(tmp_path / "ws", folder, models)
    ws = Workspace(str(tmp_path / "ws"))
    (unit, marker), = ws.done_units("annotate").items()
    twin: dict[str, list[str]] = {}
    for table, names in marker["parts"].items():
        for part in names:
            copy = part.replace(f"annotate-{unit}-", "annotate-twin-", 1)
            shutil.copy(f"{ws.table_dir(table)}/{part}.parquet", f"{ws.table_dir(table)}/{copy}.parquet")
            twin.setdefault(table, []).append(copy)
    record = annotate.record_files(ws)[unit]
    twin_record = record.replace(f"{unit}.parquet", "twin.parquet")
    shutil.copy(record, twin_record)
    pq.write_table(pq.read_table(record).sort_by("key").slice(0, 2), record)  # its last image from the twin
    replaced = [annotate.kept_source(unit, marker, record, marker["pipeline"]),
                annotate.kept_source("twin", {**marker, "parts": twin}, twin_record, marker["pipeline"])]
    (images,) = annotate.units_of(ws)
    found = copy_kept_rows({"unit": "new", "parts": images["parts"], "replaced": replaced, "tag": "t"}, ws.root,
                           marker["pipeline"], marker["stamps"])
    assert found["info"]["reused"] == 3 and found["parts"]["detections"]
    for table, parts in found["parts"].items():
        copied = sorted(r["key"] for part in parts for r in ws.read_part(table, part, ["key"]))
        assert copied == sorted(r["key"] for part in marker["parts"][table] for r in ws.read_part(table, part, ["key"]))
