"""Hostile keys never leave the export folder: safe names, path checks, and an end-to-end export
of the ingest tests' hostile shard (plus absolute, backslash, dotted and device-name members)."""

from __future__ import annotations

import os
import re
import tarfile

import pytest

from tests.curate_data import source_rows
from tests.export_data import base_config
from tests.hostile_data import encode, hostile_members, picture, write_tar

SAFE = re.compile(r"[A-Za-z0-9_-]+")
HOSTILE_KEYS = [
    "../escape", "../../etc/passwd", "/abs/path", "a/../../b", "dir/ünïcödé 🎨", "a\\..\\b", "x.y.z", "CON",
    "nul/x", "with\x00nul", "tab\tand\nnewline", "..", ".", "", "a" * 500, "a__b", "a/b", "a_/b", "a/_b",
    "shard/key with spaces", "-leading-dash",
]


@pytest.mark.parametrize("key", HOSTILE_KEYS)
def test_safe_name_is_a_plain_short_file_name(key):
    from udfs.export.safe_names import MAX_NAME, safe_name

    name = safe_name(key)
    assert SAFE.fullmatch(name) and len(name) <= MAX_NAME
    assert name.lower() not in ("con", "nul")


def test_safe_names_are_unique_and_plain_keys_stay_readable():
    from udfs.export.safe_names import safe_name

    names = [safe_name(k) for k in HOSTILE_KEYS]
    assert len(set(names)) == len(names)
    assert safe_name("renpy-000000/eileen_happy") == "renpy-000000__eileen_happy"
    assert safe_name("a__b") != safe_name("a/b")  # "__" in a key cannot pose as a folder separator
    # one file on a file system that ignores case (Windows, macOS), where kohya users train
    cased = [safe_name(k) for k in ("in/Eileen", "in/eileen", "in/EILEEN", "IN/eileen")]
    assert len({name.lower() for name in cased}) == 4


def test_inside_refuses_paths_outside_the_root(tmp_path):
    from udfs.export.safe_names import inside

    assert inside(str(tmp_path), "kohya/1_x/a.png").startswith(str(tmp_path))
    for bad in ("../x", "/etc/passwd", "a/../../x", ".", ""):
        with pytest.raises(ValueError):
            inside(str(tmp_path), bad)
    os.symlink("/tmp", tmp_path / "link")
    with pytest.raises(ValueError):
        inside(str(tmp_path), "link/x")


