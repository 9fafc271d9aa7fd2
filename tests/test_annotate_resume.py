"""A real `booruset annotate` process killed with SIGKILL mid-run, then run again, ends with the
exact rows of an uninterrupted run.

Models: the bundled OpenCV cascade face detector (real) and one tiny fake face YOLO with the
production contract (tests/onnx_fakes.py, staged in annotate.models_dir as on an offline
cluster), so that detections are not empty on synthetic pictures.

On a small run Ray Data hands the driver its rows in a burst near the end, so the units commit
within a few ms of each other, too fast for an outside poll on a loaded machine. The victim run
therefore kills itself: BOORUSET_KILL_AFTER_COMMITS=K makes the process that writes the K-th unit
marker SIGKILL its whole process group (the driver and the Ray it started) right after it.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
from hostile_data import encode, write_tar
from kill_mid_run import booruset
from onnx_fakes import face_model_dir
from PIL import Image

from store.workspace import Workspace

REPO = Path(__file__).resolve().parent.parent
N_SHARDS, PER_SHARD = 32, 5
KILL_AT = 7  # the victim run dies right after its 7th unit marker
MISSING = "img3_2.png"  # taken out of its shard after ingest: an annotate `missing_member` error


def drawing(seed: int) -> Image.Image:
    """A flat mid-grey page with a few coloured blocks: the fake detector finds a handful of boxes
    around them (on noise it finds a thousand, and their NMS would dominate the run)."""
    rng = np.random.default_rng(seed)
    pixels = np.full((384, 512, 3), 128, np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, 448), rng.integers(0, 320)
        pixels[y : y + rng.integers(16, 64), x : x + rng.integers(16, 64)] = rng.integers(0, 255, 3)
    return Image.fromarray(pixels)


def shard_members(s: int, per_shard: int = PER_SHARD) -> list[tuple[str, bytes]]:
    members = []
    for i in range(per_shard):
        members.append((f"img{s}_{i}.png", encode(drawing(s * 100 + i), "PNG")))
        members.append((f"img{s}_{i}.txt", f"1girl, tag_{s}_{i}".encode()))
    return members


def make_shards(folder: Path, n_shards: int = N_SHARDS, per_shard: int = PER_SHARD) -> None:
    folder.mkdir()
    for s in range(n_shards):
        write_tar(folder / f"shard-{s:03d}.tar", shard_members(s, per_shard))


def drop_member(folder: Path) -> None:
    """Rewrite shard 3 without one image, as if the shard changed after ingest."""
    members = [m for m in shard_members(3) if m[0] != MISSING]
    write_tar(folder / "shard-003.tar", members)


def annotate_process(ws: Path, models: Path, *options: str, **extra_env: str) -> subprocess.Popen:
    return booruset("annotate", "-w", str(ws), "--set", 'annotate.models=["cascade_face", "face"]',
                    "--set", f"annotate.models_dir={json.dumps(str(models))}", "--set", "annotate.draft_size=0",
                    *options, **extra_env)


def rows(ws: Workspace, table: str) -> list[tuple]:
    """Every row of the table, sorted, through the workspace's DuckDB views (as later jobs read it)."""
    cols = {"detections": "key, model, label, score, x0, y0, x1, y1",
            "embeddings": "key, crop, model, x0, y0, x1, y1, vector::float[]",
            "tag_scores": "key, tag, category, score, model",
            "errors": "key, source, member, stage, kind, message, dropped"}[table]
    return ws.connect().execute(f"select {cols} from {table} order by all").fetchall()


