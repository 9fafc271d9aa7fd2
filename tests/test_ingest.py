"""The ingest job on hostile shards, folders, URIs and the bundled sample."""

from __future__ import annotations

import bz2
import gzip
import io
import json
import lzma
import os
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pyarrow as pa
import pytest
from hostile_data import EXPECTED, encode, hostile_members, picture, write_tar
from s3_server import AWS, s3_filesystem

from jobs import ingest
from jobs.config import load_config
from store.workspace import Workspace
from udfs.ingest.sources import Unit, read_unit

pytestmark = pytest.mark.usefixtures("ray_local")


def run_ingest(tmp_path, inputs: list[str], *extra: str):
    quoted = ", ".join(f'"{i}"' for i in inputs)
    cfg = load_config(None, [f'workspace.path="{tmp_path / "ws"}"', f"ingest.inputs=[{quoted}]", *extra])
    ws = Workspace(cfg["workspace"]["path"])
    return ingest.run(cfg, ws), ws


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("hostile")
    write_tar(tmp / "hostile.tar", hostile_members())
    # animations as single images (the option's off state); tests/test_ingest_clips.py has them as clips
    summary, ws = run_ingest(tmp, [str(tmp / "hostile.tar")], "ingest.max_sidecar_bytes=1048576",
                             "ingest.frames.enabled=false")
    return summary, ws


def test_every_member_is_accounted_for(hostile):
    summary, ws = hostile
    images, errors = ws.read_table("images"), ws.read_table("errors")
    assert summary.rows_in == len(EXPECTED)
    dropped = [e for e in errors.to_pylist() if e["dropped"]]
    assert images.num_rows + len(dropped) == summary.rows_in
    assert "accounting: 24 images + 5 dropped samples = 29 samples seen" in summary.render()


def test_each_bad_sample_has_its_reason(hostile):
    _, ws = hostile
    modes = {r["key"]: r["mode"] for r in ws.read_table("images").to_pylist()}
    kinds = {r["key"]: r["kind"] for r in ws.read_table("errors").to_pylist() if r["dropped"]}
    for key, (outcome, value) in EXPECTED.items():
        full = f"hostile/{key}"
        if outcome == "image":
            assert modes.get(full) == value, key
        else:
            assert kinds.get(full) == value, key


def test_image_facts(hostile):
    _, ws = hostile
    rows = {r["key"]: r for r in ws.read_table("images").to_pylist()}
    good = rows["hostile/good"]
    assert (good["width"], good["height"], good["format"], good["n_frames"]) == (96, 64, "JPEG", 1)
    assert rows["hostile/animated"]["n_frames"] == 3
    assert rows["hostile/good"]["phash"] == rows["hostile/cap"]["phash"]  # same bytes, same hash
    assert rows["hostile/good"]["sha256"] == rows["hostile/cap"]["sha256"]
    assert rows["hostile/good"]["phash"] != rows["hostile/booru"]["phash"]
    assert rows["hostile/../escape"]["member"] == "../escape.png"


def test_sidecar_formats(hostile):
    _, ws = hostile
    tags: dict[str, list[tuple[str, str, str]]] = {}
    for r in sorted(ws.read_table("source_tags").to_pylist(), key=lambda r: (r["key"], r["position"])):
        tags.setdefault(r["key"].removeprefix("hostile/"), []).append((r["tag"], r["category"], r["origin"]))
    assert [t for t, _, _ in tags["good"]] == ["1girl", "solo", "short_hair", "red_hair", "(cosplay)"]
    assert tags["booru"] == [("1boy", "general", "booru"), ("solo", "general", "booru"),
                             ("black_hair", "general", "booru")]
    assert ("hakurei_reimu", "character", "three_line") in tags["three"]
    assert ("touhou", "copyright", "three_line") in tags["three"]
    assert ("red_skirt", "general", "three_line") in tags["three"]
    # who and from what first, as in a .txt
    assert [(t, c) for t, c, _ in tags["post"][:3]] == [("hatsune_miku", "character"), ("vocaloid", "copyright"),
                                                         ("someone", "artist")]
    assert ("sensitive", "rating", "danbooru_json") in tags["post"]
    assert ("highres", "meta", "danbooru_json") in tags["post"]
    assert [t for t, _, _ in tags["cp1252"]][:2] == ["café", "naïve"]
    assert "hugeside" not in tags  # too large: reported, ignored


def test_sidecar_problems_keep_the_image(hostile):
    _, ws = hostile
    errors = {r["key"]: r for r in ws.read_table("errors").to_pylist()}
    assert errors["hostile/hugeside"]["kind"] == "sidecar_too_large"
    assert errors["hostile/hugeside"]["dropped"] is False


def test_broken_sidecars_are_reported_and_keep_their_image(hostile):
    """JSON the parser refuses in other ways than a syntax error, lone surrogates, NULs, UTF-16
    without a BOM: each an errors row of its own, never the job's failure, never a tag with a NUL."""
    _, ws = hostile
    errors: dict[str, list[tuple[str, str]]] = {}
    for r in ws.read_table("errors").to_pylist():
        errors.setdefault(r["key"].removeprefix("hostile/"), []).append((r["kind"], r["message"]))
    tags: dict[str, list[str]] = {}
    for r in sorted(ws.read_table("source_tags").to_pylist(), key=lambda r: (r["key"], r["position"])):
        tags.setdefault(r["key"].removeprefix("hostile/"), []).append(r["tag"])
    assert [k for k, m in errors["bigint"]] == ["sidecar_json"] and "digits" in errors["bigint"][0][1]
    assert [k for k, m in errors["deep"]] == ["sidecar_json"] and "RecursionError" in errors["deep"][0][1]
    assert [k for k, m in errors["tagsdict"]] == ["sidecar_json"]
    assert "bigint" not in tags and "deep" not in tags and "tagsdict" not in tags
    assert [k for k, m in errors["surrogate"]] == ["bad_characters"]
    assert tags["surrogate"] == ["ok", "bad?tag"]
    assert [k for k, m in errors["utf16"]] == ["sidecar_encoding_guessed"] and tags["utf16"] == ["1girl", "solo"]
    assert [k for k, m in errors["nul"]] == ["bad_characters"] and tags["nul"] == ["1girl", "solo"]
    assert [k for k, m in errors["nuljson"]] == ["bad_characters"] * 2 and tags["nuljson"] == ["longhair", "ok"]
    # JSON escapes get past the raw text's cleaning: the caption is cleaned after parsing, as the tags
    # are (a line break is kept)
    texts = {r["key"]: r["text"] for r in ws.read_table("source_text").to_pylist() if r["kind"] == "caption"}
    assert texts["hostile/nuljson"] == "a girl with [31mred hair\nand a bow"
    assert "caption with 2 control characters" in errors["nuljson"][1][1]


def test_embedded_metadata(hostile):
    _, ws = hostile
    rows = ws.read_table("source_text").to_pylist()
    texts = {(r["key"].removeprefix("hostile/"), r["kind"]): r["text"] for r in rows}
    assert texts[("cap", "caption")] == "A girl waves — “hello”."
    assert texts[("a1111", "sd_prompt")] == "1girl, solo, red hair"
    assert texts[("a1111", "sd_negative")] == "lowres, bad hands"
    assert '"Steps": 20' in texts[("a1111", "sd_params")]
    for key in ("nai", "stealth"):  # stealth: only in the alpha channel's least significant bits
        assert texts[(key, "sd_prompt")] == "2girls, hug"
        assert texts[(key, "sd_negative")] == "blurry"


def test_truncated_shard_keeps_what_it_can(tmp_path):
    members = [(f"s{i}.png", encode(picture(seed=i), "PNG")) for i in range(6)]
    whole = write_tar(tmp_path / "whole.tar", members).read_bytes()
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "cut.tar").write_bytes(whole[: int(len(whole) * 0.6)])
    summary, ws = run_ingest(tmp_path, [str(tmp_path / "in")])
    images = ws.read_table("images").num_rows
    errors = ws.read_table("errors").to_pylist()
    assert 1 <= images < 6
    assert any(e["kind"] == "corrupt_shard" for e in errors)
    assert images + summary.dropped == summary.rows_in