def test_hostile_shard_exports_inside_the_folder(tmp_path, ray_local):
    import webdataset as wds

    from jobs import curate, export, ingest
    from store.workspace import Workspace

    png = encode(picture(seed=21), "PNG")
    extra = [("/abs/path.png", png), ("a\\..\\b.png", png), ("x.y.z.png", png), ("CON.png", png),
             ("tab\tname.png", png)]
    shards = tmp_path / "in"
    shards.mkdir()
    write_tar(shards / "hostile.tar", hostile_members() + extra)
    out = tmp_path / "out"
    cfg = base_config(tmp_path / "ws", f'ingest.inputs=["{shards}"]', f'export.out="{out}"',
                      'export.formats=["webdataset", "kohya", "everydream", "parquet"]',
                      'export.concept="../../evil/concept"', "export.drop_duplicates=false", "export.max_size=64")
    ws = Workspace(str(tmp_path / "ws"))
    ingest.run(cfg, ws)
    keys = sorted(ws.read_table("images").column("key").to_pylist())
    # no captions: txt falls back to the tags; every image but one has a tag, and that one has no
    # text to write: not in the kohya and EveryDream folders (kohya refuses an empty caption
    # file), with an errors row, but in the shards and the Parquet files
    tagless = sorted(set(keys) - set(ws.read_table("source_tags").column("key").to_pylist()))
    untagged = tagless[-1]
    ws.add_part("source_tags", "test-tags", [row for key in tagless if key != untagged
                                             for row in source_rows(key, ["smile"])])
    curate.run(cfg, ws)
    summary = export.run(cfg, ws)
    images = len(keys)
    assert summary.rows_in == len(keys) and summary.errors == 1  # odd modes (CMYK, I;16, P, GIF) all export
    assert ws.connect().execute("select key, kind, dropped from errors where stage = 'export'").fetchall() == [
        (untagged, "empty_text", False)]
    layouts = ws.connect().execute("select layout, count(*), count(*) filter (where key = $k) from export_manifest "
                                   "group by 1 order by 1", {"k": untagged}).fetchall()
    assert layouts == [("everydream", images - 1, 0), ("kohya", images - 1, 0), ("parquet", images, 1),
                       ("webdataset", images, 1)]

    root = os.path.realpath(out)
    for dirpath, dirnames, filenames in os.walk(tmp_path):
        for name in dirnames + filenames:
            path = os.path.realpath(os.path.join(dirpath, name))
            assert path.startswith(str(tmp_path)), path
    for dirpath, _, filenames in os.walk(out):
        assert os.path.realpath(dirpath).startswith(root)
        for name in filenames:
            assert re.fullmatch(r"[A-Za-z0-9_.-]+", name), name
            assert not name.startswith(".tmp-")
    members = []
    for shard in sorted((out / "webdataset").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members += [m.name for m in tar]
    assert all(re.fullmatch(r"[A-Za-z0-9_-]+\.(jpg|png|webp|txt|json)", m) for m in members)
    samples = list(wds.WebDataset(sorted(str(p) for p in (out / "webdataset").glob("*.tar")), shardshuffle=False)
                   .decode("pil"))
    assert len(samples) == images
    keys = {s["json"]["key"] for s in samples}
    assert "in/hostile/../escape" in keys and "in/hostile//abs/path" in keys  # <input id>/<member path>
    for sample in samples:
        image = next(sample[e] for e in ("jpg", "png", "webp") if e in sample)
        assert max(image.size) <= 64 and image.size == (sample["json"]["width"], sample["json"]["height"])


def test_wids_reads_the_longest_names_a_shard_holds(tmp_path, monkeypatch):
    """A member name over a tar header's 100 bytes goes in a PAX header, which wids (the reader of
    index.wids.json) does not read: the sample lost its extension. The longest safe name, as
    the 999th materialised copy, with its longest extension, still fits."""
    import json

    import wids

    from udfs.export.export_plan import copy_name
    from udfs.export.export_shard import ShardTar
    from udfs.export.safe_names import safe_name

    key = "yande.re 1234567 blue_eyes long_hair smile looking_at_viewer school_uniform pleated_skirt " * 3
    name = copy_name({"name": safe_name(key), "key": key}, 999)
    shard = tmp_path / "shard-000000.tar"
    writer = ShardTar(str(shard))
    writer.write(name, {"webp": b"RIFF", "txt": b"smile", "json": b"{}"})
    writer.close()
    with tarfile.open(shard) as tar:
        assert all(len(m.name) <= 100 and not m.pax_headers for m in tar.getmembers())
    (tmp_path / "index.json").write_text(json.dumps({"wids_version": 1, "shardlist": [
        {"url": str(shard), "nsamples": 1, "filesize": shard.stat().st_size}]}))
    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "cache"))
    sample = wids.ShardListDataset(str(tmp_path / "index.json"), transformations=[])[0]
    assert sample["__key__"] == name  # members as BytesIO without transformations
    assert {k: v.getvalue() for k, v in sample.items() if k.startswith(".")} == {
        ".webp": b"RIFF", ".txt": b"smile", ".json": b"{}"}


@pytest.mark.parametrize("text,says", [("tags", "export.text = 'tags'"), ("caption", "no caption, and no tag")])
def test_the_empty_text_row_says_why_the_image_has_no_text(tmp_path, text, says):
    """With export.text = "tags" a caption is never the text: the row does not blame a missing one."""
    from udfs.export.export_shard import UnitExport

    unit = UnitExport(None, str(tmp_path), {"source": "s.tar"}, {"layouts": ["kohya", "webdataset"], "text": text})
    assert unit.written_anywhere({"key": "k", "member": "k.png", "txt": ""})
    assert len(unit.errors) == 1 and unit.errors[0]["kind"] == "empty_text" and not unit.errors[0]["dropped"]
    assert says in unit.errors[0]["message"] and "kohya" in unit.errors[0]["message"]


