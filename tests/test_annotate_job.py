"""annotate end to end on the bundled sample: ingest, then every model through Ray Data actor pools.

Models: the bundled cascade face detector (real) and the tiny fakes with production contracts
(tests/onnx_fakes.py) staged in annotate.models_dir, as on an offline cluster.
"""

from __future__ import annotations

import pytest

from tests.conftest import SAMPLE_SHARDS, shared_path
from tests.onnx_fakes import build_models_dir


def _rows(ws, table: str) -> list[tuple]:
    con = ws.connect()
    cols = {"detections": "key, model, index, label, score, x0, y0, x1, y1",
            "embeddings": "key, crop, model, x0, y0, x1, y1, vector::float[]",
            "tag_scores": "key, crop, tag, category, score, model",
            "errors": "key, stage, kind"}[table]
    return con.execute(f"select {cols} from {table} order by all").fetchall()


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return str(build_models_dir(tmp_path_factory.mktemp("models"), shared_path("tagdata", "wd_v3_selected_tags.csv")))


@pytest.fixture
def ingested(config, workspace, ray_local):
    from jobs import ingest

    if not list(SAMPLE_SHARDS.glob("*.tar")):
        pytest.skip("bundled sample shards missing")
    ingest.run(config, workspace)
    return config, workspace


def test_annotate_sample_every_model_and_resume(ingested, models_dir):
    from jobs import annotate
    from jobs.config import merge

    cfg, ws = ingested
    # decode batches of 1 image: the writer still takes a unit's rows in one batch (write_batch_size)
    merge(cfg, {"annotate": {"models_dir": models_dir, "draft_size": 256, "decode_batch_size": 1}})
    summary = annotate.run(cfg, ws)
    assert summary.rows_in == 24 and summary.errors == 0 and summary.units_done == 3
    for unit, marker in ws.done_units("annotate").items():  # one part per table and model, not per decode batch
        for table, parts in marker["parts"].items():
            assert len({annotate.part_pipeline_name(p, unit) for p in parts}) == len(parts), (table, parts)
    con = ws.connect()
    per_model = dict(con.execute("select model, count(*) from detections group by 1").fetchall())
    assert set(per_model) == {"lbpcascade_animeface", "face_detect_v1.4_s", "head_detect_v2.0_s",
                              "person_detect_v1.1_m"}
    # the real cascade finds the sprites' faces (12 of 13; it misses a Lucy) and none on backgrounds
    faces = dict(con.execute("""select i.key, count(d.key) from images i left join detections d
                                on d.key = i.key and d.model = 'lbpcascade_animeface' group by 1""").fetchall())
    assert sum(n > 0 for k, n in faces.items() if "/sylvie" in k or "/eileen" in k or "/lucy" in k) >= 12
    assert sum(n for k, n in faces.items() if "/bg_" in k) == 0
    assert con.execute("select min(least(x0, y0)) >= 0 and max(greatest(x1, y1)) <= 1 from detections").fetchone()[0]
    # one whole-image CCIP vector per image, plus one per kept person crop
    whole, crops = con.execute(
        "select count(*) filter (crop = -1), count(*) filter (crop >= 0) from embeddings").fetchone()
    persons = con.execute("""select sum(least(n, 8)) from (select key, count(*) n from detections
                             where label = 'person' group by key)""").fetchone()[0]
    # (boxes under 2 px after clipping give no crop)
    assert whole == 24 and 0 < crops <= persons
    orphan = con.execute("""select count(*) from embeddings e where crop >= 0 and crop >= (
                            select count(*) from detections d where d.key = e.key and d.label = 'person')""")
    assert orphan.fetchone()[0] == 0  # a crop's index is one of its image's person boxes
    # the tagger saw the same person crops as CCIP: each names a person detection by its index
    tagged = set(con.execute("select distinct key, crop from tag_scores where crop >= 0").fetchall())
    embedded = set(con.execute("select key, crop from embeddings where crop >= 0").fetchall())
    assert tagged and tagged <= embedded
    indexes = con.execute("""select count(*), count(*) filter (index between 0 and n - 1) from (
                             select index, count(*) over (partition by key, model) as n from detections)""")
    assert len(set(indexes.fetchone())) == 1  # every image's boxes of a model are numbered 0..n-1
    # every image has its 4 rating scores (the whole image: crops have none); other labels only above the floor
    assert con.execute("select count(*) from tag_scores where category = 'rating'").fetchone()[0] == 96
    assert con.execute("select count(*) from tag_scores where category = 'rating' and crop = -1").fetchone()[0] == 96
    assert con.execute("select min(score) from tag_scores where category <> 'rating'").fetchone()[0] > 0.05

    before = {t: _rows(ws, t) for t in ("detections", "embeddings", "tag_scores", "errors")}
    again = annotate.run(cfg, ws)
    assert again.units_done == 0 and again.units_skipped == 3
    # a unit whose run died before its commit (marker gone, a part half-written) is redone exactly
    unit = sorted(ws.done_units("annotate"))[0]
    ws.fs.delete_file(f"{ws.state_dir('annotate')}/{unit}.json")
    ws.write_part("tag_scores", f"annotate-{unit}-tagger", [])
    redo = annotate.run(cfg, ws)
    assert redo.units_done == 1
    assert 0 < redo.rows_run < redo.rows_in == 24  # the rate counts the images of the unit run now
    assert {t: _rows(ws, t) for t in before} == before


