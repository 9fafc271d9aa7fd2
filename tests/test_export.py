"""export end to end on the bundled sample, checked with the real readers: webdataset, wids,
Hugging Face datasets; plus kohya / EveryDream folders, the manifest, resume and --where."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile

import pytest

from tests.export_data import base_config, prepared_workspace

ALL = '["webdataset", "kohya", "everydream", "parquet"]'


@pytest.fixture(scope="module")
def exported(tmp_path_factory, ray_local):
    from jobs import export
    from store.workspace import Workspace

    path = prepared_workspace(tmp_path_factory)
    cfg = base_config(path, f"export.formats={ALL}", "export.max_count=4")
    ws = Workspace(str(path))
    summary = export.run(cfg, ws)
    return cfg, ws, summary, path / "export"


def expected_rows(ws) -> dict[str, dict]:
    """What must be exported, straight from the workspace tables (not from the export's SQL)."""
    con = ws.connect()
    rows = con.execute("""
        select i.key, i.sha256, i.width, i.height, c.caption, b.multiply, b.repeats
        from images i
        left join captions c on c.key = i.key and c.accepted
        left join balance b on b.key = i.key
        where i.key not in (select key from duplicates where not is_representative)
          and not coalesce(c.flagged, false)""").fetchall()
    return {r[0]: {"sha256": r[1], "width": r[2], "height": r[3], "caption": r[4], "multiply": r[5], "repeats": r[6]}
            for r in rows}


def shard_paths(out) -> list[str]:
    return sorted(str(p) for p in (out / "webdataset").glob("shard-*.tar"))


def exported_images(out) -> dict[str, bytes]:
    """{images.key (from the sample's json): the image member's bytes} of every exported shard."""
    found, keys = {}, {}
    for path in shard_paths(out):
        with tarfile.open(path) as tar:
            for m in tar:
                name, _, ext = m.name.rpartition(".")
                data = tar.extractfile(m).read()
                if ext == "json":
                    keys[name] = json.loads(data)["key"]
                elif ext != "txt":
                    found[name] = data
    return {keys[name]: data for name, data in found.items()}


def test_webdataset_reads_every_sample_with_image_caption_and_json(exported):
    import webdataset as wds

    cfg, ws, summary, out = exported
    expected = expected_rows(ws)
    assert 0 < len(expected) < 24  # the sample has near duplicates, which are left out
    dropped = {r[0] for r in ws.connect().execute("select key from duplicates where not is_representative").fetchall()}
    seen, templates = {}, 0
    own = {}  # the texts that came with the images (.caption sidecars, JSON captions)
    for key, kind, text in ws.connect().execute("select key, kind, text from source_text order by all").fetchall():
        own.setdefault(key, {}).setdefault(kind, []).append(text)
    for sample in wds.WebDataset(shard_paths(out), shardshuffle=False).decode("pil"):
        meta = sample["json"]
        key = meta["key"]
        assert meta.get("source_texts") == own.get(key)
        image = next(sample[e] for e in ("jpg", "png", "webp") if e in sample)
        assert image.size == (meta["width"], meta["height"]) and max(image.size) <= 1024
        assert sample["txt"] == expected[key]["caption"]
        assert meta["multiply"] == pytest.approx(expected[key]["multiply"])
        assert meta["repeats"] == expected[key]["repeats"]
        assert meta["source"]["member"] and meta["tags"] and "accuracy" in meta["scores"]
        captions = meta["captions"]  # an image whose own caption was accepted has no template caption
        assert set(captions) <= {"tags", "template"} and len(captions["tags"].split(", ")) == len(meta["tags"])
        assert captions.get("template", expected[key]["caption"]) == expected[key]["caption"]
        templates += "template" in captions
        seen[key] = sample["__key__"]
    assert set(seen) == set(expected) and not set(seen) & dropped
    assert set(own) & set(seen)  # some exported image came with a text of its own
    assert templates > 0
    assert summary.rows_in == len(expected) and summary.errors == 0


def test_images_that_fit_keep_their_bytes_and_large_ones_are_resized(exported):
    cfg, ws, _, out = exported
    expected = expected_rows(ws)
    kept = resized = 0
    for path in shard_paths(out):
        with tarfile.open(path) as tar:
            members = {m.name: tar.extractfile(m).read() for m in tar if m.isfile()}
        for name, data in members.items():
            if name.endswith(".json"):
                meta = json.loads(data)
                image = next(members[n] for n in members if n.startswith(name[:-5] + ".") and n[-4:] != "json"
                             and not n.endswith(".txt"))
                row = expected[meta["key"]]
                if max(row["width"], row["height"]) <= 1024:
                    assert hashlib.sha256(image).hexdigest() == row["sha256"]
                    kept += 1
                else:
                    assert max(meta["width"], meta["height"]) == 1024
                    assert abs(meta["width"] / meta["height"] - row["width"] / row["height"]) < 0.01
                    resized += 1
    assert kept and resized  # the sample has both (sprites fit, 1280 px backgrounds do not)


def test_shards_are_cut_by_count_named_in_order_and_listed_in_the_manifest(exported):
    import pyarrow.parquet as pq

    _, ws, _, out = exported
    paths = shard_paths(out)
    assert [os.path.basename(p) for p in paths] == [f"shard-{i:06d}.tar" for i in range(len(paths))]
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    for path in paths:
        with tarfile.open(path) as tar:
            keys = {m.name.split(".", 1)[0] for m in tar if m.isfile()}
        assert 0 < len(keys) <= 4
        listed = {m["sample_key"] for m in manifest if m["layout"] == "webdataset"
                  and m["path"] == f"webdataset/{os.path.basename(path)}"}
        assert listed == keys
    assert {m["layout"] for m in manifest} == {"webdataset", "kohya", "everydream", "parquet"}
    assert ws.read_table("export_manifest").num_rows == len(manifest)


def test_a_task_writes_max_count_images_of_one_source(exported):
    """Units hold up to max_count images of one source (not one per input shard), so that a big
    input shard is written by several tasks side by side."""
    _, ws, _, _ = exported
    con = ws.connect()
    per_unit = con.execute("""
        select m.unit, count(distinct m.key), count(distinct i.source), any_value(i.source)
        from export_manifest m join images i on i.key = m.key group by m.unit""").fetchall()
    assert all(images <= 4 and sources == 1 for _, images, sources, _ in per_unit)
    exported_per_source = dict(con.execute("""
        select i.source, count(distinct m.key) from export_manifest m join images i on i.key = m.key
        group by i.source""").fetchall())
    assert max(exported_per_source.values()) > 4  # the sample has a source that needs several units
    for source, images in exported_per_source.items():
        assert sum(s == source for *_, s in per_unit) >= -(-images // 4)


def test_wids_opens_the_shards_by_index(exported, tmp_path, monkeypatch):
    import wids

    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "wids-cache"))
    _, ws, _, out = exported
    expected = expected_rows(ws)
    dataset = wids.ShardListDataset(str(out / "webdataset" / "index.wids.json"))
    assert len(dataset) == len(expected)
    for i in (0, len(dataset) // 2, len(dataset) - 1):
        sample = dataset[i]
        image = next(sample[e] for e in (".jpg", ".png", ".webp") if e in sample)
        meta = sample[".json"]  # wids' default decoders: PIL images, dicts, str
        assert image.size == (meta["width"], meta["height"])
        assert sample[".txt"] == expected[meta["key"]]["caption"]


def test_datasets_loads_the_parquet_layout(exported):
    import datasets

    _, ws, _, out = exported
    expected = expected_rows(ws)
    files = sorted(str(p) for p in (out / "parquet").glob("train-*.parquet"))
    loaded = datasets.load_dataset("parquet", data_files=files, split="train")
    assert loaded.num_rows == len(expected)
    assert isinstance(loaded.features["image"], datasets.Image)
    for row in loaded:
        meta = json.loads(row["json"])
        assert row["image"].size == (meta["width"], meta["height"])
        assert row["text"] == expected[meta["key"]]["caption"]
        assert row["multiply"] == pytest.approx(expected[meta["key"]]["multiply"])


def test_kohya_and_everydream_folders(exported):
    _, ws, _, out = exported
    expected = expected_rows(ws)
    kohya = [p for p in (out / "kohya").rglob("*") if p.is_file() and p.parent != out / "kohya"]  # not dataset.toml
    images = [p for p in kohya if p.suffix != ".txt"]
    assert len(images) == len(expected)
    for image in images:
        repeats, concept = re.fullmatch(r"(\d+)_(.+)", image.parent.name).groups()
        meta_txt = image.with_suffix(".txt").read_text()
        key = next(k for k, v in expected.items() if v["caption"] == meta_txt and
                   image.stem.endswith(k.split("/")[-1]))
        assert int(repeats) == expected[key]["repeats"] and concept
    folders = [p for p in (out / "everydream").iterdir() if p.is_dir()]
    ed_images = [p for f in folders for p in f.iterdir() if p.suffix in (".jpg", ".png", ".webp")]
    assert len(ed_images) == len(expected)
    for folder in folders:
        multiply = float((folder / "multiply.txt").read_text())
        for image in folder.glob("*.*"):
            if image.suffix in (".jpg", ".png", ".webp"):
                assert image.with_suffix(".txt").exists()
                key = next(k for k in expected if image.stem.endswith(k.split("/")[-1]))
                assert multiply == pytest.approx(round(expected[key]["multiply"], 2))


def test_rerun_resumes_and_a_lost_unit_is_rewritten_identically(exported):
    from jobs import export

    cfg, ws, _, out = exported
    before = {p: open(p, "rb").read() for p in shard_paths(out)}
    again = export.run(cfg, ws)
    assert again.units_done == 0 and again.units_skipped > 0
    assert not any(n.startswith("image bytes written") for n in again.notes)  # it wrote none
    # a unit killed before its commit: its marker and one of its shards are gone
    marker = sorted(ws.done_units("export"))[0]
    info = ws.done_units("export")[marker]
    lost = out / next(f for f in info["files"] if f.startswith("webdataset/"))
    os.remove(f"{ws.state_dir('export')}/{marker}.json")
    lost.unlink()
    redo = export.run(cfg, ws)
    assert redo.units_done == 1
    assert redo.rows_run == info["images"] < redo.rows_in  # the rate counts the images of the unit run now
    assert any(n.startswith(f"image bytes written: {info['bytes'] / 1e6:.1f} MB,") for n in redo.notes)
    assert {p: open(p, "rb").read() for p in shard_paths(out)} == before
    assert not [p for p in out.rglob(".tmp-*")]


def fresh(tmp_path_factory, *overrides):
    """Its own copy of the prepared workspace (the module's export keeps its state)."""
    from store.workspace import Workspace

    path = prepared_workspace(tmp_path_factory)
    return base_config(path, *overrides), Workspace(str(path))


def test_the_selection_carries_the_best_caption_of_each_origin(tmp_path_factory):
    """KEY.json's captions: per origin (template, captioning model, rewriter) the best-scored
    attempt; the image's own caption is in source_texts, not here."""
    from jobs.export import sql_text

    _, ws = fresh(tmp_path_factory)
    key = sorted(expected_rows(ws))[0]
    template = ws.connect().execute("select caption from captions where key = $k and attempt = 0",
                                    {"k": key}).fetchone()[0]
    attempts = [(1, "openai:joy", "a worse model caption", 0.5), (2, "openai:joy", "the better model caption", 0.7),
                (3, "rewrite:openai", "a short one", 0.68), (-1, "own", "the image's own", 0.9)]
    ws.add_part("captions", "variants", [{"key": key, "attempt": a, "backend": b, "seed": 0, "caption": c,
                                          "accuracy": acc, "accepted": a == 3, "flagged": False}
                                         for a, b, c, acc in attempts])
    params = {"drop_duplicates": True, "drop_flagged": True, "drop_excluded": True, "gone_inputs": []}
    variants = dict(ws.connect().execute(f"select key, caption_variants from ({sql_text('export_selection.sql')})",
                                         params).fetchall())
    assert variants[key] == [{"origin": "model", "caption": "the better model caption"},
                             {"origin": "rewrite", "caption": "a short one"},
                             {"origin": "template", "caption": template}]


def test_a_caption_edited_in_review_keeps_nothing_of_the_caption_it_replaced(workspace):
    """KEY.json of an image whose VLM caption scored 0.2 and a person then rewrote: the caption is
    theirs, not scored, and neither the replaced caption's quality tags (auto_worst_caption beside
    not_scored edited_by_person) nor the generated captions they corrected are offered."""
    import datetime

    from jobs.config import default_config
    from jobs.export import sql_text
    from udfs.export.export_plan import sample_plan

    workspace.add_part("images", "u", [{"key": "a/girl", "source": "s.tar", "member": "girl.png", "width": 64,
                                        "height": 64, "format": "PNG", "mode": "RGB", "n_frames": 1, "bytes": 1,
                                        "sha256": "x", "phash": 0}])
    workspace.add_part("tags", "u", [{"key": "a/girl", "tag": "long_hair", "category": "general", "score": 1.0,
                                      "rank": 0}])
    workspace.add_part("captions", "u", [
        {"key": "a/girl", "attempt": 0, "backend": "template:english", "seed": 0, "caption": "A girl with long hair.",
         "accepted": False, "flagged": False, "not_scored": "built_from_tags", "quality_tags": [], "lint": []},
        {"key": "a/girl", "attempt": 1, "backend": "openai:joy", "seed": 1, "caption": "A boy on a horse.",
         "accuracy": 0.2, "tag_inclusion": 0.2, "english_similarity": 0.2, "subject_consistency": 0.2,
         "scored_against": "tagger", "accepted": True, "flagged": False, "lint": ["red_hair"],
         "quality_tags": ["auto_worst_caption", "accuracy_20"]}])
    now = datetime.datetime.now(datetime.UTC)
    workspace.add_part("edits", "u", [{"key": "a/girl", "field": "caption", "old": "A boy on a horse.",
                                       "new": "A girl with long hair smiles.", "time": now, "seq": 0, "batch": "b"}])
    params = {"drop_duplicates": True, "drop_flagged": True, "drop_excluded": True, "gone_inputs": []}
    con = workspace.connect()
    cursor = con.execute(sql_text("export_selection.sql"), params)
    row = dict(zip([d[0] for d in cursor.description], cursor.fetchone(), strict=True))
    meta = json.loads(sample_plan(row, default_config()["export"])["json"])
    assert meta["caption"] == "A girl with long hair smiles." and meta["caption_edited"]
    assert meta["quality_tags"] == [] and "lint" not in meta
    assert meta["scores"] == {"accuracy": None, "tag_inclusion": None, "english_similarity": None,
                              "subject_consistency": None, "scored_against": None, "not_scored": "edited_by_person"}
    assert meta["captions"] == {"tags": "long hair", "edited": "A girl with long hair smiles."}


def test_where_filters_the_selection_and_must_be_one_condition(tmp_path_factory, ray_local):
    from jobs import export
    from jobs.config import ConfigError, merge

    cfg, ws = fresh(tmp_path_factory)
    merge(cfg, {"export": {"where": "key like '%/bg\\_%' escape '\\'"}})
    summary = export.run(cfg, ws)
    expected = {k for k in expected_rows(ws) if "/bg_" in k}
    assert summary.rows_in == len(expected) > 0
    con = ws.connect()
    duplicates = con.execute("select count(distinct key) from duplicates where not is_representative").fetchall()[0][0]
    assert duplicates > 0
    by_where = 24 - len(expected) - duplicates
    assert (f"left out before export: {24 - len(expected)} of 24 images: {duplicates} near duplicates, "
            f"{by_where} by export.where") in summary.notes
    merge(cfg, {"export": {"where": "true; drop table images"}})
    with pytest.raises(ConfigError):
        export.run(cfg, ws)
    assert ws.read_table("images").num_rows == 24


@pytest.mark.parametrize("where", ["true) or (true", "(rating = 'general')) or ((true"])
def test_a_where_that_closes_a_parenthesis_it_did_not_open_is_refused_before_any_job(where):
    """It parses, wrapped as `key in range and (<where>)`, as `(key in range and true) or true`:
    each key range staged every image (an export of more than one range repeated them all)."""
    from jobs.config import ConfigError, load_config
    from jobs.export import bind_where

    opts = load_config(None, [])["export"]
    with pytest.raises(ConfigError, match="parentheses do not pair up"):
        bind_where(opts, where)
    for fine in ("caption like '%)%' or (rating = 'general')", "key in (select key from images) /* ) */"):
        bind_where(opts, fine)


def test_a_narrower_selection_deletes_the_files_of_the_images_it_leaves_out(tmp_path_factory, tmp_path, ray_local):
    """kohya and EveryDream files per image are named by the manifest, not by the unit markers
    (which stay small at any unit size): an export whose selection lost images deletes their
    files and keeps exactly the files its manifest names."""
    import pyarrow.parquet as pq

    from jobs import export
    from jobs.config import merge

    out = tmp_path / "narrow"
    cfg, ws = fresh(tmp_path_factory, f'export.out="{out}"', 'export.formats=["kohya", "everydream"]',
                    "export.max_count=4")

    def on_disk() -> set[str]:
        return {str(p.relative_to(out)) for layout in ("kohya", "everydream") for p in (out / layout).rglob("*")
                if p.is_file()}

    def named_by_manifest() -> set[str]:
        files = set()
        for row in pq.read_table(out / "manifest.parquet").to_pylist():
            files |= {f"{row['path']}/{row['image']}", f"{row['path']}/{row['sample_key']}.txt"}
            if row["layout"] == "everydream":
                files.add(f"{row['path']}/multiply.txt")
        return files | {"kohya/dataset.toml"}  # the driver's config of the kohya folders

    first = export.run(cfg, ws)
    assert on_disk() == named_by_manifest()
    named = {f for info in ws.done_units("export").values() for f in info["files"]}
    assert named and all(f.endswith("/multiply.txt") for f in named)
    # one image file and one KEY.txt deleted by hand: their units are written again, the others not
    kohya_image = sorted(f for f in on_disk() if f.startswith("kohya/") and not f.endswith((".txt", ".toml")))[-1]
    everydream_txt = sorted(f for f in on_disk() if f.startswith("everydream/") and f.endswith(".txt")
                            and not f.endswith("/multiply.txt"))[0]
    for lost in (kohya_image, everydream_txt):
        (out / lost).unlink()
    repaired = export.run(cfg, ws)
    assert on_disk() == named_by_manifest() and {kohya_image, everydream_txt} <= on_disk()
    assert repaired.units_done == 2 and repaired.units_skipped == first.units_done - 2
    merge(cfg, {"export": {"where": "key like '%/bg\\_%' escape '\\'"}})
    narrow = export.run(cfg, ws)
    assert 0 < narrow.rows_in < first.rows_in
    assert on_disk() == named_by_manifest()
    images = [f for f in on_disk() if not f.endswith((".txt", ".toml"))]
    assert len(images) == 2 * narrow.rows_in and all("bg_" in os.path.basename(f) for f in images)


def test_files_of_a_unit_killed_mid_write_are_not_left_when_the_selection_changes(tmp_path_factory, tmp_path,
                                                                                 ray_local):
    """kohya and EveryDream files are written image by image as a unit runs; a unit killed before
    its commit is named by no marker and no manifest. A rerun with another selection (or other
    options) must not leave its files in the folders trainers read: here a real `booruset export`
    of the character sprites is SIGKILLed after a few files, and an export of the backgrounds
    alone then keeps exactly the files its manifest names."""
    import signal

    import pyarrow.parquet as pq

    from jobs import export
    from jobs.config import merge
    from tests.kill_mid_run import booruset

    out = tmp_path / "killed"
    layouts = '["kohya", "everydream"]'
    cfg, ws = fresh(tmp_path_factory, f'export.out="{out}"', f"export.formats={layouts}", "export.max_count=4")

    def on_disk() -> set[str]:
        return {str(p.relative_to(out)) for layout in ("kohya", "everydream") if (out / layout).is_dir()
                for p in (out / layout).rglob("*") if p.is_file()}

    sprites = "key not like '%/bg\\_%' escape '\\'"
    victim = booruset("export", "-w", ws.root, "--set", f'export.out="{out}"', "--set", f"export.formats={layouts}",
                      "--set", "export.max_count=4", "--set", f"export.where={json.dumps(sprites)}",
                      BOORUSET_KILL_AFTER_EXPORT_FILES="5")
    output = victim.communicate(timeout=600)[0]
    assert victim.returncode == -signal.SIGKILL, output[-3000:]
    assert on_disk(), "the killed export wrote no file"
    merge(cfg, {"export": {"where": "key like '%/bg\\_%' escape '\\'"}})
    backgrounds = export.run(cfg, ws)
    named = {"kohya/dataset.toml"}
    for row in pq.read_table(out / "manifest.parquet").to_pylist():
        named |= {f"{row['path']}/{row['image']}", f"{row['path']}/{row['sample_key']}.txt"}
        if row["layout"] == "everydream":
            named.add(f"{row['path']}/multiply.txt")
    assert backgrounds.rows_in > 0 and on_disk() == named


def test_units_of_an_export_that_never_ended_are_not_left_when_another_folder_is_exported_between(
        tmp_path_factory, tmp_path, ray_local, monkeypatch):
    """An export stopped after some units committed, before its manifest (a SIGKILL, a full
    disk), leaves their files in its folder, named by their markers alone. An export to another
    folder then forgot those units (stale, of another folder), and the next export to the first
    folder neither knew nor removed their shards and kohya files: trainers read images that no
    export of that folder selected."""
    import pyarrow.parquet as pq

    from jobs import export
    from jobs.config import merge

    first, other = tmp_path / "first", tmp_path / "other"
    backgrounds, sprites = "key like '%/bg\\_%' escape '\\'", "key not like '%/bg\\_%' escape '\\'"
    cfg, ws = fresh(tmp_path_factory, f'export.out="{first}"', 'export.formats=["webdataset", "kohya"]',
                    "export.max_count=2", f"export.where={json.dumps(backgrounds)}")

    def stopped(*args, **kwargs):
        raise RuntimeError("stopped before the manifest")

    with monkeypatch.context() as patch:
        patch.setattr(export, "start_in_worker", stopped)
        with pytest.raises(RuntimeError):
            export.run(cfg, ws)
    left = {str(p.relative_to(first)) for p in first.rglob("*") if p.is_file()}
    assert any(f.startswith("kohya/") for f in left) and any(f.startswith("webdataset/shard-") for f in left)
    merge(cfg, {"export": {"out": str(other), "where": sprites}})
    export.run(cfg, ws)
    merge(cfg, {"export": {"out": str(first), "max_count": 100}})
    again = export.run(cfg, ws)
    named = {"manifest.parquet", "webdataset/index.wids.json", "kohya/dataset.toml"}
    for row in pq.read_table(first / "manifest.parquet").to_pylist():
        named |= {row["path"]} if row["layout"] == "webdataset" else \
            {f"{row['path']}/{row['image']}", f"{row['path']}/{row['sample_key']}.txt"}
    assert again.rows_in > 0
    assert {str(p.relative_to(first)) for p in first.rglob("*") if p.is_file()} == named
    assert not [p for p in first.rglob("*bg_*")]


def test_a_folder_whose_export_ended_keeps_its_files_without_its_manifest(tmp_path_factory, tmp_path, ray_local):
    """The files of units an export stopped before its end left are removed when another folder is
    exported, those of an export that ended stay: with its manifest.parquet deleted (before an
    upload, where the Hub would read it as the dataset), all 34 files of a finished export were
    removed from its folder by an export to another folder."""
    from jobs import export
    from jobs.config import merge

    first, other = tmp_path / "first", tmp_path / "other"
    cfg, ws = fresh(tmp_path_factory, f'export.out="{first}"', 'export.formats=["webdataset", "kohya"]')
    export.run(cfg, ws)
    (first / "manifest.parquet").unlink()
    written = {str(p.relative_to(first)) for p in first.rglob("*") if p.is_file()}
    assert any(f.startswith("kohya/") for f in written)
    merge(cfg, {"export": {"out": str(other)}})
    export.run(cfg, ws)
    assert {str(p.relative_to(first)) for p in first.rglob("*") if p.is_file()} == written


def test_materialised_repeats_write_each_sample_repeats_times(tmp_path_factory, tmp_path, ray_local):
    import webdataset as wds

    from jobs import export

    cfg, ws = fresh(tmp_path_factory, f'export.out="{tmp_path / "rep"}"', "export.materialize_repeats=true")
    export.run(cfg, ws)
    expected = expected_rows(ws)
    keys = [s["__key__"] for s in wds.WebDataset(sorted(str(p) for p in (tmp_path / "rep" / "webdataset")
                                                        .glob("*.tar")), shardshuffle=False)]
    assert len(keys) == len(set(keys)) == sum(r["repeats"] for r in expected.values())
    manifest = ws.read_table("export_manifest").to_pylist()
    copies = [(r["path"], r["key"]) for r in manifest if r["layout"] == "webdataset"]
    assert len(copies) == len(keys) and len(set(copies)) == len(copies)  # no shard holds two copies of an image


def test_buckets_resize_to_kohya_bucket_sizes(tmp_path_factory, tmp_path, ray_local):
    from PIL import Image

    from jobs import export
    from udfs.export.resize import bucket_sizes

    cfg, ws = fresh(tmp_path_factory, f'export.out="{tmp_path / "buckets"}"', 'export.formats=["kohya"]',
                    "export.buckets=true", "export.max_size=512")
    export.run(cfg, ws)
    sizes = set(bucket_sizes(512, 256, 2048, 64))
    images = [p for p in (tmp_path / "buckets" / "kohya").rglob("*") if p.suffix in (".jpg", ".png", ".webp")]
    assert images
    for path in images:
        with Image.open(io.BytesIO(path.read_bytes())) as image:
            assert image.size in sizes


# what kohya sd-scripts' config_util accepts in a DreamBooth-style dataset config (its voluptuous
# schema refuses any other key): [general] and [[datasets]] take the ascendable options,
# [[datasets.subsets]] those and image_dir
KOHYA_SUBSET_OPTIONS = {"color_aug", "face_crop_aug_range", "flip_aug", "num_repeats", "random_crop",
                        "shuffle_caption", "keep_tokens", "keep_tokens_separator", "secondary_separator",
                        "enable_wildcard", "token_warmup_min", "token_warmup_step", "caption_prefix",
                        "caption_suffix", "caption_extension", "class_tokens", "cache_info"}
KOHYA_DATASET_OPTIONS = {"batch_size", "bucket_no_upscale", "bucket_reso_steps", "enable_bucket", "max_bucket_reso",
                         "min_bucket_reso", "resolution", "network_multiplier"}


def test_kohya_gets_a_dataset_config_with_the_exports_repeats_captions_and_buckets(tmp_path_factory, tmp_path,
                                                                                    ray_local):
    """kohya's --dataset_config takes each folder's repeats from num_repeats (1 unless given: the
    <repeats>_ of a folder name counts only for --train_data_dir), its captions from
    `.caption` files unless told, and buckets, keep_tokens and the separator from its own
    options: kohya/dataset.toml says what the export wrote, so that a trainer keeps it as it is."""
    import tomllib

    from PIL import Image

    from jobs import export
    from jobs.config import merge

    out = tmp_path / "cfg"
    cfg, ws = fresh(tmp_path_factory, f'export.out="{out}"', 'export.formats=["kohya"]', "export.buckets=true",
                    "export.max_size=512", 'export.text="tags"', "export.keep_tokens=1",
                    'export.keep_tokens_separator="|||"')
    export.run(cfg, ws)
    config = tomllib.loads((out / "kohya" / "dataset.toml").read_text(encoding="utf-8"))
    assert set(config) == {"general", "datasets"} and len(config["datasets"]) == 1
    general, dataset = config["general"], config["datasets"][0]
    assert set(general) <= KOHYA_SUBSET_OPTIONS | KOHYA_DATASET_OPTIONS
    assert set(dataset) - {"subsets"} <= KOHYA_SUBSET_OPTIONS | KOHYA_DATASET_OPTIONS
    assert general == {"caption_extension": ".txt", "keep_tokens": 1, "keep_tokens_separator": "|||"}
    # kohya's buckets from these are the export's, so each image stays at its size
    assert {k: v for k, v in dataset.items() if k != "subsets"} == {
        "enable_bucket": True, "resolution": 512, "min_bucket_reso": 256, "max_bucket_reso": 2048,
        "bucket_reso_steps": 64}
    folders = sorted(p for p in (out / "kohya").iterdir() if p.is_dir())
    assert sorted(s["image_dir"] for s in dataset["subsets"]) == [str(p) for p in folders]
    images = 0
    for subset in dataset["subsets"]:
        assert set(subset) == {"image_dir", "num_repeats"}
        assert subset["num_repeats"] == int(os.path.basename(subset["image_dir"]).split("_")[0])
        for image in (p for p in os.scandir(subset["image_dir"]) if not p.name.endswith(".txt")):
            with Image.open(image.path) as opened:
                assert opened.size[0] % 64 == 0 and opened.size[1] % 64 == 0
            images += subset["num_repeats"]
    assert images == sum(r["repeats"] for r in expected_rows(ws).values())
    merge(cfg, {"export": {"where": "false"}})  # no folder left: no config naming gone ones
    export.run(cfg, ws)
    assert not (out / "kohya").exists()


BUCKET_A_STRIP = """
import io, resource, sys
from PIL import Image
from udfs.export.resize import resize_image
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
data = io.BytesIO()
Image.new("RGB", (1, 40_000), (200, 30, 30)).save(data, "PNG")
out = Image.open(io.BytesIO(resize_image(data.getvalue(), (256, 1280), "png", 90, crop=True)))
print(out.size, out.getpixel((128, 640)))
"""


def test_a_bucketed_strip_is_cut_before_it_is_resampled():
    """A 1x40,000 strip into a 256x1280 bucket: covering the bucket with the whole strip first
    was 256x10,240,000 pixels (7.3 GB); here under a 3 GB address space limit it takes kilobytes."""
    import subprocess
    import sys

    from tests.conftest import REPO

    done = subprocess.run([sys.executable, "-c", BUCKET_A_STRIP], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "(256, 1280) (200, 30, 30)"


def test_a_selection_staged_in_small_key_ranges_exports_the_same_files(tmp_path_factory, tmp_path, ray_local,
                                                                      monkeypatch):
    """The selection runs one key range at a time (bounded memory); units of 4 images then cross
    the ranges of 5, and every file must come out as from one range."""
    from jobs import export

    outputs, default = {}, export.SELECTION_CHUNK
    for chunk in (default, 5):
        monkeypatch.setattr(export, "SELECTION_CHUNK", chunk)
        out = tmp_path / "same"  # one out folder: the same plan gives the same unit ids and files
        cfg, ws = fresh(tmp_path_factory, f'export.out="{out}"', f"export.formats={ALL}", "export.max_count=4")
        summary = export.run(cfg, ws)
        assert f"selection staged in {1 if chunk == default else 5} key ranges" in " ".join(summary.notes)
        outputs[chunk] = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
        assert summary.rows_out["webdataset samples"] == summary.rows_in
        shutil.rmtree(out)
    small, whole = outputs[5], outputs[default]
    assert len(whole) > 20 and small.keys() == whole.keys()
    assert [name for name in whole if whole[name] != small[name]] == []


def parquet_scans(node: dict) -> list[dict]:
    found = [node["extra_info"]] if node.get("extra_info", {}).get("Function") == "READ_PARQUET" else []
    return found + [s for child in node.get("children", []) for s in parquet_scans(child)]


def test_a_key_range_of_the_selection_reaches_every_scan_of_a_per_image_table(tmp_path_factory, ray_local):
    """export stages the selection one key range at a time: that costs O(n) in all only if every
    scan that reads image keys is cut to the range (no scan of the whole `tags` per range)."""
    from jobs import export

    cfg, ws = fresh(tmp_path_factory)
    con = ws.connect()
    query, params = export.selection_query(con, cfg["export"], "")
    plan = con.execute(f"explain (format json) {query}",
                       {**params, "first": "shards/renpy-000001", "last": "shards/renpy-000002"}).fetchall()
    scans = [s for root in json.loads(plan[0][1]) for s in parquet_scans(root)]
    keyed = [s for s in scans if "key" in s["Projections"]]
    assert len(keyed) >= 8  # images, tags, source_tags (twice), image_meta, captions, duplicates, balance, ...
    assert [s["Projections"] for s in keyed if "key >= 'shards/renpy-000001'" not in str(s.get("Filters"))] == []


def test_an_export_without_a_layout_leaves_nothing_of_it(tmp_path_factory, tmp_path, ray_local):
    """Dropping the webdataset layout removes its shards and their wids index; dropping kohya
    removes its files and the concept folders they leave empty."""
    from jobs import export
    from jobs.config import merge

    out = tmp_path / "switch"
    cfg, ws = fresh(tmp_path_factory, f'export.out="{out}"', 'export.formats=["webdataset", "kohya"]',
                    "export.max_count=4")
    export.run(cfg, ws)
    assert (out / "webdataset" / "index.wids.json").exists() and list((out / "kohya").iterdir())
    merge(cfg, {"export": {"formats": ["everydream"]}})
    export.run(cfg, ws)
    assert not (out / "webdataset" / "index.wids.json").exists()
    assert not list((out / "webdataset").glob("*.tar"))
    assert not (out / "kohya").exists()
    assert list((out / "everydream").rglob("multiply.txt"))
    merge(cfg, {"export": {"formats": ["webdataset"]}})
    export.run(cfg, ws)  # the folders that held multiply.txt go too, and everydream/ with them
    assert not (out / "everydream").exists()


def test_an_export_that_selects_nothing_says_so_and_names_no_folder(tmp_path_factory, tmp_path, ray_local, capsys):
    """`--where false`: the summary named out/kohya/, out/everydream/ and out/parquet/, folders it
    never made, and said nothing of why no sample was written; a run's last lines named every
    layout's folder; an index.wids.json with no shard (which wids refuses: "No shards found") was
    left in a webdataset folder. It says plainly that nothing was selected, names only the
    manifest it wrote (no rows), and leaves no layout folder."""
    import pyarrow.parquet as pq

    from jobs import export
    from jobs.cli import print_outputs

    out = tmp_path / "out"
    cfg, ws = fresh(tmp_path_factory, f'export.out="{out}"', f"export.formats={ALL}", 'export.where="false"')
    summary = export.run(cfg, ws)
    text = summary.render()
    assert "nothing selected" in text
    for layout in ("webdataset", "kohya", "everydream", "parquet"):
        assert f"{out}/{layout}" not in text
        assert not (out / layout).exists()
    assert f"manifest: {out}/manifest.parquet" in text and pq.read_table(out / "manifest.parquet").num_rows == 0
    capsys.readouterr()
    print_outputs(cfg, ws)
    printed = capsys.readouterr().out
    assert "nothing selected" in printed and not any(f"{out}/{layout}" in printed for layout in json.loads(ALL))


def test_files_gone_from_out_are_written_again_and_another_out_keeps_its_own(tmp_path_factory, tmp_path,
                                                                             ray_local):
    """A done unit whose files were deleted (a concept folder, the shards) is exported again, not
    counted as done. An export to a second folder forgets the first one's units (their files
    stay): exporting to the first again removes what its own manifest.parquet names and the new
    export does not write, and leaves the second folder as it was."""
    from jobs import export
    from jobs.config import merge

    first, second = tmp_path / "first", tmp_path / "second"
    cfg, ws = fresh(tmp_path_factory, f'export.out="{first}"', 'export.formats=["webdataset", "kohya"]',
                    "export.max_count=4")
    export.run(cfg, ws)
    files = {p.relative_to(first): p.read_bytes() for p in first.rglob("*") if p.is_file() and p.suffix != ".parquet"}
    shutil.rmtree(first / "kohya")
    for shard in (first / "webdataset").glob("*.tar"):
        shard.unlink()
    again = export.run(cfg, ws)
    assert again.units_done > 0 and any("written again" in note for note in again.notes)
    assert {p.relative_to(first): p.read_bytes() for p in first.rglob("*")
            if p.is_file() and p.suffix != ".parquet"} == files

    merge(cfg, {"export": {"out": str(second)}})
    export.run(cfg, ws)
    merge(cfg, {"export": {"out": str(first), "concept": "zz"}})
    back = export.run(cfg, ws)
    assert {p.name for p in (first / "kohya").iterdir() if p.is_dir()} <= {f"{n}_zz" for n in range(1, 101)}
    assert any(note.startswith("removed ") and "an earlier export left" in note for note in back.notes)
    assert {p.name for p in (second / "kohya").iterdir()} == {p.parts[1] for p in files if p.parts[0] == "kohya"}


def test_an_export_back_to_its_first_folder_keeps_the_files_it_wrote_there(tmp_path_factory, tmp_path, ray_local):
    """export.out A, then B, then A again: an export to B forgot A's units (their files stay in A,
    which its manifest names), and the export back to A wrote every shard and file of A again,
    though they were intact and what the plan asks for (a rerun to A keeps them). A's units are
    kept aside while another folder is exported to, their parts too (also past the sweep of a
    job's start: here with no grace), and the export back to A takes them back, files untouched."""
    from jobs import export
    from jobs.config import merge

    a, b = tmp_path / "a", tmp_path / "b"
    cfg, ws = fresh(tmp_path_factory, f'export.out="{a}"', 'export.formats=["webdataset", "kohya"]',
                    "export.max_count=4")
    ws.retired_grace_s = 0  # as if each export started long after the one before
    first = export.run(cfg, ws)

    def stamps(folder):
        return {p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes()) for p in folder.rglob("*") if p.is_file()}

    written = stamps(a)
    manifest = ws.read_table("export_manifest").sort_by("sample_key")
    merge(cfg, {"export": {"out": str(b)}})
    export.run(cfg, ws)
    assert ws.read_table("export_manifest").num_rows == manifest.num_rows  # B's rows alone
    merge(cfg, {"export": {"out": str(a)}})
    back = export.run(cfg, ws)
    assert back.units_done == 0 and back.units_skipped == first.units_done
    assert stamps(a) == written  # not one file written again, the manifest neither
    assert ws.read_table("export_manifest").sort_by("sample_key").equals(manifest)
    assert back.rows_out == first.rows_out and back.errors_by_kind == first.errors_by_kind
    assert list((b / "webdataset").glob("*.tar"))  # B keeps its own


def test_an_export_with_nothing_new_stages_and_plans_nothing(tmp_path_factory, tmp_path, ray_local, capsys):
    """Each export staged the whole selection and planned every unit again (~80 s at a million
    images) to find every unit done. The last plan is kept with a digest of what it was made of:
    the same tables, options and code, and every unit's files in `out`, reuse it, from the run
    right after (the parts of export_manifest the first published are no input of the plan).
    Nothing in `out` is written again, the manifest included (a new one changed the report's
    inputs: every `booruset run` wrote the report again). A file gone from a kohya folder, or a
    table changed, stages and plans again."""
    from jobs import export, report

    out = tmp_path / "out"
    cfg, ws = fresh(tmp_path_factory, f'export.out="{out}"', 'export.formats=["webdataset", "kohya"]',
                    "export.max_count=4")
    first = export.run(cfg, ws)
    files = {p.relative_to(out): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    report_inputs = report.report_inputs(cfg, ws, tmp_path / "report")
    capsys.readouterr()
    kept = export.run(cfg, ws)
    assert "not staged nor planned again" in capsys.readouterr().out
    assert (kept.units_done, kept.units_skipped, kept.rows_in) == (0, first.units_done, first.rows_in)
    assert {p.relative_to(out): (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*")
            if p.is_file()} == files
    assert report.report_inputs(cfg, ws, tmp_path / "report") == report_inputs
    assert [n for n in kept.notes if "samples" in n or n.startswith("webdataset")] == \
        [n for n in first.notes if "samples" in n or n.startswith("webdataset")]  # the manifest's counts
    manifest = (out / "manifest.parquet").read_bytes()
    (out / "manifest.parquet").unlink()
    export.run(cfg, ws)
    assert (out / "manifest.parquet").read_bytes() == manifest
    capsys.readouterr()
    # what was left out, and the key ranges staged
    assert [n for n in kept.notes if n.startswith(("left out", "selection staged"))] == \
        [n for n in first.notes if n.startswith(("left out", "selection staged"))]

    caption = next(p for p in (out / "kohya").rglob("*.txt"))
    caption.unlink()
    again = export.run(cfg, ws)
    assert "not staged nor planned again" not in capsys.readouterr().out
    assert again.units_done == 1 and caption.is_file()
    export.run(cfg, ws)
    assert "not staged nor planned again" in capsys.readouterr().out  # the unit written again is its own row
    ws.add_part("source_text", "more", [{"key": sorted(expected_rows(ws))[0], "kind": "caption", "text": "A cat."}])
    export.run(cfg, ws)
    assert "not staged nor planned again" not in capsys.readouterr().out


@pytest.mark.parametrize("where", ["N_ERRORS = 0", "n_errors = 0", "key not in (select key from ERRORS)",
                                   "key not in (select key from Export_Manifest)"])
def test_a_where_reading_the_exports_own_rows_in_capitals_plans_again_when_they_change(tmp_path_factory, tmp_path,
                                                                                       where):
    """The plan is kept while its inputs are those of the last plan, the export's own rows (its
    export_manifest, its errors parts) left out unless export.where reads them. SQL names are
    not case-sensitive: `N_ERRORS = 0` reads the export's errors as `n_errors = 0` does, and an
    image an export failed on was still planned, the plan kept, as if the where did not read them."""
    from jobs import export

    cfg, ws = fresh(tmp_path_factory, f'export.where="{where}"')
    out = str(tmp_path / "out")
    before = export.plan_stamp(cfg, ws, out)
    key = sorted(expected_rows(ws))[0]
    if "manifest" in where.lower():
        ws.add_part("export_manifest", "export-x", [{"key": key}])
    else:
        ws.add_part("errors", "export-x", [{"key": key, "stage": "export", "kind": "missing_member",
                                            "message": "gone", "dropped": False}])
    assert export.plan_stamp(cfg, ws, out) != before


def test_a_shard_another_workspace_wrote_over_is_written_again(tmp_path_factory, tmp_path, ray_local):
    """Two workspaces exporting to one folder write shards of the same names: the first's units,
    done by their markers, were skipped, and its shards held the second's samples under its own
    manifest and index."""
    from jobs import export

    out = tmp_path / "shared"
    cfg_a, ws_a = fresh(tmp_path_factory, f'export.out="{out}"', 'export.formats=["webdataset"]')
    cfg_b, ws_b = fresh(tmp_path_factory, f'export.out="{out}"', 'export.formats=["webdataset"]',
                        'export.where="hash(key) % 2 = 0"')
    export.run(cfg_a, ws_a)
    mine = {p.name: p.read_bytes() for p in (out / "webdataset").glob("*.tar")}
    export.run(cfg_b, ws_b)
    assert {p.name: p.read_bytes() for p in (out / "webdataset").glob("*.tar")} != mine
    again = export.run(cfg_a, ws_a)
    assert any("written again" in note for note in again.notes)
    assert {p.name: p.read_bytes() for p in (out / "webdataset").glob("*.tar")} == mine


def test_a_parquet_shard_is_written_a_row_group_at_a_time(tmp_path, monkeypatch):
    """The parquet layout holds at most ROW_GROUP_BYTES of images in memory, not a whole shard."""
    import pyarrow.parquet as pq

    from udfs.export.export_shard import ParquetShard

    monkeypatch.setattr(ParquetShard, "ROW_GROUP_BYTES", 2500)
    rows = [{"key": f"k{i}", "image": {"bytes": bytes([i]) * 1000, "path": f"k{i}.png"}, "text": "t", "tags": ["a"],
             "characters": [], "multiply": 1.0, "repeats": 1, "json": "{}"} for i in range(7)]
    shard = ParquetShard(str(tmp_path / "train-000000.parquet"))
    for row in rows:
        shard.write(row)
    assert shard.bytes <= 2500  # flushed as it went
    shard.close()
    written = pq.ParquetFile(tmp_path / "train-000000.parquet")
    assert written.metadata.num_row_groups == 3  # 3 + 3 + 1 rows
    assert written.read().to_pylist() == rows


def test_an_export_task_refuses_an_out_folder_the_driver_did_not_mark(tmp_path, monkeypatch):
    """On a cluster export.out must be shared storage: a task on a node that does not see the
    driver's check file in it says so, instead of writing shards nobody will find."""
    from udfs.export import export_shard
    from udfs.export.export_shard import export_unit

    monkeypatch.setattr(export_shard, "OUT_CHECK_TRIES", 2)  # one wait of a second, not four

    with pytest.raises(RuntimeError, match="shared storage mounted at the same path"):
        export_unit({"unit": "u", "source": "s", "path": "p", "offset": 0, "shards": 1},
                    str(tmp_path / "ws"), str(tmp_path / "elsewhere"), {"out_check": "token"})


def test_images_of_a_gzip_shard_are_all_exported(tmp_path, ray_local):
    """A shard ingest read as a stream (`.tar.gz`: no name ending in .tar) is read back as a
    shard, not looked for as a folder of files (every image was missing_member)."""
    import gzip

    from jobs import curate, export, ingest
    from store.workspace import Workspace
    from tests.conftest import SAMPLE_SHARDS

    packed = tmp_path / "renpy.tar.gz"
    packed.write_bytes(gzip.compress((SAMPLE_SHARDS / "renpy-000002.tar").read_bytes(), compresslevel=1))
    cfg = base_config(tmp_path / "ws", f'ingest.inputs=["{packed}"]', 'export.formats=["webdataset"]',
                      "export.drop_duplicates=false")
    ws = Workspace(str(tmp_path / "ws"))
    for job in (ingest, curate):
        job.run(cfg, ws)
    images = ws.read_table("images")
    assert images.num_rows > 0 and set(images["source"].to_pylist()) == {str(packed)}
    summary = export.run(cfg, ws)
    assert summary.errors == 0
    exported = set()
    for path in shard_paths(tmp_path / "ws" / "export"):
        with tarfile.open(path) as tar:
            exported |= {m.name for m in tar if not m.name.endswith((".txt", ".json"))}
    assert len(exported) == images.num_rows


def test_a_shard_rewritten_since_ingest_is_not_exported_with_the_old_rows(tmp_path, ray_local):
    """The shard's images swapped around in place after ingest (same member names, other
    pictures): a member not of the size ingest saw is a missing_member row, never exported under
    the rows (size, tags, captions) of the picture it replaced; every image exported is the one
    its key's sha256 names."""
    from jobs import curate, export, ingest
    from store.workspace import Workspace
    from tests.conftest import SAMPLE_SHARDS

    shard = tmp_path / "renpy.tar"
    shutil.copy(SAMPLE_SHARDS / "renpy-000002.tar", shard)
    cfg = base_config(tmp_path / "ws", f'ingest.inputs=["{shard}"]', 'export.formats=["webdataset"]',
                      "export.drop_duplicates=false")
    ws = Workspace(str(tmp_path / "ws"))
    for job in (ingest, curate):
        job.run(cfg, ws)
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar]
    images = [i for i, (m, _) in enumerate(members) if m.name.endswith((".png", ".jpg", ".webp"))]
    swapped = dict(members)
    for i, j in zip(images, images[1:] + images[:1], strict=True):
        swapped[members[i][0]] = members[j][1]
    with tarfile.open(shard, "w") as tar:
        for info, _ in members:
            data = swapped[info]
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    sha = {r["key"]: r["sha256"] for r in ws.read_table("images").to_pylist()}
    summary = export.run(cfg, ws)
    missing = [e for e in ws.read_table("errors").to_pylist() if e["stage"] == "export"]
    assert len(images) > 2 and summary.errors_by_kind.get("missing_member") == len(missing) > 0
    exported = {key: hashlib.sha256(data).hexdigest()
                for key, data in exported_images(tmp_path / "ws" / "export").items()}
    assert len(exported) + len(missing) == len(images)
    assert {key: sha[key] for key in exported} == exported


def test_a_replacing_export_that_dies_leaves_no_index_naming_removed_shards(tmp_path_factory, tmp_path, ray_local,
                                                                          monkeypatch):
    """An export whose options changed deletes the replaced units' shards first: one that dies
    then (here its units' run raises, as a lost cluster would) leaves no index.wids.json naming
    shards that are gone, and no manifest rows for them; the next export writes both again."""
    from jobs import export
    from jobs.config import merge

    out = tmp_path / "replaced"
    cfg, ws = fresh(tmp_path_factory, f'export.out="{out}"', 'export.formats=["webdataset"]', "export.max_count=4")
    export.run(cfg, ws)
    index = out / "webdataset" / "index.wids.json"
    assert index.exists() and ws.read_table("export_manifest").num_rows > 0
    merge(cfg, {"export": {"text": "tags"}})

    def dies(*args, **kwargs):
        raise RuntimeError("the cluster went away")

    with monkeypatch.context() as patched:
        patched.setattr(export, "run_units", dies)
        with pytest.raises(RuntimeError, match="went away"):
            export.run(cfg, ws)
    assert not index.exists() and not list((out / "webdataset").glob("*.tar"))
    assert ws.connect().execute("select count(*) from export_manifest").fetchone() == (0,)
    export.run(cfg, ws)
    named = [s["url"] for s in json.loads(index.read_text())["shardlist"]]
    assert named and all((out / "webdataset" / url).is_file() for url in named)


def test_a_picture_replaced_under_the_same_size_is_exported_again(tmp_path, ray_local):
    """A BMP fixed in place (another picture of the same dimensions: the same byte count, the same
    tags) is ingested again with a new sha256. The export unit's plan held its size, not its
    content, so the unit was kept and the shard went on holding the old picture."""
    from PIL import Image

    from jobs import caption, curate, export, ingest
    from store.workspace import Workspace

    folder = tmp_path / "art"
    folder.mkdir()
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (48, 32), colour).save(folder / f"img{i}.bmp")
        (folder / f"img{i}.txt").write_text("1girl, solo")
    cfg = base_config(tmp_path / "ws", f'ingest.inputs=["{folder}"]', 'export.formats=["webdataset"]',
                      "export.drop_duplicates=false")
    ws = Workspace(str(tmp_path / "ws"))

    def exported_colours() -> dict[str, tuple]:
        for job in (ingest, curate, caption, export):
            job.run(cfg, ws)
        return {key: Image.open(io.BytesIO(data)).convert("RGB").getpixel((0, 0))
                for key, data in exported_images(tmp_path / "ws" / "export").items()}

    before = exported_colours()
    assert sorted(before.values()) == sorted([(200, 30, 30), (30, 200, 30), (30, 30, 200)])
    size = (folder / "img0.bmp").stat().st_size
    Image.new("RGB", (48, 32), (250, 250, 0)).save(folder / "img0.bmp")  # fixed: another picture
    assert (folder / "img0.bmp").stat().st_size == size
    after = exported_colours()
    key = next(k for k, c in before.items() if c == (200, 30, 30))
    assert after == {**before, key: (250, 250, 0)}


def test_a_where_reading_a_file_selects_again_when_the_file_changes(tmp_path_factory, tmp_path, ray_local):
    """export.where may read a list the user keeps beside the workspace (read_csv, or a file named
    as a table): the plan was kept when only that file changed, and the export went on writing
    the images it no longer named. Its size and time are in the plan's stamp, also through a glob."""
    from jobs import export

    keep, picked = tmp_path / "keep.csv", tmp_path / "picked-1.csv"
    out = tmp_path / "out"
    keys = sorted(expected_rows(fresh(tmp_path_factory)[1]))
    where = (f"key in (select key from read_csv('{keep}')) -- not '{tmp_path}/notes.txt'\n"
             f"and key not in (select key from '{tmp_path}/picked-*.csv')")
    cfg, ws = fresh(tmp_path_factory, f"export.where={json.dumps(where)}", f'export.out="{out}"')
    keep.write_text("key\n" + "\n".join(keys[:3]) + "\n")
    picked.write_text("key\nnone\n")
    assert export.run(cfg, ws).rows_in == 3
    keep.write_text("key\n" + "\n".join(keys[:2]) + "\n")
    assert export.run(cfg, ws).rows_in == 2
    picked.write_text(f"key\n{keys[0]}\n")
    assert export.run(cfg, ws).rows_in == 1
    (tmp_path / "notes.txt").write_text("a comment's literal is no file the where reads")
    before = export.plan_stamp(cfg, ws, str(out))
    (tmp_path / "notes.txt").write_text("changed")
    assert export.plan_stamp(cfg, ws, str(out)) == before