def test_a_shard_whose_member_headers_end_badly_says_so(tmp_path):
    """tarfile stops quietly at a missing, cut or zeroed member header: each such shard gets an
    errors row, read with seeks (plain) or as a stream (gzip)."""
    members = [(f"s{i}.png", encode(picture(seed=i), "PNG")) for i in range(4)]
    whole = write_tar(tmp_path / "whole.tar", members).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        third = tar.getmembers()[2].offset  # where the third member's header starts
    (tmp_path / "in").mkdir()
    shards = {"boundary": whole[:third], "in_header": whole[:third + 100], "whole": whole}
    for name, data in shards.items():
        (tmp_path / "in" / f"{name}.tar").write_bytes(data)
    (tmp_path / "packed.tar.gz").write_bytes(gzip.compress(whole[:third]))
    _, ws = run_ingest(tmp_path, [str(tmp_path / "in"), str(tmp_path / "packed.tar.gz")])
    errors = {e["key"].removeprefix("in/"): e for e in ws.read_table("errors").to_pylist()}
    assert {k: e["kind"] for k, e in errors.items()} == {
        "boundary": "truncated_shard", "in_header": "truncated_shard", "packed.tar.gz": "truncated_shard"}
    assert "end-of-archive" in errors["boundary"]["message"]
    assert ws.read_table("images").num_rows == 3 * 2 + 4  # what each read before its end, and the whole one


def test_a_damaged_member_header_loses_that_member_only(tmp_path):
    """Past a damaged or zeroed member header, the shard is read on from the next good header:
    the members after it are kept, and an errors row says where the lost bytes lie (cases:
    tests/test_shard_tar.py). Data after tar's end is reported, not read."""
    members = [(f"s{i}.png", encode(picture(seed=i), "PNG")) for i in range(4)]
    whole = write_tar(tmp_path / "whole.tar", members).read_bytes()
    with tarfile.open(tmp_path / "whole.tar") as tar:
        third, fourth = [m.offset for m in tar.getmembers()[2:]]
    bad_sum, zeroed, first_bad = bytearray(whole), bytearray(whole), bytearray(whole)
    bad_sum[third + 148:third + 156] = b"0000000\x00"  # the third header's checksum is wrong
    zeroed[third:third + 512] = bytes(512)  # tar's end, to tarfile: it stopped there without a word
    first_bad[148:156] = b"0000000\x00"  # the shard did not open as a tar: all four were lost
    (tmp_path / "in").mkdir()
    for name, data in {"bad_sum.tar": bad_sum, "zeroed.tar": zeroed, "bad_packed.tar.gz": gzip.compress(bad_sum),
                       "first_bad.tar": first_bad, "first_bad_packed.tar.gz": gzip.compress(first_bad),
                       "two_in_one.tar": whole + whole}.items():
        (tmp_path / "in" / name).write_bytes(data)
    summary, ws = run_ingest(tmp_path, [str(tmp_path / "in")])
    errors = {e["key"].removeprefix("in/"): e for e in ws.read_table("errors").to_pylist()}
    damaged = {"bad_sum": 2, "zeroed": 2, "bad_packed": 2, "first_bad": 0, "first_bad_packed": 0}  # which member
    assert {k: e["kind"] for k, e in errors.items()} == dict.fromkeys([*damaged, "two_in_one"], "corrupt_shard")
    assert "bad checksum" in errors["bad_sum"]["message"] and "zeroed" in errors["zeroed"]["message"]
    assert f"at byte {third} " in errors["bad_sum"]["message"] and f"at byte {fourth};" in errors["bad_sum"]["message"]
    assert "another archive appended" in errors["two_in_one"]["message"]
    keys = {k.removeprefix("in/") for k in ws.read_table("images").column("key").to_pylist()}
    for shard, lost in {**damaged, "two_in_one": None}.items():
        assert {k for k in keys if k.startswith(shard + "/")} == {f"{shard}/s{i}" for i in range(4) if i != lost}
    assert summary.rows_in == 5 * 3 + 4 and not any(e["dropped"] for e in errors.values())


def test_a_shard_an_older_reader_found_damaged_is_read_again_once(tmp_path):
    """A workspace from before reading past damaged headers lost the members after one. Its unit
    (a marker without this reader's version) is read again by the next ingest, its rows replaced
    as a changed shard's are; a whole shard's unit is not, and the run after does nothing."""
    members = [(f"s{i}.png", encode(picture(seed=i), "PNG")) for i in range(4)]
    (tmp_path / "in").mkdir()
    whole = write_tar(tmp_path / "in" / "whole.tar", members).read_bytes()
    with tarfile.open(tmp_path / "in" / "whole.tar") as tar:
        third = tar.getmembers()[2].offset
    damaged = bytearray(whole)
    damaged[third + 148:third + 156] = b"0000000\x00"
    (tmp_path / "in" / "bad.tar").write_bytes(bytes(damaged))
    _, ws = run_ingest(tmp_path, [str(tmp_path / "in")])
    state = Path(ws.state_dir("ingest"))
    for path in state.glob("*.json"):  # as the older reader committed them
        marker = json.loads(path.read_text())
        del marker["reader"]
        path.write_text(json.dumps(marker, sort_keys=True))
    keys = sorted(f"in/{s}/s{i}" for s in ("whole", "bad") for i in range(4) if (s, i) != ("bad", 2))
    assert sorted(ws.read_table("images").column("key").to_pylist()) == keys
    first = {p.name for p in state.glob("*.json")}

    for rerun in ("read again", "killed before the new unit's commit, run again"):
        summary, ws = run_ingest(tmp_path, [str(tmp_path / "in")])
        assert summary.units_done == 1 and any(n.startswith("read again: 1 units") for n in summary.notes), rerun
        assert not any(n.startswith("replaced") for n in summary.notes), rerun
        assert sorted(ws.read_table("images").column("key").to_pylist()) == keys, rerun
        assert [e["kind"] for e in ws.read_table("errors").to_pylist()] == ["corrupt_shard"], rerun  # not twice
        if rerun == "read again":  # the old unit is retired now: as if the run died before this commit
            [new_unit] = {p.name for p in state.glob("*.json")} - first
            (state / new_unit).unlink()
    summary, _ = run_ingest(tmp_path, [str(tmp_path / "in")])
    assert summary.units_done == 0 and summary.rows_out["images"] == 7


def test_units_with_images_an_older_reader_could_not_probe_are_read_again_once(tmp_path):
    """Readers before 5 dropped palette and 1-bit images of 512 pixels a side or more as
    corrupt_image ("image has wrong mode"). A shard or folder unit committed with such a row by
    such a reader is read again, its rows replaced (not doubled); a unit whose corrupt_image is
    another (a broken file, which no reader recovers) is not: a unit read again is annotated again."""
    import pyarrow.parquet as pq

    palette = io.BytesIO()
    picture(seed=1).resize((600, 520)).quantize(16).save(palette, "PNG")
    broken = bytearray(encode(picture(seed=2), "PNG"))
    broken[100:140] = b"\xff" * 40  # a broken data stream: corrupt_image
    for folder in ("in", "clean", "broken"):
        (tmp_path / folder).mkdir()
    write_tar(tmp_path / "in" / "s.tar", [("p.png", palette.getvalue()), ("bad.png", bytes(broken))])
    (tmp_path / "in" / "p.png").write_bytes(palette.getvalue())
    (tmp_path / "clean" / "ok.png").write_bytes(encode(picture(seed=3), "PNG"))
    (tmp_path / "broken" / "bad.png").write_bytes(bytes(broken))
    inputs = [str(tmp_path / f) for f in ("in", "clean", "broken")]
    _, ws = run_ingest(tmp_path, inputs)
    keys = ["clean/ok", "in/p", "in/s/p"]
    assert sorted(ws.read_table("images").column("key").to_pylist()) == keys
    state = Path(ws.state_dir("ingest"))
    for path in state.glob("*.json"):  # as reader 4 committed them: the palette images lost too
        marker = json.loads(path.read_text())
        marker["reader"] = 4
        if marker["input"] == "in":
            marker["error_kinds"]["corrupt_image"] = marker["error_kinds"].get("corrupt_image", 0) + 1
            errors = Path(ws.table_dir("errors")) / f"{marker['parts']['images'][0]}.parquet"
            rows = pq.read_table(errors).to_pylist() if errors.exists() else []
            lost = {"key": "in/p", "source": "in", "member": "p.png", "stage": "ingest", "kind": "corrupt_image",
                    "message": "ValueError: image has wrong mode", "dropped": True}
            ws.write_part("errors", errors.stem, rows + [lost])
            marker["parts"]["errors"] = [errors.stem]
        path.write_text(json.dumps(marker, sort_keys=True))
    summary, ws = run_ingest(tmp_path, inputs)
    assert summary.units_done == 2 and any(n.startswith("read again: 2 units") for n in summary.notes)
    assert sorted(ws.read_table("images").column("key").to_pylist()) == keys
    assert sorted(e["key"] for e in ws.read_table("errors").to_pylist()) == ["broken/bad", "in/s/bad"]
    summary, _ = run_ingest(tmp_path, inputs)
    assert summary.units_done == 0 and summary.rows_out["images"] == 3