def test_killed_annotate_resumes_to_identical_tables(tmp_path):
    shards, models = tmp_path / "shards", face_model_dir(tmp_path / "models")
    make_shards(shards)
    ingest = booruset("ingest", "-w", str(tmp_path / "ingested"), "-i", str(shards))
    assert ingest.wait(timeout=900) == 0, ingest.stdout.read()
    drop_member(shards)
    for name in ("ref", "ws"):
        shutil.copytree(tmp_path / "ingested", tmp_path / name)

    reference = annotate_process(tmp_path / "ref", models)
    out, _ = reference.communicate(timeout=900)
    assert reference.returncode == 0, out

    victim = annotate_process(tmp_path / "ws", models, BOORUSET_KILL_AFTER_COMMITS=str(KILL_AT))
    out, _ = victim.communicate(timeout=900)
    assert victim.returncode == -signal.SIGKILL, out
    killed_at = len(list((tmp_path / "ws" / "state" / "annotate").glob("*.json")))
    assert killed_at == KILL_AT

    again = annotate_process(tmp_path / "ws", models)
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    assert f"{killed_at} done before, {N_SHARDS - killed_at} to run" in out, out

    ref, ws = Workspace(str(tmp_path / "ref")), Workspace(str(tmp_path / "ws"))
    for table in ("detections", "embeddings", "tag_scores", "errors"):
        assert rows(ws, table) == rows(ref, table), table
    detections = rows(ref, "detections")
    assert "face_detect_v1.4_s" in {d[1] for d in detections}
    assert len({d[0] for d in detections}) > N_SHARDS * PER_SHARD // 2  # most images have some detection
    assert [(e[2], e[4]) for e in rows(ref, "errors") if e[3] == "annotate"] == [(MISSING, "missing_member")]


TABLES = ("detections", "embeddings", "tag_scores", "errors")


def annotate_part_files(root: Path) -> dict[str, set[str]]:
    """The annotate part files on disk, per table."""
    return {t: {p.stem for p in (root / "tables" / t).glob("annotate-*.parquet")} for t in TABLES}


def test_annotate_killed_inside_a_unit_keeps_its_finished_batches(tmp_path):
    """A shard is one unit of thousands of images: a run killed half-way through one keeps the
    batches it finished (their markers), and the next run annotates only the rest of its images,
    ending with the rows of an uninterrupted run and no part file that no generation names."""
    shards, models = tmp_path / "shards", face_model_dir(tmp_path / "models")
    make_shards(shards, n_shards=3, per_shard=24)
    # ingest batches of 10: each annotate unit (a shard) reads its images from 3 `images` parts
    ingest = booruset("ingest", "-w", str(tmp_path / "ingested"), "-i", str(shards), "--set", "ingest.batch_samples=10")
    assert ingest.wait(timeout=900) == 0, ingest.stdout.read()
    assert len(list((tmp_path / "ingested" / "tables" / "images").glob("*.parquet"))) == 3 * 3
    for name in ("ref", "ws"):
        shutil.copytree(tmp_path / "ingested", tmp_path / name)
    # writers get 8 rows: 3 batches a unit
    small_batches = ("--set", "annotate.decode_batch_size=2", "--set", "annotate.write_batch_size=8")

    reference = annotate_process(tmp_path / "ref", models, *small_batches)
    out, _ = reference.communicate(timeout=900)
    assert reference.returncode == 0, out

    victim = annotate_process(tmp_path / "ws", models, *small_batches, BOORUSET_KILL_AFTER_BATCHES="2")
    out, _ = victim.communicate(timeout=900)
    assert victim.returncode == -signal.SIGKILL, out
    state = tmp_path / "ws" / "state" / "annotate"
    # the batches of units not committed (the kill may fall between a unit's marker and the
    # removal of its batch markers: those units are done, their batches no longer count)
    kept = sum(len(json.loads(p.read_text())["keys"]) for p in state.glob("batches/*/*.json")
               if not (state / f"{p.parent.name}.json").exists())
    assert kept, "the victim died before any batch marker"
    assert len(list(state.glob("*.json"))) < 3  # at least one unit was not committed
    shutil.copytree(tmp_path / "ws", tmp_path / "other")  # the killed run's state, for another set of models

    again = annotate_process(tmp_path / "ws", models, *small_batches)
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    resumed = re.search(r"\((\d+) of their images finished by a killed run\)", out)
    assert resumed, out
    assert int(resumed.group(1)) == kept

    ref, ws = Workspace(str(tmp_path / "ref")), Workspace(str(tmp_path / "ws"))
    for table in TABLES:
        assert rows(ws, table) == rows(ref, table), table
    assert len({d[0] for d in rows(ref, "detections")}) > 3 * 24 // 2
    assert not list(state.glob("batches/*/*.json"))  # the unit markers name their parts now
    published = ws.published()["tables"]
    assert annotate_part_files(tmp_path / "ws") == {
        t: {p for p in published.get(t, []) if p.startswith("annotate-")} for t in TABLES}

    # with another set of models the killed run's batches do not count: dropped with their parts
    face_only = ("--set", 'annotate.models=["face"]')
    other = annotate_process(tmp_path / "other", models, *small_batches, *face_only)
    out, _ = other.communicate(timeout=900)
    assert other.returncode == 0, out
    assert "finished by a killed run" not in out, out
    assert not list((tmp_path / "other" / "state" / "annotate").glob("batches/*/*.json"))
    other_ws = Workspace(str(tmp_path / "other"))
    mine, theirs = rows(other_ws, "detections"), rows(ref, "detections")
    face_rows = [d for d in theirs if d[1] == "face_detect_v1.4_s"]
    assert face_rows and [d for d in mine if d[1] == "face_detect_v1.4_s"] == face_rows
    assert not Counter(mine) - Counter(theirs)  # cascade rows only of the units the victim committed
    published = other_ws.published()["tables"]
    assert annotate_part_files(tmp_path / "other") == {
        t: {p for p in published.get(t, []) if p.startswith("annotate-")} for t in TABLES}


