"""annotate follows what ingest holds: a folder that grew is annotated again (its new images get
rows), and the rows of its earlier content are not kept beside the new ones."""

from __future__ import annotations

import json
import tarfile
from collections import defaultdict

import numpy as np
import pytest

from jobs import annotate, ingest
from jobs.config import load_config
from schemas import CCIP_DIM
from store.workspace import Workspace
from tests.conftest import SAMPLE_SHARDS
from tests.hostile_data import write_tar

pytestmark = pytest.mark.usefixtures("ray_local")


def sample_pngs(count: int) -> list[tuple[str, bytes]]:
    """The first `count` images of the bundled sample (the cascade finds faces in them)."""
    found = []
    for shard in sorted(SAMPLE_SHARDS.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".png") and len(found) < count:
                    found.append((f"{len(found):02d}_{member.name.rsplit('/', 1)[-1]}", tar.extractfile(member).read()))
    if len(found) < count:
        pytest.skip("bundled sample shards missing")
    return found


def annotated(ws_path, folder, *overrides: str) -> tuple[object, list[tuple]]:
    cfg = load_config(None, [f'workspace.path="{ws_path}"', f'ingest.inputs=["{folder}"]', "ray.num_cpus=2",
                             'annotate.models=["cascade_face"]', *overrides])
    ws = Workspace(str(ws_path))
    ingest.run(cfg, ws)
    summary = annotate.run(cfg, ws)
    rows = ws.connect().execute("select key, label, score, x0, y0, x1, y1 from detections order by all").fetchall()
    return summary, rows


def test_a_grown_folder_is_annotated_again_without_stale_rows(tmp_path):
    images = sample_pngs(6)
    folder = tmp_path / "art"
    folder.mkdir()
    for name, data in images[:4]:
        (folder / name).write_bytes(data)
    first, _ = annotated(tmp_path / "ws", folder)
    assert first.units_done == 1

    for name, data in images[4:]:
        (folder / name).write_bytes(data)
    again, rows = annotated(tmp_path / "ws", folder)
    assert again.units_done == 1 and again.rows_in == 6

    _, fresh = annotated(tmp_path / "fresh", folder)  # one run over the grown folder
    assert rows == fresh and {r[0] for r in rows} & {f"art/{n.rsplit('.', 1)[0]}" for n, _ in images[4:]}


def test_a_model_added_later_leaves_the_earlier_rows_once(tmp_path):
    """annotate with one model, then with two: the unit is run again with both, and the first
    model's rows are replaced, not kept beside the new ones (equal to one run with both)."""
    from tests.onnx_fakes import face_model_dir

    folder = tmp_path / "art"
    folder.mkdir()
    for name, data in sample_pngs(4):
        (folder / name).write_bytes(data)
    models = face_model_dir(tmp_path / "models")

    def run(ws_path, names: str):
        cfg = load_config(None, [f'workspace.path="{ws_path}"', f'ingest.inputs=["{folder}"]', "ray.num_cpus=2",
                                 f"annotate.models={names}", f'annotate.models_dir="{models}"'])
        ws = Workspace(str(ws_path))
        ingest.run(cfg, ws)
        annotate.run(cfg, ws)
        return ws.connect().execute("select key, model, label, score from detections order by all").fetchall()

    first = run(tmp_path / "ws", '["cascade_face"]')
    both = run(tmp_path / "ws", '["cascade_face", "face"]')
    assert both == run(tmp_path / "fresh", '["cascade_face", "face"]')
    assert {r[1] for r in both} == {"lbpcascade_animeface", "face_detect_v1.4_s"}
    assert [r for r in both if r[1] == "lbpcascade_animeface"] == first