def test_annotate_offline_without_models_runs_the_cascade_alone(ingested, tmp_path):
    from jobs import annotate
    from jobs.config import merge

    cfg, ws = ingested
    merge(cfg, {"annotate": {"models_dir": str(tmp_path / "empty")}})
    summary = annotate.run(cfg, ws)
    skipped = [n for n in summary.notes if "skipped" in n]
    assert len(skipped) == 5 and all("annotate.models_dir" in n for n in skipped)
    assert summary.rows_out["detections"] > 12 and summary.rows_out["tag_scores"] == 0


@pytest.mark.parametrize("models", [["tagger"], []])
def test_no_model_to_run_is_a_summary_not_a_crash(ingested, tmp_path, models):
    """Only models whose files are not here (offline), or none at all: nothing runs, the summary
    says how to get them (a KeyError on the units never annotated ended `booruset run`)."""
    from jobs import annotate
    from jobs.config import merge

    cfg, ws = ingested
    merge(cfg, {"annotate": {"models_dir": str(tmp_path / "empty"), "models": models}})
    summary = annotate.run(cfg, ws)
    assert summary.units_done == 0 and summary.rows_in == 0 and not ws.done_units("annotate")
    skipped = [n for n in summary.notes if "skipped" in n]
    assert len(skipped) == len(models) and all(n.startswith("annotate: tagger: skipped") for n in skipped)


def test_pools_that_leave_no_cpu_for_the_tasks_fail_with_the_numbers(ingested, tmp_path):
    """Ray starts the pools' actors first: pools holding every CPU left the decode tasks none,
    and annotate printed 0/N images for good. A local Ray now fails it at once, saying why."""
    import ray

    from jobs import annotate
    from jobs.config import ConfigError, merge

    cfg, ws = ingested
    cpus = ray.cluster_resources()["CPU"]
    merge(cfg, {"annotate": {"models_dir": str(tmp_path / "empty"), "cascade_face": {"num_cpus": cpus}}})
    with pytest.raises(ConfigError, match=f"annotate needs {cpus + 0.5:g} CPUs at once .* Ray has {cpus:g}"):
        annotate.run(cfg, ws)
    assert ws.done_units("annotate") == {}


def test_pools_that_fill_the_cpus_exactly_are_not_refused():
    """Pools and a CPU task whose shares add up to Ray's CPUs exactly fit (Ray counts CPU shares
    in 1/10,000): three actors of 0.2, one of 0.3 and tasks of 0.1 on ray.num_cpus = 1 added up to
    1.0000000000000002 in floats, and annotate (and `booruset run`, before ingest) refused them with
    "annotate needs 1 CPUs at once ... but Ray has 1"."""
    from jobs.annotate import cpu_shortfall

    specs = {"person": {"concurrency": 3, "num_cpus": 0.2}, "tagger": {"concurrency": 1, "num_cpus": 0.3}}
    assert cpu_shortfall(specs, {"task_num_cpus": 0.1}, 1.0) is None
    assert cpu_shortfall(specs, {"task_num_cpus": 0.1001}, 1.0) is not None  # a share more than Ray has