def test_batch_markers_that_no_longer_count_go_with_their_parts(tmp_path):
    """Of a killed run's batch markers, only those of this run's models and model files count,
    once per image: a marker of other models, of another file of the model (replaced at its path
    since), or one of images an earlier marker holds (a writer task Ray retried), is dropped with
    its parts, and a unit no longer pending loses its markers. A marker written before model
    files were stamped counts."""
    from jobs.annotate import finished_batches

    ws = Workspace(str(tmp_path / "ws"))
    ws.publish()  # a workspace that has published (ingest's), as any annotate run finds
    pipeline = {"face": "face_detect_v1.4_s"}
    box = {"model": "face_detect_v1.4_s", "index": 0, "label": "face", "score": 0.9,
           "x0": 0.1, "y0": 0.1, "x1": 0.5, "y1": 0.5}
    stamps, before = {"face": "0123456789abcdef"}, {"face": "fedcba9876543210"}
    batches = {"a": (pipeline, ["k1", "k2"], stamps), "b": (pipeline, ["k2", "k3"], stamps),  # b: k2 again
               "c": ({"face": "another_face_model"}, ["k4"], stamps), "d": (pipeline, ["k5"], None),
               "f": (pipeline, ["k6"], before)}
    for batch, (models, keys, files) in batches.items():
        ws.write_part("detections", f"annotate-u-face-{batch}", [{**box, "key": k} for k in keys])
        ws.commit_batch("annotate", "u", batch, {"parts": {"detections": [f"annotate-u-face-{batch}"]},
                                                 "info": {}, "pipeline": models, "keys": keys}
                        | ({"stamps": files} if files else {}))
    ws.write_part("detections", "annotate-gone-face-e", [{**box, "key": "k9"}])
    ws.commit_batch("annotate", "gone", "e", {"parts": {"detections": ["annotate-gone-face-e"]},
                                              "info": {}, "pipeline": pipeline, "keys": ["k9"]})
    assert ws.begin_job() == 0  # a start keeps the parts batch markers name

    kept = finished_batches(ws, [{"unit": "u", "rows": 7}], pipeline, stamps)

    assert [m["parts"]["detections"] for m in kept["u"]] == [["annotate-u-face-a"], ["annotate-u-face-d"]]
    assert sorted(ws.done_batches("annotate", "u")) == ["a", "d"] and ws.batch_units("annotate") == ["u"]
    on_disk = sorted(p.stem for p in (tmp_path / "ws" / "tables" / "detections").glob("*.parquet"))
    assert on_disk == ["annotate-u-face-a", "annotate-u-face-d"]