def test_compressed_and_plain_shards_give_the_same_rows(tmp_path):
    """A local plain shard is read with seeks; a gzip one (which cannot be) as a stream: same rows."""
    members = [(f"s{i}.{ext}", data) for i in range(4)
               for ext, data in (("png", encode(picture(seed=i), "PNG")), ("txt", f"1girl, tag{i}".encode()))]
    write_tar(tmp_path / "plain.tar", members)
    with tarfile.open(tmp_path / "packed.tar.gz", "w:gz") as packed:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            packed.addfile(info, io.BytesIO(data))
    rows = {}
    for name in ("plain.tar", "packed.tar.gz"):
        _, ws = run_ingest(tmp_path / name.split(".")[0], [str(tmp_path / name)])
        images = ws.read_table("images").select(["member", "sha256", "phash"]).to_pylist()
        tags = ws.read_table("source_tags").select(["tag"]).to_pylist()
        rows[name] = (sorted(images, key=lambda r: r["member"]), sorted(t["tag"] for t in tags))
        assert ws.read_table("errors").num_rows == 0
    assert len(rows["plain.tar"][0]) == 4 and rows["plain.tar"] == rows["packed.tar.gz"]


def test_compressed_shards_in_a_folder_are_shards(tmp_path):
    """A folder of inputs may hold .tar.gz / .tgz / .tar.xz / .tar.bz2 / .tar.zst shards beside plain
    ones (each written in pieces: bgzip, pbzip2, pzstd): each is read as a shard (not passed over
    as a stray file), whole, its keys named without the suffix."""
    members = [(f"s{i}.{ext}", data) for i in range(2)
               for ext, data in (("png", encode(picture(seed=i), "PNG")), ("txt", f"1girl, tag{i}".encode()))]
    folder = tmp_path / "in"
    folder.mkdir()
    plain = write_tar(folder / "a.tar", members).read_bytes()
    (folder / "b.tar.gz").write_bytes(gzip.compress(plain))
    (folder / "c.tgz").write_bytes(gzip.compress(plain))
    (folder / "d.tar.xz").write_bytes(lzma.compress(plain))
    half = len(plain) // 2  # two pieces: a reader of the first alone would lose members
    zstd = pa.Codec("zstd")
    for name, compress in (("e.tar.bz2", bz2.compress), ("f.tar.zst", lambda b: zstd.compress(b, asbytes=True)),
                           ("g.tar.gz", gzip.compress)):
        (folder / name).write_bytes(compress(plain[:half]) + compress(plain[half:]))
    _, ws = run_ingest(tmp_path, [str(folder)])
    assert sorted(ws.read_table("images")["key"].to_pylist()) == [f"in/{s}/s{i}" for s in "abcdefg" for i in range(2)]
    assert ws.read_table("errors").num_rows == 0


def test_folder_input_with_same_stem_sidecars(tmp_path):
    folder = tmp_path / "kohya" / "10_concept"
    folder.mkdir(parents=True)
    for i in range(3):
        picture(seed=i).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"1girl, tag{i}")
    (folder / "notes.md").write_text("not a sample")
    summary, ws = run_ingest(tmp_path, [str(tmp_path / "kohya")], "ingest.folder_unit_size=2")
    assert sorted(ws.read_table("images")["key"].to_pylist()) == [
        "kohya/10_concept/img0", "kohya/10_concept/img1", "kohya/10_concept/img2"]  # <input id>/<path>
    assert ws.read_table("images")["member_offset"].null_count == 3  # files, not members of a shard
    assert ws.read_table("source_tags").num_rows == 6
    assert [e["kind"] for e in ws.read_table("errors").to_pylist()] == ["no_image"]


def test_folder_names_with_several_dots(tmp_path):
    """In a folder the key ends at the last dot (booru downloads are named `yande.re 123 tags.jpg`),
    a sidecar may be named after its image's whole name (gallery-dl's `a.jpg.json`), and a file
    of another kind beside an image is reported, not passed over."""
    folder = tmp_path / "dl"
    folder.mkdir()
    picture(seed=1).save(folder / "yande.re 123 long_hair.jpg")
    picture(seed=2).save(folder / "abc.jpg")
    (folder / "abc.jpg.json").write_text('{"tags": ["1girl", "smile"]}')
    picture(seed=3).save(folder / "stem.png")
    (folder / "stem.psd").write_bytes(b"8BPS layers")
    picture(seed=4).save(folder / ".hidden.png")
    _, ws = run_ingest(tmp_path, [str(folder)])
    assert sorted(ws.read_table("images")["key"].to_pylist()) == ["dl/.hidden", "dl/abc", "dl/stem",
                                                                  "dl/yande.re 123 long_hair"]
    assert sorted(ws.read_table("source_tags")["tag"].to_pylist()) == ["1girl", "smile"]
    errors = ws.read_table("errors").to_pylist()
    assert [(e["key"], e["member"], e["kind"], e["dropped"]) for e in errors] == [
        ("dl/stem", "stem.psd", "ignored_member", False)]


def test_uri_and_brace_inputs(tmp_path):
    for i in range(3):
        write_tar(tmp_path / f"part-{i}.tar", [(f"k{i}.png", encode(picture(seed=i), "PNG"))])
    summary, _ = run_ingest(tmp_path, [f"file://{tmp_path}/part-0.tar", f"{tmp_path}/part-{{1..2}}.tar"])
    assert summary.rows_out["images"] == 3


def test_an_input_whose_name_has_glob_or_brace_characters_is_itself(tmp_path):
    """A folder named `[2023] art` (a downloader's date prefix) or `art {a,b}` was "input not
    found": its name was read as a pattern, which it does not match. A path that is there is itself."""
    from udfs.ingest.sources import resolve_inputs

    for name in ("[2023] art", "art {a,b}", "set [v2].tar"):
        (tmp_path / name).mkdir()
        assert resolve_inputs([str(tmp_path / name)]) == [str(tmp_path / name)]
    assert resolve_inputs([f"{tmp_path}/art {{a,b}}", f"{tmp_path}/*]*"]) == [
        str(tmp_path / "art {a,b}"), str(tmp_path / "[2023] art"), str(tmp_path / "set [v2].tar")]


def a_folder_of_images(folder: Path) -> Path:
    """Loose images with sidecars, in a subfolder too, one name with a space and one with two dots."""
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a", "b c", "sub/d", "yande.re 5"]):
        picture(seed=i).save(folder / f"{name}.png")
        (folder / f"{name}.txt").write_text(f"1girl, tag{i}")
    (folder / "sub" / "e.jpg").write_bytes(encode(picture(seed=9), "JPEG"))
    (folder / "notes.md").write_text("not a sample")
    return folder