@pytest.mark.parametrize("folder, mark", [("C# art", "#"), ("what?", "?")])
def test_an_export_folder_with_a_url_mark_says_how_to_read_its_shards(tmp_path, monkeypatch, folder, mark):
    """webdataset and wids take a local path for a URL: a "#" or "?" in export.out ends the path
    there, and the shard pattern the summary printed (and the wids index by its path) failed with
    "No such file or directory: '.../C'". The summary says so, and how to open them: by their
    names from inside the folder, which works (checked here with both readers)."""
    import json

    import webdataset as wds
    import wids

    from jobs.export import where_notes
    from udfs.export.export_shard import ShardTar

    out = tmp_path / folder
    (out / "webdataset").mkdir(parents=True)
    shard = out / "webdataset" / "shard-000000.tar"
    writer = ShardTar(str(shard))
    writer.write("a", {"txt": b"smile", "json": b"{}"})
    writer.close()
    (out / "webdataset" / "index.wids.json").write_text(json.dumps({"wids_version": 1, "shardlist": [
        {"url": shard.name, "nsamples": 1, "filesize": shard.stat().st_size}]}))
    files = {("webdataset", "webdataset/shard-000000.tar"): 1}
    notes = " ".join(where_notes(str(out), ["webdataset"], 1, files))
    assert f"'{mark}'" in notes and "from inside" in notes and "cd " in notes
    assert not any("from inside" in n for n in where_notes(str(tmp_path / "plain"), ["webdataset"], 1, files))
    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(out / "webdataset")  # what the note says to do
    assert [s["txt"] for s in wds.WebDataset(["shard-000000.tar"], shardshuffle=False)] == [b"smile"]
    assert len(wids.ShardListDataset("index.wids.json")) == 1


def test_an_export_folder_with_braces_says_to_pass_the_shards_as_a_list(tmp_path):
    """webdataset expands braces anywhere in a URL string: the summary's pattern
    "<out>/webdataset/shard-{000000..000004}.tar" under a folder "set {a,b}" opened "set a/..." and
    failed. The summary says to pass the shards as a list of paths (which webdataset does not expand)."""
    import webdataset as wds

    from jobs.export import where_notes
    from udfs.export.export_shard import ShardTar

    out = tmp_path / "set {a,b}"
    (out / "webdataset").mkdir(parents=True)
    writer = ShardTar(str(out / "webdataset" / "shard-000000.tar"))
    writer.write("a", {"txt": b"smile", "json": b"{}"})
    writer.close()
    files = {("webdataset", "webdataset/shard-000000.tar"): 1}
    notes = " ".join(where_notes(str(out), ["webdataset"], 1, files))
    assert "braces" in notes and "as a list" in notes
    assert "braces" not in " ".join(where_notes(str(tmp_path / "plain"), ["webdataset"], 1, files))
    shards = [str(out / "webdataset" / "shard-000000.tar")]  # what the note says to do
    assert [s["txt"] for s in wds.WebDataset(shards, shardshuffle=False)] == [b"smile"]


def test_an_export_folder_with_glob_marks_says_how_datasets_loads_its_parquet_files(tmp_path):
    """Hugging Face datasets takes data_files for glob patterns, even a list of paths: under a folder
    "[2023] art" it found no file ("Please pass `features` or at least one example"). The summary
    says to pass them through glob.escape, which loads them (checked here)."""
    import glob

    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.export import where_notes

    out = tmp_path / "[2023] art"
    (out / "parquet").mkdir(parents=True)
    pq.write_table(pa.table({"key": ["a", "b"], "text": ["smile", "hat"]}), out / "parquet" / "train-000000.parquet")
    files = {("parquet", "parquet/train-000000.parquet"): 2}
    notes = " ".join(where_notes(str(out), ["parquet"], 0, files))
    assert "glob.escape" in notes and "'['" in notes
    assert "glob.escape" not in " ".join(where_notes(str(tmp_path / "plain"), ["parquet"], 0, files))
    paths = sorted(glob.glob(glob.escape(str(out)) + "/parquet/*.parquet"))
    loaded = datasets.load_dataset("parquet", data_files=[glob.escape(p) for p in paths], split="train",
                                   cache_dir=str(tmp_path / "cache"))  # what the note says to do
    assert loaded["text"] == ["smile", "hat"]