def test_options_that_change_a_models_rows_run_it_again(tmp_path):
    """The cascade's min_size is part of what was run: changed, the units run again and the rows
    are those of one run with it (they were the old ones: the units counted as done); back to
    the default, the rows are the first ones again."""
    folder = tmp_path / "art"
    folder.mkdir()
    for name, data in sample_pngs(4):
        (folder / name).write_bytes(data)
    _, default = annotated(tmp_path / "ws", folder)
    again, larger = annotated(tmp_path / "ws", folder, "annotate.cascade_face.min_size=200")
    assert again.units_done == 1
    _, fresh = annotated(tmp_path / "fresh", folder, "annotate.cascade_face.min_size=200")
    assert larger == fresh and len(larger) < len(default)
    assert annotated(tmp_path / "ws", folder)[1] == default


def test_the_summary_counts_the_rows_a_unit_keeps_from_models_not_run_again(tmp_path):
    """Units annotated with two models, then run again with one of them (an option changed, the
    other model left out of annotate.models): the unit keeps the other model's rows, and the
    summaries count them. They counted only the rerun model's: 'detections 3' over a table of
    1,339, on that run and on every run after it that skipped the unit."""
    from tests.onnx_fakes import face_model_dir

    folder = tmp_path / "art"
    folder.mkdir()
    for name, data in sample_pngs(4):
        (folder / name).write_bytes(data)
    models = face_model_dir(tmp_path / "models")
    ws_path = tmp_path / "ws"

    def run(*overrides: str):
        cfg = load_config(None, [f'workspace.path="{ws_path}"', f'ingest.inputs=["{folder}"]', "ray.num_cpus=2",
                                 f'annotate.models_dir="{models}"', *overrides])
        ws = Workspace(str(ws_path))
        ingest.run(cfg, ws)
        summary = annotate.run(cfg, ws)
        tables = {t: ws.connect().execute(f"select count(*) from {t}").fetchone()[0]
                  for t in ("detections", "embeddings", "tag_scores")}
        return summary, tables

    both, tables = run('annotate.models=["cascade_face", "face"]')
    assert both.rows_out == tables and tables["detections"] > 0
    cascade = ['annotate.models=["cascade_face"]', "annotate.cascade_face.min_size=32"]
    again, tables = run(*cascade)
    assert again.units_done == 1
    kept = Workspace(str(ws_path)).connect().execute(
        "select count(*) from detections where model = 'face_detect_v1.4_s'").fetchone()[0]
    assert kept > 0 and again.rows_out == tables
    skipped, tables = run(*cascade)
    assert skipped.units_done == 0 and skipped.rows_out == tables