def test_a_uri_folder_of_images_is_read_as_the_folder_on_disk(tmp_path):
    """A folder of images on object storage (file:// stands in; S3 below) is read as folder units:
    the same keys, bytes and tags as the folder read from disk, and a changed file redoes only
    its unit."""
    folder = a_folder_of_images(tmp_path / "pictures")
    tables = {}
    for side, spec in (("disk", str(folder)), ("uri", folder.as_uri())):
        _, ws = run_ingest(tmp_path / side, [spec], "ingest.folder_unit_size=2")
        con = ws.connect()
        tables[side] = [con.execute(f"select * exclude (source) from {t} order by all").fetchall()
                        for t in ("images", "errors")]
        tables[side].append(con.execute("select * from source_tags order by all").fetchall())
        sources = {row[0] for row in con.execute("select distinct source from images").fetchall()}
        assert sources == ({str(folder)} if side == "disk" else {folder.as_uri() + "/"}), side
    assert tables["uri"] == tables["disk"]
    images = tables["uri"][0]
    assert len(images) == 5 and any("yande.re 5" in str(row) for row in images)
    assert [row[3] for row in tables["uri"][1]] == ["no_image"]  # notes.md, as on disk

    picture(width=80, seed=7).save(folder / "a.png")  # changed: its unit alone is read again
    summary, ws = run_ingest(tmp_path / "uri", [folder.as_uri()], "ingest.folder_unit_size=2")
    assert summary.units_done == 1 and summary.units_skipped >= 1 and summary.rows_out["images"] == 5
    # the rate counts the samples of the unit read now, not those of the units done before
    assert 0 < summary.rows_run < summary.rows_in and f"({summary.rows_run} in the units run now)" in summary.render()
    assert ws.connect().execute("select count(*) from images").fetchone()[0] == 5


def test_a_name_with_a_backslash_before_xnn_has_one_key_on_disk_and_on_object_storage(tmp_path):
    """`\\xe9.png` on disk is keyed `\\x5cxe9` (apart from a name with the byte 0xE9); the same
    folder read through a URI gives the same keys and members, and later jobs read the file back."""
    from review.image_bytes import image_bytes

    folder = tmp_path / "pics"
    folder.mkdir()
    picture(seed=1).save(folder / "\\xe9.png")
    picture(seed=2).save(folder / "a\\b.png")
    tables = {}
    for side, spec in (("disk", str(folder)), ("uri", folder.as_uri())):
        _, ws = run_ingest(tmp_path / side, [spec])
        tables[side] = rows = ws.read_table("images").select(["key", "member", "sha256", "source"]).to_pylist()
        for row in rows:
            assert image_bytes(row["source"], row["member"]) == (folder / row["member"].replace("\\x5c", "\\")
                                                                 ).read_bytes(), side
    assert sorted(r["key"] for r in tables["uri"]) == ["pics/\\x5cxe9", "pics/a\\b"]
    assert [(r["key"], r["member"], r["sha256"]) for r in sorted(tables["uri"], key=lambda r: r["key"])] == [
        (r["key"], r["member"], r["sha256"]) for r in sorted(tables["disk"], key=lambda r: r["key"])]


def test_input_ids_leave_out_a_uris_query_and_keep_the_ones_registered_with_it():
    from udfs.ingest.sources import assign_input_ids

    ids = assign_input_ids(["s3://b/shards?endpoint_override=h:9000", "/data/shards"], {})
    assert ids == {"s3://b/shards": "shards", "/data/shards": "shards-" + ids["/data/shards"][-8:]}
    assert assign_input_ids(["s3://b/shards?endpoint_override=other:9000"], ids)["s3://b/shards"] == "shards"
    old = {"s3://b/s.tar?endpoint_override=h:9000": "s.tar_endpoint_override_h_9000"}  # an earlier version's
    assert assign_input_ids(["s3://b/s.tar?endpoint_override=h:9000"], old)["s3://b/s.tar"] == old[next(iter(old))]


def test_rerun_skips_done_units(tmp_path):
    write_tar(tmp_path / "one.tar", [("a.png", encode(picture(), "PNG"))])
    first, ws = run_ingest(tmp_path, [str(tmp_path / "one.tar")])
    second, ws = run_ingest(tmp_path, [str(tmp_path / "one.tar")])
    assert (first.units_done, second.units_done, second.units_skipped) == (1, 0, 1)
    assert ws.read_table("images").num_rows == 1
    assert second.rows_out["images"] == 1  # the summary still counts the whole input


def test_several_shards_per_task_commit_each_shard_as_its_own_unit(tmp_path):
    """ingest.shards_per_task = 2 over 3 shards: two tasks, still one unit (marker, rows) per
    shard, and the same rows as one shard per task."""
    for i in range(3):
        write_tar(tmp_path / f"s{i}.tar", [(f"k{i}.png", encode(picture(seed=i), "PNG")), (f"k{i}.txt", b"tag")])
    inputs = [str(tmp_path / f"s{i}.tar") for i in range(3)]
    grouped, ws = run_ingest(tmp_path / "grouped", inputs, "ingest.shards_per_task=2")
    alone, ws_alone = run_ingest(tmp_path / "alone", inputs)
    assert (grouped.units_done, grouped.rows_out["images"]) == (3, 3)
    assert len(ws.done_units("ingest")) == 3
    assert sorted(ws.read_table("images").column("sha256").to_pylist()) == \
        sorted(ws_alone.read_table("images").column("sha256").to_pylist())
    again, _ = run_ingest(tmp_path / "grouped", inputs, "ingest.shards_per_task=2")
    assert (again.units_done, again.units_skipped) == (0, 3)