def test_a_killed_run_that_replaces_units_leaves_readers_the_old_rows(tmp_path):
    """A run whose face model changed (another version of it staged) replaces every unit's rows of
    that model; killed part way, the next job to publish (here the workspace's own publish, as any
    job's start does) shows the old rows, not a mix of the two models; the run done again shows
    only the new ones."""
    shards, models = tmp_path / "shards", face_model_dir(tmp_path / "models")
    face = next(models.glob("*/*/face_detect_v1.4_s"))
    shutil.copytree(face, face.parent / "face_detect_v1.4_n")  # the same fake: the same boxes
    make_shards(shards, n_shards=6)
    ws_path = tmp_path / "ws"
    ingest = booruset("ingest", "-w", str(ws_path), "-i", str(shards))
    assert ingest.wait(timeout=900) == 0, ingest.stdout.read()
    first = annotate_process(ws_path, models)
    assert first.wait(timeout=900) == 0, first.stdout.read()
    before = rows(Workspace(str(ws_path)), "detections")
    assert {d[1] for d in before} == {"face_detect_v1.4_s"}

    newer = ("--set", 'annotate.face.file="face_detect_v1.4_n/model.onnx"')
    victim = annotate_process(ws_path, models, *newer, BOORUSET_KILL_AFTER_COMMITS="2")
    out, _ = victim.communicate(timeout=900)
    assert victim.returncode == -signal.SIGKILL, out
    ws = Workspace(str(ws_path))
    ws.publish()
    assert rows(ws, "detections") == before

    again = annotate_process(ws_path, models, *newer)
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    after = rows(Workspace(str(ws_path)), "detections")
    assert after == sorted((d[0], "face_detect_v1.4_n", *d[2:]) for d in before)


def test_resume_holds_one_units_keys_at_a_time(tmp_path, monkeypatch):
    """A killed run's batch markers each name their images' keys (a million at a million
    images): the driver checks them one unit at a time, keeps none (the markers it plans with
    come without them, counted by info["images"]) and caches none; duplicates are still found."""
    import gc

    import store.workspace
    from jobs.annotate import finished_batches

    class Keys(list):
        """A marker's keys, counted while any of them is alive."""

        live = 0

        def __init__(self, keys: list[str]) -> None:
            super().__init__(keys)
            Keys.live += len(self)

        def __del__(self) -> None:
            Keys.live -= len(self)

    monkeypatch.setattr(store.workspace, "MARKER_SETTLED_S", -1.0)  # each marker read is one to cache
    ws = Workspace(str(tmp_path / "ws"))
    ws.publish()
    pipeline, stamps = {"face": "face_detect_v1.4_s"}, {"face": "0123456789abcdef"}
    units = [f"u{i}" for i in range(4)]
    for unit in units:
        for batch in range(3):
            keys = [f"{unit}-k{batch * 10 + i}" for i in range(10)]
            info = {"images": len(keys), "dropped": 0, "rows": {}, "error_kinds": {}}
            ws.commit_batch("annotate", unit, f"b{batch}", {"parts": {}, "info": info, "pipeline": pipeline,
                                                           "stamps": stamps, "keys": keys})
    ws.commit_batch("annotate", "u0", "b9", {"parts": {}, "info": {"images": 1}, "pipeline": pipeline,
                                             "stamps": stamps, "keys": ["u0-k5"]})  # a retried writer's
    ws.begin_job()
    peak = []
    done_batches = Workspace.done_batches

    def spy(self, job: str, unit: str) -> dict[str, dict]:
        gc.collect()
        peak.append(Keys.live)  # the keys the driver still holds when it reads the next unit's
        markers = done_batches(self, job, unit)
        for marker in markers.values():
            marker["keys"] = Keys(marker["keys"])
        return markers

    monkeypatch.setattr(Workspace, "done_batches", spy)
    kept = finished_batches(ws, [{"unit": u, "rows": 40} for u in units], pipeline, stamps)
    gc.collect()
    assert Keys.live == 0 and max(peak) <= 31  # one unit's keys at most, none after
    assert {u: sum(m["info"]["images"] for m in found) for u, found in kept.items()} == dict.fromkeys(units, 30)
    assert sorted(ws.done_batches("annotate", "u0")) == ["b0", "b1", "b2"]
    assert not [folder for folder in ws._marker_cache if "/batches/" in folder]