def test_a_source_rewritten_since_ingest_is_not_annotated_as_the_image_ingest_saw(tmp_path):
    """Files replaced after ingest (another picture; one cut short) are missing_member errors
    rows naming the cause, as export, the report and the review page refuse them (a member not
    of the size ingest saw, images.bytes): annotate gave the other picture's boxes to the key
    whose images row (width, height, sha256) is the first one's, and called the cut one
    undecodable."""
    images = sample_pngs(3)
    folder = tmp_path / "art"
    folder.mkdir()
    for name, data in images:
        (folder / name).write_bytes(data)
    cfg = load_config(None, [f'workspace.path="{tmp_path / "ws"}"', f'ingest.inputs=["{folder}"]', "ray.num_cpus=2",
                             'annotate.models=["cascade_face"]'])
    ws = Workspace(str(tmp_path / "ws"))
    ingest.run(cfg, ws)
    (folder / images[0][0]).write_bytes(images[2][1])  # another picture under the first one's name
    (folder / images[1][0]).write_bytes(images[1][1][: len(images[1][1]) // 2])  # cut short
    summary = annotate.run(cfg, ws)
    keys = [f"art/{name.rsplit('.', 1)[0]}" for name, _ in images]
    con = ws.connect()
    errors = con.execute("select key, kind, message from errors where stage = 'annotate' order by key").fetchall()
    assert [(k, kind) for k, kind, _ in errors] == [(keys[0], "missing_member"), (keys[1], "missing_member")]
    assert all("not of the size ingest saw" in message for _, _, message in errors)
    assert {k for (k,) in con.execute("select distinct key from detections").fetchall()} == {keys[2]}
    assert summary.errors_by_kind == {"missing_member": 2}


def test_a_changed_option_runs_only_its_model_again(tmp_path):
    """The cascade's min_size changed: only the cascade runs again; the face model's parts stay
    the ones it wrote (every model ran again: a detector's threshold re-ran the tagger over the
    whole collection, hours on a CPU), and the tables equal one run with the new option."""
    from tests.onnx_fakes import face_model_dir

    folder = tmp_path / "art"
    folder.mkdir()
    for name, data in sample_pngs(4):
        (folder / name).write_bytes(data)
    models = face_model_dir(tmp_path / "models")

    def run(ws_path, *overrides: str):
        cfg = load_config(None, [f'workspace.path="{ws_path}"', f'ingest.inputs=["{folder}"]', "ray.num_cpus=2",
                                 'annotate.models=["cascade_face", "face"]', f'annotate.models_dir="{models}"',
                                 *overrides])
        ws = Workspace(str(ws_path))
        ingest.run(cfg, ws)
        summary = annotate.run(cfg, ws)
        (marker,) = ws.done_units("annotate").values()
        rows = ws.connect().execute("select key, model, label, score, x0, y0, x1, y1 from detections order by all")
        return summary, marker, rows.fetchall()

    _, before, _ = run(tmp_path / "ws")
    summary, after, rows = run(tmp_path / "ws", "annotate.cascade_face.min_size=200")
    assert summary.units_done == 1

    def parts(marker: dict, name: str) -> list[str]:
        return [p for p in marker["parts"]["detections"] if f"-{name}-" in p]

    assert parts(after, "face") == parts(before, "face")
    assert parts(after, "cascade_face") != parts(before, "cascade_face")
    assert after["models"] == sorted(["face_detect_v1.4_s", "lbpcascade_animeface@min_size=200"])
    _, fresh_marker, fresh = run(tmp_path / "fresh", "annotate.cascade_face.min_size=200")
    assert rows == fresh and after["rows"] == fresh_marker["rows"]
    assert summary.rows_out == {t: fresh_marker["rows"].get(t, 0) for t in ("detections", "embeddings", "tag_scores")}


def test_a_models_rate_is_over_the_images_it_ran_on():
    """One unit's marker has the face model's time (10 images in 5 s), the other's not (only the
    cascade ran on it again): the face model ran 2.0 images/s, not the 4.0 that all 20 images
    over its 5 s said."""
    from jobs.summary import JobSummary

    def info(seconds: dict) -> dict:
        return {"images": 10, "dropped": 0, "error_kinds": {}, "rows": {}, "model_seconds": seconds,
                "providers": {m: "CPUExecutionProvider" for m in seconds}, "nodes": {m: ["n"] for m in seconds}}

    summary = JobSummary("annotate")
    annotate._fill_summary(summary, [info({"face": 5.0, "cascade": 1.0}), info({"cascade": 1.0})], {})
    assert summary.rows_in == 20
    assert any(n.startswith("face: ") and n.endswith("2.0 images/s of model time") for n in summary.notes)
    assert any(n.startswith("cascade: ") and n.endswith("10.0 images/s of model time") for n in summary.notes)


def test_a_model_failing_on_most_images_fails_the_job():
    """model_failed rows keep their images (the other models' rows stay), so they never counted
    towards ray.max_error_rate: a tagger that failed on every image let `booruset run` go on to
    export every image untagged, exit 0. Its share of failures now counts."""
    from jobs.summary import JobSummary

    def info(failed: int, dropped: int = 0) -> dict:
        by_model = {"tagger": {"rows": {}, "error_kinds": {"model_failed": failed} if failed else {}},
                    "face": {"rows": {"detections": 10}, "error_kinds": {}}}
        return {"images": 10, "dropped": dropped, "error_kinds": {"model_failed": failed}, "rows": {},
                "model_seconds": {}, "providers": {}, "nodes": {}, "by_model": by_model}

    summary = JobSummary("annotate")
    annotate._fill_summary(summary, [info(8, dropped=2), info(10)], {})
    assert summary.error_rate == 1.0 and summary.dropped == 2
    assert "tagger: failed on 18 of the 18 images it ran on (model_failed)" in summary.notes
    healthy = JobSummary("annotate")
    annotate._fill_summary(healthy, [info(1), info(0)], {})
    assert healthy.error_rate == 0.05


def test_the_person_crops_tie_the_person_detector_ccip_and_the_tagger():
    """Which models a changed identity runs again: the face model alone; the person detector
    with CCIP and the tagger (their crops are cut from its boxes); CCIP or the tagger with the
    person detector (this run's boxes to cut from); every model for a unit never annotated."""
    specs = {name: {"identity": name, "person_crops": True, "stamp": "s"} for name in ("face", "person", "ccip",
                                                                                         "tagger")}
    marker = {"pipeline": {name: name for name in specs}}

    def rerun(changed: str, pending=({"unit": "u"},), done=None) -> set[str]:
        now = {name: {**spec, "identity": name + "@x" if name == changed else name} for name, spec in specs.items()}
        return set(annotate.models_to_run(now, list(pending), {"u": marker} if done is None else done, {}))

    assert rerun("face") == {"face"}
    assert rerun("person") == {"person", "ccip", "tagger"}
    assert rerun("ccip") == {"ccip", "person"} and rerun("tagger") == {"tagger", "person"}
    assert rerun("", done={}) == set(specs) and rerun("face", pending=()) == set()
    specs["tagger"]["person_crops"] = False
    assert rerun("person") == {"person", "ccip"} and rerun("tagger") == {"tagger"}


def test_a_crop_failed_row_stays_while_the_crops_it_explains_stay():
    """A unit run again for the cascade alone keeps the person detector's and CCIP's parts, so the
    image whose person crops could not be cut still lacks their embeddings; its crop_failed errors
    row was in the decode part, which every run replaces, so the row (and its count) was gone."""
    from udfs.annotate.annotate_parts import UnitTables

    row = {"unit": "u", "key": "a", "source": "s", "member": "a.png", "ok": True, "decode_error": "",
           "width": 300, "height": 400, "crop_boxes": "[]", "crop_error": "person crops not cut: OSError: truncated",
           "out_person": json.dumps([[10, 20, 200, 300, "person", 0.9]]),
           "out_ccip": np.zeros((1, CCIP_DIM), np.float32).tobytes()}
    for name in ("person", "ccip"):
        row |= {f"out_{name}_provider": "cpu", f"out_{name}_node": "n", f"out_{name}_seconds": 0.1,
                f"out_{name}_error": ""}
    tables = UnitTables({"person": "person_v1", "ccip": "ccip_v1"}, [row])
    first = {(table, name): f"annotate-u-{name}-t1" for (table, name), rows in tables.parts.items() if rows}
    info = tables.info()
    previous = {"pipeline": {"person": "person_v1", "ccip": "ccip_v1", "cascade_face": "cascade"},
                "parts": {t: sorted(p for (table, _), p in first.items() if table == t) for t in ("detections",
                                                                                          "embeddings", "errors")},
                "by_model": info["by_model"], "rows": info["rows"], "error_kinds": info["error_kinds"]}
    committed = {}

    class Store:
        def commit_unit(self, job, unit, info, parts):
            committed.update(info=info, parts=parts)

        def forget_batches(self, job, unit):
            pass

        def publish_now_and_then(self):
            pass

    pipeline = annotate.Pipeline({"annotate": {}}, Store(),
                                 {"cascade_face": {"identity": "cascade@min_size=200", "stamp": "s"}}, {"u": previous})
    pipeline.commit("u", defaultdict(set), {"images": 1, "rows": {}, "error_kinds": {}, "by_model": {}})
    assert committed["parts"].get("errors") == previous["parts"]["errors"]
    assert committed["info"]["error_kinds"] == {"crop_failed": 1}


def test_another_label_file_tags_again(tmp_path):
    """The tagger's scores are named by its label file (annotate.tagger.labels_file): another one
    of the same length (tags renamed) left every unit as done, tag_scores keeping the old names
    while curate read categories from the new file. Now the tagger runs again, its rows those of
    one run with the new file; back to the model's own file, the first rows again."""
    from tests.onnx_fakes import LABELS_REPO, tagger_model

    folder = tmp_path / "art"
    folder.mkdir()
    for name, data in sample_pngs(2):
        (folder / name).write_bytes(data)
    models = tmp_path / "models"
    tagger_model(models / "deepghs/wd14_tagger_with_embeddings/SmilingWolf/wd-swinv2-tagger-v3/model.onnx", 6)
    names = ["general", "sensitive", "1girl", "solo", "smile", "hat"]
    for file, prefix in (("selected_tags.csv", ""), ("renamed_tags.csv", "new_")):
        rows = [f"{i},{n if i < 2 else prefix + n},{9 if i < 2 else 0},10" for i, n in enumerate(names)]
        (models / LABELS_REPO).mkdir(parents=True, exist_ok=True)
        (models / LABELS_REPO / file).write_text("tag_id,name,category,count\n" + "\n".join(rows) + "\n")

    def run(ws_path, *overrides: str):
        cfg = load_config(None, [f'workspace.path="{ws_path}"', f'ingest.inputs=["{folder}"]', "ray.num_cpus=2",
                                 'annotate.models=["tagger"]', f'annotate.models_dir="{models}"',
                                 "annotate.tagger.score_floor=0.0", *overrides])
        ws = Workspace(str(ws_path))
        ingest.run(cfg, ws)
        summary = annotate.run(cfg, ws)
        return summary, ws.connect().execute("select key, crop, tag, category, score from tag_scores "
                                             "order by all").fetchall()

    renamed = 'annotate.tagger.labels_file="renamed_tags.csv"'
    _, first = run(tmp_path / "ws")
    again, rows = run(tmp_path / "ws", renamed)
    assert again.units_done == 1
    assert rows == run(tmp_path / "fresh", renamed)[1] and {r[2] for r in rows} >= {"new_1girl", "new_hat"}
    back, rows = run(tmp_path / "ws")
    assert back.units_done == 1 and rows == first


def face_run(folder, models, ws_path, *overrides: str) -> tuple[object, list[tuple]]:
    """ingest + annotate with the cascade and the face model of `models`: the summary, the detections."""
    cfg = load_config(None, [f'workspace.path="{ws_path}"', f'ingest.inputs=["{folder}"]', "ray.num_cpus=2",
                             'annotate.models=["cascade_face", "face"]', f'annotate.models_dir="{models}"',
                             *overrides])
    ws = Workspace(str(ws_path))
    ingest.run(cfg, ws)
    summary = annotate.run(cfg, ws)
    return summary, ws.connect().execute("select key, model, label, score, x0, y0, x1, y1 from detections "
                                         "order by all").fetchall()


def art_and_face_models(tmp_path, n: int) -> tuple:
    """A folder of n sample PNGs, a models_dir with the face detector, and its DETECTORS entry
    (repo, model folder, label, batch)."""
    from tests.onnx_fakes import DETECTORS, face_model_dir

    folder = tmp_path / "art"
    folder.mkdir()
    for name, data in sample_pngs(n):
        (folder / name).write_bytes(data)
    return folder, face_model_dir(tmp_path / "models"), DETECTORS["face"]


def test_a_model_file_replaced_at_its_path_runs_again(tmp_path):
    """A staged model replaced at the same path by another one (a newer main fetched over it, other
    weights): the units kept the old model's boxes, every unit counted as done. Now the model
    runs again (it alone) and its rows are those of one run with the new file; run once more, or
    with the same files staged in another folder (new mtimes), nothing runs. Another repository's
    file of the same path (annotate.face.repo: the model's name and identity leave it out) runs it
    again too."""
    import shutil

    from tests.onnx_fakes import yolo_model

    folder, models, (repo, model_folder, label, batch) = art_and_face_models(tmp_path, 4)
    ws = tmp_path / "ws"

    def cascade_parts() -> list[str]:
        (marker,) = Workspace(str(ws)).done_units("annotate").values()
        return [p for p in marker["parts"]["detections"] if "-cascade_face-" in p]

    _, old = face_run(folder, models, ws)
    before = cascade_parts()
    yolo_model(models / repo / model_folder / "model.onnx", label, batch, seed=7)  # the newer weights
    again, rows = face_run(folder, models, ws)
    assert again.units_done == 1 and cascade_parts() == before
    assert "model files replaced since units were annotated: face (run again on them)" in again.notes
    _, fresh = face_run(folder, models, tmp_path / "fresh")
    assert rows == fresh and rows != old
    assert face_run(folder, models, ws)[0].units_done == 0
    staged = shutil.copytree(models, tmp_path / "staged")
    assert face_run(folder, staged, ws)[0].units_done == 0
    # the same file in another repository (annotate.face.repo, which the model's name leaves out)
    fork = "someone/anime_face_detection"
    shutil.copytree(staged / repo, staged / fork)
    yolo_model(staged / fork / model_folder / "model.onnx", label, batch, seed=3)
    forked = f'annotate.face.repo="{fork}"'
    again, rows = face_run(folder, staged, ws, forked)
    assert again.units_done == 1 and rows == face_run(folder, staged, tmp_path / "fork", forked)[1]


def test_units_marked_before_model_files_were_stamped_count_as_unchanged(tmp_path):
    """A workspace annotated by a version that kept no stamps (markers without them, no state of
    the files) is not annotated again; a model file replaced after that run is."""
    from tests.onnx_fakes import yolo_model

    folder, models, (repo, model_folder, label, batch) = art_and_face_models(tmp_path, 2)
    ws_path = tmp_path / "ws"
    _, old = face_run(folder, models, ws_path)
    for marker in (ws_path / "state" / "annotate").glob("*.json"):  # as the earlier version wrote them
        info = json.loads(marker.read_text())
        assert info.pop("stamps")
        marker.write_text(json.dumps(info))
    (ws_path / annotate.FILES_STATE).unlink()

    upgraded, rows = face_run(folder, models, ws_path)
    assert upgraded.units_done == 0 and rows == old
    yolo_model(models / repo / model_folder / "model.onnx", label, batch, seed=7)
    again, rows = face_run(folder, models, ws_path)
    assert again.units_done == 1 and rows == face_run(folder, models, tmp_path / "fresh")[1] != old


def test_a_tagger_or_label_file_replaced_at_its_path_tags_again(tmp_path):
    """The tagger's model file, then its own selected_tags.csv, replaced in place (a newer version
    of each): tag_scores follow each, as one run with the new files has them."""
    from tests.onnx_fakes import LABELS_REPO, TAGGER_FILE, TAGGER_REPO, tagger_model

    folder = tmp_path / "art"
    folder.mkdir()
    for name, data in sample_pngs(2):
        (folder / name).write_bytes(data)
    models = tmp_path / "models"
    names = ["general", "sensitive", "1girl", "solo", "smile", "hat"]

    def stage(seed: int, prefix: str) -> None:
        tagger_model(models / TAGGER_REPO / TAGGER_FILE, len(names), seed=seed)
        rows = [f"{i},{n if i < 2 else prefix + n},{9 if i < 2 else 0},10" for i, n in enumerate(names)]
        (models / LABELS_REPO).mkdir(parents=True, exist_ok=True)
        (models / LABELS_REPO / "selected_tags.csv").write_text("tag_id,name,category,count\n" + "\n".join(rows) + "\n")

    def run(ws_path):
        cfg = load_config(None, [f'workspace.path="{ws_path}"', f'ingest.inputs=["{folder}"]', "ray.num_cpus=2",
                                 'annotate.models=["tagger"]', f'annotate.models_dir="{models}"',
                                 "annotate.tagger.score_floor=0.0"])
        ws = Workspace(str(ws_path))
        ingest.run(cfg, ws)
        summary = annotate.run(cfg, ws)
        return summary, ws.connect().execute("select key, crop, tag, category, score from tag_scores "
                                             "order by all").fetchall()

    stage(0, "")
    _, first = run(tmp_path / "ws")
    for seed, prefix, fresh in ((1, "", "fresh1"), (1, "new_", "fresh2")):
        stage(seed, prefix)
        again, rows = run(tmp_path / "ws")
        assert again.units_done == 1 and rows == run(tmp_path / fresh)[1] != first
        first = rows
    assert {r[2] for r in rows} >= {"new_1girl"}



def test_ccip_crop_options_count_only_with_the_person_detector(tmp_path):
    """Without the person detector CCIP cuts no crops: its crop options change none of its rows,
    and changing them ran CCIP over every unit again (GPU time for the same embeddings)."""
    from tests.onnx_fakes import CCIP_FILE, CCIP_REPO, ccip_model

    folder = tmp_path / "art"
    folder.mkdir()
    for name, data in sample_pngs(2):
        (folder / name).write_bytes(data)
    models = tmp_path / "models"
    ccip_model(models / CCIP_REPO / CCIP_FILE)

    def run(*overrides: str):
        cfg = load_config(None, [f'workspace.path="{tmp_path / "ws"}"', f'ingest.inputs=["{folder}"]',
                                 "ray.num_cpus=2", 'annotate.models=["ccip"]', f'annotate.models_dir="{models}"',
                                 *overrides])
        ws = Workspace(str(tmp_path / "ws"))
        ingest.run(cfg, ws)
        return annotate.run(cfg, ws)

    assert run().units_done == 1
    assert run("annotate.ccip.crop_padding=0.2", "annotate.ccip.max_crops=2").units_done == 0
    opts = load_config(None, ["annotate.ccip.crop_padding=0.2"])["annotate"]  # the person detector among them
    assert annotate.model_identity("ccip", {**opts["ccip"], "model": "ccip"}, opts) == "ccip@crop_padding=0.2"


def test_a_model_file_is_read_again_only_when_it_changed(tmp_path):
    """The digest of a model file (hundreds of MB, often on shared storage) is kept with the stat
    it was read at: the next run takes it as it is while the stat is the same, digests the file
    again once it changed, and forgets files no longer there."""
    ws = Workspace(str(tmp_path / "ws"))
    model, gone = tmp_path / "model.onnx", tmp_path / "gone.onnx"
    model.write_bytes(b"weights")
    gone.write_bytes(b"other weights")

    def stamp(*files, workspace=ws) -> str:
        specs = {"face": {"files": [str(f) for f in files]}}
        annotate.model_stamps(workspace, specs)
        return specs["face"]["stamp"]

    stamp(model, gone)
    state = ws.read_json(annotate.FILES_STATE)
    state["digests"][str(model)][-1] = "0" * 64  # what a read of the file would not give
    ws.write_json(annotate.FILES_STATE, state)
    gone.unlink()
    read = stamp(model, workspace=Workspace(str(tmp_path / "other")))
    cached = stamp(model)
    assert cached != read and cached == stamp(model)
    model.write_bytes(b"newer weights")
    assert stamp(model) not in (read, cached)
    assert set(ws.read_json(annotate.FILES_STATE)["digests"]) == {str(model)}


def test_units_an_ingest_was_replacing_when_killed_are_annotated_as_they_were(tmp_path, monkeypatch):
    """An ingest killed while it replaces units of input y (a shard written again) leaves y's old
    rows published (the hold) and their markers retired. Every annotate run after it (here after
    an ingest of another input, x) saw those held `images` parts as parts no marker claims: units
    of their own, named by part, so it ran the models on y's old images again (or moved their
    rows) and retired y's annotate units, and once y's ingest ended it moved them again. Now
    they are the ingest units they were: nothing runs or moves until y's ingest ends, also after
    a second run of it that stops before its end; then the rows are those of one uninterrupted run."""
    from tests.kill_mid_run import booruset
    from tests.onnx_fakes import face_model_dir

    images = sample_pngs(6)
    x, y, models = tmp_path / "x", tmp_path / "y", face_model_dir(tmp_path / "models")
    x.mkdir()
    y.mkdir()
    (x / images[0][0]).write_bytes(images[0][1])
    write_tar(y / "y0.tar", images[1:3])
    write_tar(y / "y1.tar", images[3:5])

    def config(ws_path, *inputs):
        quoted = ", ".join(f'"{i}"' for i in inputs)
        return load_config(None, [f'workspace.path="{ws_path}"', f"ingest.inputs=[{quoted}]", "ray.num_cpus=2",
                                  'annotate.models=["cascade_face", "face"]', f'annotate.models_dir="{models}"'])

    def state(ws: Workspace) -> tuple[dict, list[tuple]]:
        rows = ws.connect().execute("select key, model, label, score, x0, y0, x1, y1 from detections "
                                    "order by all").fetchall()
        return ws.done_units("annotate"), rows

    ws_path = tmp_path / "ws"
    ws = Workspace(str(ws_path))
    ingest.run(config(ws_path, x, y), ws)
    annotate.run(config(ws_path, x, y), ws)
    before = state(ws)
    assert len(before[0]) == 3 and before[1]

    write_tar(y / "y1.tar", images[3:6])  # y1 written again, an image added: its unit is replaced
    killed = booruset("ingest", "-w", str(ws_path), "-i", str(y), BOORUSET_KILL_AFTER_COMMITS="1")
    out, _ = killed.communicate(timeout=300)
    assert killed.returncode == -9, out  # right after y1's old unit was retired
    ingest.run(config(ws_path, x), Workspace(str(ws_path)))
    ws = Workspace(str(ws_path))
    again = annotate.run(config(ws_path, x, y), ws)
    assert again.units_done == 0 and again.rows_run == 0 and again.units_skipped == 3
    assert state(ws) == before

    # a second run of y stops after it committed y1's new unit, before its end
    def stopped(self, job: str, planned=None) -> None:
        raise KeyboardInterrupt("killed")

    release_hold = Workspace.release_hold
    monkeypatch.setattr(Workspace, "release_hold", stopped)
    with pytest.raises(KeyboardInterrupt):
        ingest.run(config(ws_path, y), Workspace(str(ws_path)))
    monkeypatch.setattr(Workspace, "release_hold", release_hold)
    ws = Workspace(str(ws_path))
    assert sum(not m.get("retired") for m in ws.done_units("ingest").values() if m["input"] == "y") == 2
    again = annotate.run(config(ws_path, x, y), ws)
    assert again.units_done == 0 and again.rows_run == 0 and state(ws) == before

    ingest.run(config(ws_path, y), Workspace(str(ws_path)))  # y's ingest ends
    ws = Workspace(str(ws_path))
    last = annotate.run(config(ws_path, x, y), ws)
    assert last.units_done == 1 and last.rows_run == 1  # y1's added image; its other two keep their rows
    assert ws.holds() == {}
    fresh = Workspace(str(tmp_path / "fresh"))
    ingest.run(config(tmp_path / "fresh", x, y), fresh)
    annotate.run(config(tmp_path / "fresh", x, y), fresh)
    assert state(ws)[1] == state(fresh)[1]