def test_sample_workspace_catalog_answers_sql(tmp_path):
    summary, ws = run_ingest(tmp_path, [""])
    assert summary.rows_out["images"] == 24 and summary.errors == 0
    con = duckdb.connect(str(tmp_path / "ws" / "catalog.duckdb"), read_only=True)
    formats = dict(con.execute("select format, count(*) from images group by 1").fetchall())
    assert formats == {"JPEG": 10, "PNG": 14}
    characters = con.execute(
        "select count(distinct key) from source_tags where tag = $tag",
        {"tag": "sylvie_(the_question)"}).fetchone()[0]
    assert characters == 8
    con.close()
    # the DuckDB command-line tool installed with booruset (duckdb-cli) opens the same catalog
    cli = Path(sys.executable).with_name("duckdb")
    out = subprocess.run([str(cli), "-csv", "-noheader", str(tmp_path / "ws" / "catalog.duckdb"),
                          "select count(*) from images"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "24"


def test_catalog_is_rewritten_only_when_its_views_change(tmp_path):
    """A publish with nothing new (a job's start) leaves catalog.duckdb as it is; a publish with a
    new part rewrites it; a catalog whose fingerprint was never written (a process killed between
    the two writes) is rewritten at the next publish even with nothing new."""
    ws = Workspace(str(tmp_path / "ws"))
    row = {"key": "a", "tag": "x", "category": "general", "origin": "txt", "position": 0}
    ws.add_part("source_tags", "unit-a", [row])
    catalog = tmp_path / "ws" / "catalog.duckdb"

    def rows() -> int:
        con = duckdb.connect(str(catalog), read_only=True)
        try:
            return con.execute("select count(*) from source_tags").fetchone()[0]
        finally:
            con.close()

    written = catalog.stat().st_ino
    ws.publish()
    assert catalog.stat().st_ino == written and rows() == 1
    ws.add_part("source_tags", "unit-b", [row, row])
    assert catalog.stat().st_ino != written and rows() == 3
    written = catalog.stat().st_ino
    (tmp_path / "ws" / "state" / "catalog.json").unlink()
    ws.publish()
    assert catalog.stat().st_ino != written and rows() == 3


def test_duplicate_keys_in_one_shard(tmp_path):
    png = encode(picture(), "PNG")
    buf = tmp_path / "dup.tar"
    with tarfile.open(buf, "w") as tar:
        for name in ("a.png", "b.png", "a.txt"):
            info = tarfile.TarInfo(name)
            data = png if name.endswith("png") else b"x"
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    summary, ws = run_ingest(tmp_path, [str(buf)])
    assert ws.read_table("images").num_rows == 2
    assert [e["kind"] for e in ws.read_table("errors").to_pylist()] == ["duplicate_key"]


def test_views_ignore_writes_in_progress(tmp_path):
    """A job killed between writing a part and publishing it leaves files behind (a whole part of
    a unit that never committed, a temporary name): the catalog views must not read them (rows
    twice, or a half-written file), and the next job's start deletes them."""
    ws = Workspace(str(tmp_path / "ws"))
    row = {"key": "a", "tag": "x", "category": "general", "origin": "txt", "position": 0}
    ws.add_part("source_tags", "unit-a", [row])
    ws.write_part("source_tags", "unit-b", [row, row])  # written, never committed nor published
    folder = Path(ws.table_dir("source_tags"))
    (folder / "curate-gen-00000.parquet").write_bytes((folder / "unit-a.parquet").read_bytes())
    (folder / ".tmp-unit-b-123.parquet").write_bytes(b"PAR1 half written")
    assert ws.connect().execute("select count(*) from source_tags").fetchone()[0] == 1
    ws.refresh_catalog()
    con = duckdb.connect(str(tmp_path / "ws" / "catalog.duckdb"), read_only=True)
    assert con.execute("select count(*) from source_tags").fetchone()[0] == 1
    con.close()
    assert ws.begin_job() == 2  # unit-b and the curate part nobody published
    assert sorted(p.name for p in folder.iterdir()) == [".tmp-unit-b-123.parquet", "unit-a.parquet"]


def test_a_workspace_from_before_generations_keeps_its_tables(tmp_path):
    """Markers written before they named their parts, and curate's renamed output: the first
    publish keeps every table as its readers saw it, and deletes nothing."""
    ws = Workspace(str(tmp_path / "ws"))
    row = {"key": "a", "tag": "x", "category": "general", "origin": "txt", "position": 0}
    ws.write_part("source_tags", "unit-a", [row])
    ws.write_part("images", "unit-a", [{"key": "a", "source": "s", "member": "a.png"}])
    ws.write_part("tags", "curate-0123abcd-00000", [{"key": "a", "tag": "x", "category": "general", "rank": 1}])
    ws.write_part("captions", "cap-1", [{"key": "a", "attempt": 0, "caption": "x", "accepted": True}])
    for job, unit in (("ingest", "unit-a"), ("caption", "cap-1")):
        ws.fs.create_dir(ws.state_dir(job), recursive=True)
        with ws.fs.open_output_stream(f"{ws.state_dir(job)}/{unit}.json") as out:
            out.write(b'{"images": 1}')
    assert ws.begin_job() == 0
    assert {t: ws.read_table(t).num_rows for t in ("images", "source_tags", "tags", "captions")} == {
        "images": 1, "source_tags": 1, "tags": 1, "captions": 1}
    assert ws.published()["owned"]["curate"] == {"tags": ["curate-0123abcd-00000"]}
    ws.forget_unit("caption", "cap-1")  # a stale unit, as caption forgets it: its rows go at the run's end
    ws.release_hold("caption")
    ws.publish()
    assert ws.read_table("captions").num_rows == 0


def test_parts_from_before_a_column_was_added_are_read_with_nulls(tmp_path):
    """A workspace published by an older booruset, with parts that lack a column added since
    (first and last in file order): the first publish of this version finds them (once, from
    their footers) and only their table's view reads by name; every other view binds from its
    first file."""
    import pyarrow.parquet as pq

    import schemas

    ws = Workspace(str(tmp_path / "ws"))
    row = {"key": "a", "tag": "x", "category": "general", "origin": "txt", "position": 0}
    ws.add_part("source_tags", "unit-m", [row])
    ws.add_part("images", "unit-m", [{"key": "a", "source": "s", "member": "a.png"}])
    before_position = schemas.conform([{**row, "key": "b"}], "source_tags").drop_columns(["position"])
    for part in ("unit-0", "unit-z"):
        pq.write_table(before_position, f"{ws.table_dir('source_tags')}/{part}.parquet")
    older = {k: v for k, v in ws.published().items() if k not in ("schemas", "short_parts")}
    older["owned"]["old"] = {"source_tags": ["unit-0", "unit-z"]}  # as the older version published them
    older["tables"]["source_tags"] = ["unit-0", "unit-m", "unit-z"]
    ws.write_json("state/published.json", older)
    # a reader before any job of this version published: the changed schemas' views read by name
    assert ws.connect().execute("select count(*), count(position) from source_tags").fetchone() == (3, 1)
    ws.publish()
    assert ws.published()["short_parts"] == {"source_tags": ["unit-0", "unit-z"]}
    con = ws.connect()
    assert con.execute("select key, position from source_tags order by key, position").fetchall() == [
        ("a", 0), ("b", None), ("b", None)]
    views = dict(con.execute("select view_name, sql from duckdb_views() where not internal").fetchall())
    assert "union_by_name = true" in views["source_tags"] and "union_by_name = false" in views["images"]
    ws.publish()  # the same schema since: the footers are not read again, the short parts stay known
    assert ws.published()["short_parts"] == {"source_tags": ["unit-0", "unit-z"]}


def test_a_column_that_no_part_has_yet_reads_as_nulls(tmp_path):
    """Every part of a table written before a column was added (balance.repeats, by an older
    curate): reading by name alone found no such column (a Binder Error ended the export)."""
    import pyarrow.parquet as pq

    import schemas

    ws = Workspace(str(tmp_path / "ws"))
    ws.add_part("source_tags", "unit-m", [{"key": "a", "tag": "x", "category": "general", "origin": "txt"}])
    before_position = schemas.conform([{"key": "b", "tag": "y", "category": "general", "origin": "txt"}],
                                      "source_tags").drop_columns(["position"])
    pq.write_table(before_position, f"{ws.table_dir('source_tags')}/unit-m.parquet")
    older = {k: v for k, v in ws.published().items() if k not in ("schemas", "short_parts")}
    ws.write_json("state/published.json", older)
    assert ws.connect().execute("select key, position from source_tags").fetchall() == [("b", None)]
    ws.publish()
    assert ws.connect().execute("select key, position from source_tags").fetchall() == [("b", None)]


def exif_comment_jpeg(text: str) -> bytes:
    """A JPEG with generation text in its EXIF UserComment, as A1111 writes it for JPEG and WebP."""
    import piexif
    import piexif.helper

    exif = piexif.dump({"Exif": {piexif.ExifIFD.UserComment: piexif.helper.UserComment.dump(text, "unicode")}})
    return encode(picture(seed=8), "JPEG", quality=90, exif=exif)


NO_TEXT_PROBES = """
import io, sys
import numpy as np
from PIL import Image
from udfs.ingest.probe import probe_image

pixels = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
for mode, fmt in (("RGB", "JPEG"), ("RGB", "PNG"), ("RGBA", "PNG"), ("RGBA", "WEBP"), ("P", "GIF")):
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").convert(mode).save(out, format=fmt)
    assert probe_image(out.getvalue(), 10**8)["texts"] == []
print("torch" in sys.modules, "imgutils.sd" in sys.modules)
"""


def test_probe_reads_generation_text_without_torch_unless_an_image_holds_some():
    """imgutils.sd imports torch (1.5 s a worker): probing pictures with no generation text
    must not import it (checked in a fresh interpreter, as a Ray worker is), and the text an
    image does hold (here an EXIF UserComment) is still read through imgutils."""
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", NO_TEXT_PROBES], capture_output=True, text=True, cwd=repo)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]

    from udfs.ingest.probe import probe_image

    text = "1girl, solo\nNegative prompt: lowres\nSteps: 20, Sampler: Euler a, CFG scale: 7, Seed: 3, Size: 96x64"
    texts = dict(probe_image(exif_comment_jpeg(text), 10**8)["texts"])
    assert (texts["sd_prompt"], texts["sd_negative"]) == ("1girl, solo", "lowres") and '"Seed": 3' in texts["sd_params"]


# What an ingest worker needs no module of before its first image (each 50-250 ms of its start,
# bench/ingest.py's ingest_worker_start): the catalog's DuckDB, pyarrow.dataset (which imports
# pandas), the driver's pyarrow.compute, the clips' OpenCV and PyAV, the hash's scipy.
WORKER_START = """
import sys
import udfs.ingest.ingest_unit
print(*[m for m in ("duckdb", "pyarrow.dataset", "pandas", "pyarrow.compute", "cv2", "av", "scipy")
        if m in sys.modules])
"""


def test_the_worker_module_imports_nothing_a_still_image_does_not_need():
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", WORKER_START], capture_output=True, text=True, cwd=repo)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == []


def test_a_folder_chunk_is_read_one_sample_at_a_time(tmp_path):
    """A folder unit holds up to 4x ingest.folder_unit_size files: their bytes are read sample by
    sample as they are yielded, never all at once (a file removed after the first sample came
    out is found missing then, not read before)."""
    root = tmp_path / "in"
    root.mkdir()
    for name in ("a", "b", "c"):
        (root / f"{name}.png").write_bytes(encode(picture(), "PNG"))
        (root / f"{name}.txt").write_text(f"tag_{name}")
    unit = Unit("folder", str(root), "in", sorted(str(p) for p in root.iterdir()))
    samples = read_unit(unit, 10**9)
    first = next(samples)
    (root / "c.png").unlink()
    rest = list(samples)
    assert [s.key for s in (first, *rest)] == ["a", "b", "c"]
    assert set(rest[0].members) == {"png", "txt"}
    assert set(rest[1].members) == {"txt"}
    assert [(member, kind) for member, kind, _ in rest[1].problems] == [("c.png", "unreadable")]


def test_a_file_name_that_is_not_utf8_is_found_again_by_later_jobs(tmp_path):
    """Its member is stored with the undecodable bytes written as \\xNN (Parquet holds UTF-8):
    the jobs after ingest find the file again, and a re-ingest does not call it removed."""
    from udfs.caption.caption_images import read_members
    from udfs.ingest.sources import member_path

    folder = tmp_path / "odd"
    folder.mkdir()
    odd = os.fsdecode(b"caf\xe9.png")
    picture(seed=1).save(os.path.join(folder, odd))
    picture(seed=2).save(folder / "plain.png")
    _, ws = run_ingest(tmp_path, [str(folder)])
    row = next(r for r in ws.read_table("images").to_pylist() if r["key"].startswith("odd/caf"))
    assert row["member"] == "caf\\xe9.png"
    path = member_path(row["source"], row["member"])
    assert Path(path).read_bytes() == Path(folder, odd).read_bytes()
    assert read_members([row["source"]], [row["member"]]) == [Path(path).read_bytes()]  # the captioner's read
    picture(seed=3).save(folder / "added.png")  # the folder's unit changes: its images are planned again
    _, ws = run_ingest(tmp_path, [str(folder)])
    assert [e["kind"] for e in ws.read_table("errors").to_pylist()] == []
    assert ws.read_table("images").num_rows == 3


def test_a_name_with_an_undecodable_byte_and_one_with_its_escape_as_text_are_two_images(tmp_path):
    """`\\xe9.png` (a backslash, then `xe9`) and a name whose byte is 0xE9 were both written
    `\\xe9.png`: one key, one image lost as a duplicate_member. Now the literal backslash is
    written `\\x5c`: two keys, and later jobs find each file again; a plain name keeps its key."""
    from udfs.ingest.sources import member_path

    folder = tmp_path / "odd"
    folder.mkdir()
    Path(os.fsdecode(os.path.join(os.fsencode(folder), b"\xe9.png"))).write_bytes(encode(picture(seed=1), "PNG"))
    picture(seed=2).save(folder / "\\xe9.png")
    picture(seed=3).save(folder / "a\\b.png")  # a backslash not before xNN: its name as it was
    summary, ws = run_ingest(tmp_path, [str(folder)])
    rows = {r["key"]: r for r in ws.read_table("images").to_pylist()}
    assert sorted(rows) == ["odd/\\x5cxe9", "odd/\\xe9", "odd/a\\b"]
    assert ws.read_table("errors").num_rows == 0 and summary.dropped == 0
    for key, name in (("odd/\\xe9", b"\xe9.png"), ("odd/\\x5cxe9", b"\\xe9.png"), ("odd/a\\b", b"a\\b.png")):
        path = member_path(rows[key]["source"], rows[key]["member"])
        assert Path(path).read_bytes() == Path(os.fsdecode(os.path.join(os.fsencode(folder), name))).read_bytes()


def test_a_second_image_under_one_key_is_a_dropped_sample(tmp_path):
    """A shard's `/abs.png` and `abs.png` have one key (both are valid names: neither key can
    change). The second was an errors row with dropped false: an image lost, counted nowhere.
    It is a dropped sample now, in the table and the summary's accounting; a unit an older
    reader committed with such a row is read again."""
    (tmp_path / "in").mkdir()
    write_tar(tmp_path / "in" / "s.tar", [("/abs.png", encode(picture(seed=1), "PNG")),
                                          ("abs.png", encode(picture(seed=2), "PNG")),
                                          ("abs.txt", b"smile"), ("abs.txt", b"frown"),
                                          ("b.png", encode(picture(seed=3), "PNG"))])
    summary, ws = run_ingest(tmp_path, [str(tmp_path / "in")])
    errors = {e["member"]: e["dropped"] for e in ws.read_table("errors").to_pylist()}
    assert errors == {"abs.png": True, "abs.txt": False}  # a second sidecar loses no picture
    assert (summary.rows_in, summary.dropped, ws.read_table("images").num_rows) == (3, 1, 2)
    assert "accounting: 2 images + 1 dropped samples = 3 samples seen" in summary.render()
    state = Path(ws.state_dir("ingest"))
    for path in state.glob("*.json"):  # as reader 5 committed it
        marker = json.loads(path.read_text())
        marker.update(reader=5, samples=2, dropped=0)
        path.write_text(json.dumps(marker, sort_keys=True))
    summary, ws = run_ingest(tmp_path, [str(tmp_path / "in")])
    assert summary.units_done == 1 and (summary.rows_in, summary.dropped) == (3, 1)
    assert sorted(ws.read_table("images").column("key").to_pylist()) == ["in/s/abs", "in/s/b"]


def test_a_second_picture_beside_a_still_is_a_dropped_sample(tmp_path):
    """`a.jpg` and `a.png` in a folder: one key, one image; the other was an extra_image row with
    dropped false, lost without counting. A good b.png beside a broken b.jpg was lost with no
    row at all: it is the image now, and the broken one a dropped sample."""
    folder = tmp_path / "pics"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(encode(picture(seed=1), "JPEG"))
    (folder / "a.png").write_bytes(encode(picture(seed=2), "PNG"))
    (folder / "b.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    (folder / "b.png").write_bytes(encode(picture(seed=3), "PNG"))
    summary, ws = run_ingest(tmp_path, [str(folder)])
    errors = sorted((e["member"], e["kind"], e["dropped"]) for e in ws.read_table("errors").to_pylist())
    assert errors == [("a.png", "extra_image", True), ("b.jpg", "not_an_image", True)]
    assert {r["key"]: r["member"] for r in ws.read_table("images").to_pylist()} == {"pics/a": "a.jpg",
                                                                                     "pics/b": "b.png"}
    assert "accounting: 2 images + 2 dropped samples = 4 samples seen" in summary.render()


def test_long_generation_texts_are_left_out_and_the_image_kept(tmp_path):
    """A compressed text chunk past Pillow's MAX_TEXT_CHUNK (it refused the whole file) and a
    `parameters` text too long to parse (imgutils' parser takes minutes on 100,000 characters of
    one line) both give a text_too_long row; the images are kept."""
    from PIL import PngImagePlugin

    members = []
    for name, size, packed in (("zipped", 3_000_000, True), ("plain", 60_000, False)):
        info = PngImagePlugin.PngInfo()
        info.add_text("parameters", "x" * size, zip=packed)
        members.append((f"{name}.png", encode(picture(seed=size % 7), "PNG", pnginfo=info)))
    _, ws = run_ingest(tmp_path, [str(write_tar(tmp_path / "texts.tar", members))])
    assert sorted(ws.read_table("images")["key"].to_pylist()) == ["texts/plain", "texts/zipped"]
    errors = ws.read_table("errors").to_pylist()
    assert sorted((e["key"], e["kind"], e["dropped"]) for e in errors) == [
        ("texts/plain", "text_too_long", False), ("texts/zipped", "text_too_long", False)]
    assert ws.read_table("source_text").num_rows == 0


def test_an_unreadable_file_names_its_member(tmp_path):
    folder = tmp_path / "loop"
    folder.mkdir()
    os.symlink("b.png", folder / "a.png")  # a loop of links: no read gets through
    os.symlink("a.png", folder / "b.png")
    _, ws = run_ingest(tmp_path, [str(folder)], "ingest.follow_links_out=true")
    errors = sorted((e["key"], e["member"], e["kind"]) for e in ws.read_table("errors").to_pylist())
    assert errors == [("loop/a", "a.png", "unreadable"), ("loop/b", "b.png", "unreadable")]


def test_each_image_row_says_where_its_member_header_starts_in_its_shard(hostile):
    """images.member_offset: where a later job seeks to read the image (udfs/source_members.py)."""
    _, ws = hostile
    rows = ws.read_table("images").to_pylist()
    with tarfile.open(rows[0]["source"]) as tar:
        headers = {m.name: m.offset for m in tar}
    for row in rows:
        assert row["member_offset"] == headers[row["member"]], row["member"]


def test_a_folder_of_shards_on_s3_is_ingested_and_exported_as_the_same_folder_on_disk(tmp_path, s3_endpoint,
                                                                                      monkeypatch):
    """Shards in an S3 folder (moto on loopback, tests/s3_server.py), the endpoint in the input's
    query: every shard is read with that endpoint, the query is no part of a key (the same keys
    as the folder on disk), and export reads the members back from S3 with ranged GETs."""
    from jobs import curate, export
    from tests.conftest import SAMPLE_SHARDS
    from tests.export_data import base_config

    if not list(SAMPLE_SHARDS.glob("*.tar")):
        pytest.skip("bundled sample shards missing")
    for name, value in AWS.items():
        monkeypatch.setenv(name, value)
    local = tmp_path / "in"
    local.mkdir()
    fs = s3_filesystem(s3_endpoint)
    for shard in sorted(SAMPLE_SHARDS.glob("*.tar"))[:2]:
        (local / shard.name).write_bytes(shard.read_bytes())
        with fs.open_output_stream(f"ws-bucket/ingest-test/in/{shard.name}") as out:
            out.write(shard.read_bytes())
    uri = f"s3://ws-bucket/ingest-test/in?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    results = {}
    for side, inputs in (("s3", uri), ("disk", str(local))):
        cfg = base_config(tmp_path / side, f'ingest.inputs=["{inputs}"]', "export.drop_duplicates=false")
        ws = Workspace(str(tmp_path / side))
        for job in (ingest, curate, export):
            assert job.run(cfg, ws).errors == 0, side
        images = ws.connect().execute("select key, sha256, phash, member_offset, source from images order by key")
        results[side] = (images.fetchall(), exported_members(tmp_path / side / "export"))
    (s3_images, s3_exported), (disk_images, disk_exported) = results["s3"], results["disk"]
    assert len(s3_images) == len(disk_images) > 0 and s3_images[0][0].startswith("in/renpy-")
    assert [row[:4] for row in s3_images] == [row[:4] for row in disk_images]
    assert all(row[4].startswith("s3://ws-bucket/ingest-test/in/renpy-") and row[4].endswith(uri.split("?")[1])
               for row in s3_images)
    assert s3_exported.keys() == disk_exported.keys() and len(s3_exported) > len(s3_images)  # images and texts
    for name, data in s3_exported.items():
        if not name.endswith(".json"):
            assert data == disk_exported[name], name
            continue
        s3_meta, disk_meta = json.loads(data), json.loads(disk_exported[name])
        # where each came from, without the endpoint: a trainer's metadata holds no connection options
        assert s3_meta.pop("source")["source"] == uri.split("?")[0] + "/" + name.split("__")[1] + ".tar"
        assert disk_meta.pop("source")["source"] == str(local / name.split("__")[1]) + ".tar"
        assert s3_meta == disk_meta


def test_a_shard_and_its_unpacked_folder_on_s3_are_refused_as_on_disk(s3_endpoint, monkeypatch):
    """The listing of an S3 folder is checked as a local folder's (tests/test_ingest_identity.py):
    `s.tar` beside `s/a.png` would give the same keys."""
    from udfs.ingest.sources import discover_units

    for name, value in AWS.items():
        monkeypatch.setenv(name, value)
    fs = s3_filesystem(s3_endpoint)
    for name in ("s.tar", "s/a.png", "t.tar"):
        with fs.open_output_stream(f"ws-bucket/prefix-test/in/{name}") as out:
            out.write(b"not read")
    uri = f"s3://ws-bucket/prefix-test/in?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    with pytest.raises(ValueError, match="s.tar and s/a.png in s3://ws-bucket/prefix-test/in/ would both"):
        discover_units([uri], 100)
    fs.delete_file("ws-bucket/prefix-test/in/s/a.png")
    assert sorted(u.prefix for u in discover_units([uri], 100)) == ["in/s", "in/t"]


def test_a_folder_of_images_on_s3_is_ingested_and_exported_as_the_same_folder_on_disk(tmp_path, s3_endpoint,
                                                                                       monkeypatch):
    """Loose images and sidecars in an S3 folder (moto on loopback): folder units read with the
    input's endpoint, several objects fetched at once; the same rows and exported files as the
    folder on disk; the review page and export read the images back from S3."""
    from jobs import curate, export
    from review.image_bytes import image_bytes
    from tests.export_data import base_config

    for name, value in AWS.items():
        monkeypatch.setenv(name, value)
    local = a_folder_of_images(tmp_path / "pics")
    fs = s3_filesystem(s3_endpoint)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        with fs.open_output_stream(f"ws-bucket/folder-test/pics/{path.relative_to(local)}", compression=None) as out:
            out.write(path.read_bytes())
    uri = f"s3://ws-bucket/folder-test/pics?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    results = {}
    for side, inputs in (("s3", uri), ("disk", str(local))):
        cfg = base_config(tmp_path / side, f'ingest.inputs=["{inputs}"]', "ingest.folder_unit_size=2",
                          "export.drop_duplicates=false")
        ws = Workspace(str(tmp_path / side))
        for job in (ingest, curate, export):
            job.run(cfg, ws)
        con = ws.connect()
        images = con.execute("select key, sha256, phash, member, source from images order by key").fetchall()
        errors = con.execute("select key, member, kind from errors order by all").fetchall()
        results[side] = (images, errors, exported_members(tmp_path / side / "export"))
    (s3_images, s3_errors, s3_exported), (disk_images, disk_errors, disk_exported) = results["s3"], results["disk"]
    assert len(s3_images) == len(disk_images) == 5
    assert [row[:4] for row in s3_images] == [row[:4] for row in disk_images] and s3_errors == disk_errors
    folder_uri = uri.split("?")[0] + "/?" + uri.split("?")[1]
    assert {row[4] for row in s3_images} == {folder_uri}
    assert s3_exported.keys() == disk_exported.keys() and len(s3_exported) > len(s3_images)
    for name, data in s3_exported.items():
        if not name.endswith(".json"):
            assert data == disk_exported[name], name
            continue
        s3_meta, disk_meta = json.loads(data), json.loads(disk_exported[name])
        assert s3_meta.pop("source")["source"] == uri.split("?")[0] + "/"
        assert disk_meta.pop("source")["source"] == str(local)
        assert s3_meta == disk_meta
    key, _, _, member, source = s3_images[0]
    assert image_bytes(source, member) == (local / member).read_bytes()


def test_an_s3_folder_whose_name_needs_escaping_read_again_after_a_change(tmp_path, s3_endpoint, monkeypatch):
    """A folder named with a space, "#" and a letter beyond ASCII (percent-encoded in the input
    URI), the endpoint in the query: read, and read again after one object changed, with no image
    reported removed; an object key with an empty path segment (legal in S3) is an unreadable
    row, not a failed run."""
    for name, value in AWS.items():
        monkeypatch.setenv(name, value)
    local = a_folder_of_images(tmp_path / "pics")
    fs = s3_filesystem(s3_endpoint)
    base = "ws-bucket/escape-test/my pics #2 ü"

    def upload(rel: str, data: bytes) -> None:
        with fs.open_output_stream(f"{base}/{rel}", compression=None) as out:
            out.write(data)

    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        upload(str(path.relative_to(local)), path.read_bytes())
    import boto3  # pyarrow refuses to write such a key; moto's own client does not

    boto3.client("s3", endpoint_url=f"http://{s3_endpoint}").put_object(
        Bucket="ws-bucket", Key=f"{base.split('/', 1)[1]}/odd//f.png", Body=encode(picture(seed=11), "PNG"))
    uri = (f"s3://ws-bucket/escape-test/my%20pics%20%232%20%C3%BC?endpoint_override={s3_endpoint}"
           "&scheme=http&region=us-east-1")
    summary, ws = run_ingest(tmp_path, [uri], "ingest.folder_unit_size=2")
    assert summary.rows_out["images"] == 5
    errors = ws.connect().execute("select member, kind from errors order by all").fetchall()
    assert errors == [("notes.md", "no_image"), ("odd//f.png", "unreadable")]

    # another size: an object's stamp is its size and time, and S3 times have whole seconds
    upload("a.png", encode(picture(width=80, seed=12), "PNG"))
    summary, ws = run_ingest(tmp_path, [uri], "ingest.folder_unit_size=2")
    assert summary.units_done == 1 and summary.rows_out["images"] == 5
    assert ws.connect().execute("select member, kind from errors order by all").fetchall() == errors


def test_a_shard_named_with_a_trailing_slash_is_still_a_shard_to_later_jobs(tmp_path):
    """A folder unit's source ends with "/" (how later jobs tell it from a shard): a shard given
    as `file:///.../s.tar/` is named without it."""
    from udfs.ingest.sources import source_kind
    from udfs.source_members import source_members

    write_tar(tmp_path / "s.tar", [("k.png", encode(picture(seed=1), "PNG"))])
    _, ws = run_ingest(tmp_path, [(tmp_path / "s.tar").as_uri() + "/"])
    [(source, member)] = ws.connect().execute("select source, member from images").fetchall()
    assert source == (tmp_path / "s.tar").as_uri() and source_kind(source) == "tar"
    assert dict(source_members(source, {member: None}, None))[member] == encode(picture(seed=1), "PNG")


def exported_members(folder: Path) -> dict[str, bytes]:
    members = {}
    for shard in sorted((folder / "webdataset").glob("*.tar")):
        with tarfile.open(shard) as tar:
            members.update({m.name: tar.extractfile(m).read() for m in tar})
    return members


def test_an_unforeseen_error_on_one_sample_is_its_errors_row_not_the_runs_end(monkeypatch):
    """Decoders raise more than they document (libavif's RuntimeError, PyAV's AttributeError
    each failed whole jobs): whatever one sample raises loses that sample, with a row that
    says what, and none of its half-written rows; the samples after it are read."""
    from udfs.ingest import ingest_unit
    from udfs.ingest.sources import Sample

    real = ingest_unit.parse_sidecar

    def parse(ext, text):  # after the sample's images row was made
        if text == "1girl":
            raise KeyError("a plugin's bug")
        return real(ext, text)

    monkeypatch.setattr(ingest_unit, "parse_sidecar", parse)
    rows = ingest_unit.UnitRows(Unit("tar", "s.tar", "s"), frame_store=None)
    options = ingest.unit_options(load_config(None, []))
    rows.add(Sample("bad", {"png": encode(picture(seed=1), "PNG"), "txt": b"1girl"},
                    {"png": "bad.png", "txt": "bad.txt"}), options)
    rows.add(Sample("good", {"png": encode(picture(seed=2), "PNG"), "txt": b"solo"},
                    {"png": "good.png", "txt": "good.txt"}), options)
    assert [r["key"] for r in rows.tables["images"]] == ["s/good"]
    assert [r["key"] for r in rows.tables["source_tags"]] == ["s/good"]
    [error] = rows.tables["errors"]
    assert (error["key"], error["member"], error["kind"], error["dropped"]) == (
        "s/bad", "bad.png", "ingest_error", True)
    assert error["message"] == "KeyError: \"a plugin's bug\""
    summary = rows.summary(0.0)
    assert (summary["samples"], summary["images"], summary["dropped"]) == (2, 1, 1)


def test_an_s3_input_whose_endpoint_stops_answering_fails_the_unit_instead_of_committing_errors(
        tmp_path, s3_endpoint, monkeypatch):
    """The endpoint going down mid-run (here: the units read through a port nothing listens on)
    is no fault of the objects: reading a folder unit or a shard raises StoreError, so that the
    unit is not committed with an `unreadable` or `corrupt_shard` row for every sample (a rerun
    skipped such units, and their images were never read). An object deleted since the listing
    is still its own sample's unreadable row."""
    from s3_server import free_port

    from store.uris import StoreError
    from udfs.ingest.sources import discover_units
    from udfs.source_members import source_members

    for name, value in AWS.items():
        monkeypatch.setenv(name, value)
    fs = s3_filesystem(s3_endpoint)
    local = a_folder_of_images(tmp_path / "pics")
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        with fs.open_output_stream(f"ws-bucket/down-test/in/{path.relative_to(local)}", compression=None) as out:
            out.write(path.read_bytes())
    with fs.open_output_stream("ws-bucket/down-test/in/s.tar", compression=None) as out:
        out.write(write_tar(tmp_path / "s.tar", [("x.png", encode(picture(seed=1), "PNG"))]).read_bytes())
    uri = f"s3://ws-bucket/down-test/in?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    units = discover_units([uri], 100)
    assert sorted(u.kind for u in units) == ["folder", "tar"]
    fs.delete_file("ws-bucket/down-test/in/a.png")  # gone since the listing: its own row
    folder = next(u for u in units if u.kind == "folder")
    rows = [p for s in read_unit(folder, 1 << 20) if not isinstance(s, tuple) for p in s.problems]
    assert [(member, kind) for member, kind, _ in rows] == [("a.png", "unreadable")]
    dead = str(free_port())
    for unit in units:
        unit.uri = unit.uri.replace(s3_endpoint.rsplit(":", 1)[1], dead)
    # and export's and the captioners' reads (they made a missing_member or unreadable_image row
    # of each image, and committed their units)
    reads = [lambda u=u: list(read_unit(u, 1 << 20)) for u in units]
    reads += [lambda u=u: list(source_members(u.uri, {"b c.png": None, "m.png": 0}, None)) for u in units]

    def read_down(read) -> BaseException | None:
        try:
            read()
        except Exception as exc:  # noqa: BLE001 - checked below
            return exc
        return None

    with ThreadPoolExecutor(len(reads)) as pool:  # Arrow retries a refused connection for 6 s: all at once
        failures = list(pool.map(read_down, reads))
    for failure in failures:
        assert isinstance(failure, StoreError) and "NETWORK_CONNECTION" in str(failure), failure
        assert "run again" in str(failure)


def test_an_s3_input_written_with_a_trailing_slash_is_the_same_input(s3_endpoint, monkeypatch):
    """`s3://b/in/?...` and `s3://b/in?...` are one folder, as `/data/in/` and `/data/in` are on
    disk (resolved alike): one input id and the same keys. They were two locations: given both,
    every image was ingested twice under two ids; given one then the other, the second's keys
    took a hashed id (`in-1a2b3c4d/...`) beside the first's rows. An id registered with the slash
    is kept."""
    from udfs.ingest.sources import assign_input_ids, discover_units, resolve_inputs

    for name, value in AWS.items():
        monkeypatch.setenv(name, value)
    with s3_filesystem(s3_endpoint).open_output_stream("ws-bucket/slash-test/in/a.png", compression=None) as out:
        out.write(encode(picture(), "PNG"))
    query = f"?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    plain, slashed = f"s3://ws-bucket/slash-test/in{query}", f"s3://ws-bucket/slash-test/in/{query}"
    assert resolve_inputs([plain, slashed]) == resolve_inputs([slashed]) == [plain]
    ids = assign_input_ids(resolve_inputs([plain]), {})
    assert assign_input_ids(resolve_inputs([slashed]), ids) == ids == {"s3://ws-bucket/slash-test/in": "in"}
    registered = {"s3://ws-bucket/slash-test/in/": "in"}  # by an earlier version, given with the slash
    assert assign_input_ids(resolve_inputs([plain]), registered)["s3://ws-bucket/slash-test/in"] == "in"
    keys = [[(u.prefix, u.files) for u in discover_units([spec], 100)] for spec in (plain, slashed)]
    assert keys[0] == keys[1] and keys[0][0][0] == "in"


def test_an_object_gone_between_its_head_and_its_get_is_its_own_row_not_a_store_failure():
    """Arrow says NO_SUCH_KEY in an OSError (not FileNotFoundError) when the GET after the HEAD
    finds the object deleted: the object's fault, as a file deleted since the listing."""
    from store.uris import store_failure

    uri = "s3://b/in/?endpoint_override=h:9000"
    gone = OSError("AWS Error NO_SUCH_KEY during GetObject operation: The specified key does not exist.")
    assert store_failure(gone, uri) is None
    assert store_failure(OSError("AWS Error ACCESS_DENIED during GetObject operation: denied"), uri) is not None
    assert store_failure(OSError("AWS Error NETWORK_CONNECTION during GetObject operation"), "/local/in") is None