def test_pools_asking_for_more_gpus_than_ray_has_fail_with_the_numbers(ingested, models_dir):
    """annotate.device = "cuda" (README: the actors then always ask for their num_gpus) on a local
    Ray without a GPU: the face pool's actors, each asking for 0.1 GPU, were never started, and
    annotate printed "0/1 images" beside Ray's "No available node types can fulfill resource request
    {'CPU': 0.25, 'GPU': 0.1}" for as long as it was left to run. It fails at once, saying why."""
    import ray

    from jobs import annotate
    from jobs.config import ConfigError, merge

    cfg, ws = ingested
    gpus = ray.cluster_resources().get("GPU", 0) + 0.5  # more than this Ray has, GPU or not
    merge(cfg, {"annotate": {"models_dir": models_dir, "models": ["face"], "device": "cuda",
                             "face": {"num_gpus": gpus}}})
    with pytest.raises(ConfigError, match=rf"annotate's model pools ask for {gpus:g} GPUs \(face {gpus:g}\) but "
                                          rf"Ray has {gpus - 0.5:g}"):
        annotate.run(cfg, ws)
    assert ws.done_units("annotate") == {}


def test_the_rate_counts_the_images_this_run_annotated(ingested, tmp_path):
    """One of three units run again: the summary's rows/s is over its 8 images, not over the 24
    of all three (the rate of a rerun of 1 unit in 1,000 was 1,000 times too high)."""
    from jobs import annotate
    from jobs.config import merge

    cfg, ws = ingested
    merge(cfg, {"annotate": {"models_dir": str(tmp_path / "empty"), "models": ["cascade_face"]}})
    annotate.run(cfg, ws)
    unit = sorted(ws.done_units("annotate"))[0]
    ws.fs.delete_file(f"{ws.state_dir('annotate')}/{unit}.json")
    again = annotate.run(cfg, ws)
    assert again.units_done == 1 and again.units_skipped == 2 and again.rows_in == 24
    assert f"{8 / again.seconds:.1f} rows/s" in again.render() and "(8 in the units run now)" in again.render()


def test_a_run_of_few_images_writes_in_several_batches():
    """The progress line counts the rows the writers wrote: 600 images in one batch of
    write_batch_size (1,024) said "0/600 images" for minutes with the models on a CPU, then 600.
    A run of fewer than 8 such batches writes an eighth of its rows a batch (64 at the least);
    a large run, and a smaller write_batch_size, as set."""
    from jobs.annotate import write_batch_rows

    assert write_batch_rows(1024, 600) == 75
    assert write_batch_rows(1024, 24) == 64
    assert write_batch_rows(1024, 1_000_000) == 1024
    assert write_batch_rows(8, 600) == 8


def test_taking_the_person_detector_out_drops_ccips_person_crops(ingested, models_dir):
    """CCIP embeds each person crop beside the whole image. Taken out of annotate.models, the
    person detector keeps its own rows (README), but a run without it must leave CCIP's rows as a
    run that never had it: CCIP's identity with the default crop options is the same with and
    without crops, so its crop embeddings stayed, and curate clustered them as people (the tagger's
    went: its identity says `nocrops`). Put back, the crops are cut again."""
    from jobs import annotate
    from jobs.config import merge

    cfg, ws = ingested
    merge(cfg, {"annotate": {"models_dir": models_dir, "models": ["person", "ccip"]}})
    annotate.run(cfg, ws)

    def embeddings() -> tuple[int, int]:
        return ws.connect().execute("select count(*) filter (where crop > 0), count(*) from embeddings").fetchone()

    with_person = embeddings()
    assert with_person[0] > 0
    merge(cfg, {"annotate": {"models": ["ccip"]}})
    annotate.run(cfg, ws)
    assert embeddings() == (0, 24)
    annotate.run(cfg, ws)  # settled: nothing to run
    assert ws.done_units("annotate") and embeddings() == (0, 24)
    merge(cfg, {"annotate": {"models": ["person", "ccip"]}})
    annotate.run(cfg, ws)
    assert embeddings() == with_person
