"""The export plan (no Ray): a unit's shard cuts by count and bytes, sizes, txt, repeats, buckets (the
planning task's udfs/export/export_plan.py), and the driver's global shard numbering and unit ids."""

from __future__ import annotations

import json
import re
import tarfile

import pyarrow as pa
import pytest


def options(**changes):
    from jobs.config import load_config

    return {**load_config()["export"], **changes}


def selection(n: int, source: str = "/in/a.tar", width: int = 800, height: int = 600, nbytes: int = 100_000,
              fmt: str = "JPEG", multiply: float = 1.0, mode: str = "RGB", repeats: int = 1) -> pa.Table:
    return pa.Table.from_pylist([{
        "key": f"a/{i:03d}", "source": source, "member": f"{i:03d}.jpg", "format": fmt, "mode": mode, "width": width,
        "height": height, "bytes": nbytes, "sha256": f"{i:064x}", "tags": ["1girl", "long_hair", "^_^"],
        "categories": ["general"] * 3, "tag_scores": [1.0, 0.9, 0.5], "characters": [], "rating": "general",
        "n_people": 1, "caption": None, "tag_inclusion": None, "english_similarity": None,
        "subject_consistency": None, "accuracy": None, "quality_tags": [], "flagged": False, "group": "g/h",
        "multiply": multiply, "repeats": repeats} for i in range(n)])


def plan_units(table: pa.Table, opts: dict, out: str = "/out") -> list[dict]:
    """What the export job plans for `table` (one unit per source): the planning task's samples per
    unit, placed by the driver's numbering, as the export tasks receive them."""
    from jobs.export import place_units, shaping_of
    from udfs.export.export_plan import placed, plan_samples, unit_work

    groups, planned, samples = [], {}, {}
    for i, source in enumerate(dict.fromkeys(table["source"].to_pylist())):
        rows = [r for r in table.to_pylist() if r["source"] == source]
        samples[i], shards = plan_samples(rows, opts)
        groups.append({"group": i, "source": source, "first_key": rows[0]["key"], "path": ""})
        planned[i] = {"shards": shards, "samples": len(rows), "work": unit_work(rows, samples[i]),
                      "digest": json.dumps(samples[i], sort_keys=True)}
    units = place_units(groups, planned, shaping_of(opts, out))
    for i, unit in enumerate(units):
        unit["samples"] = placed(samples[i], unit["offset"])
    return units


def shards_of(units):
    return [[c["shard"] for s in u["samples"] for c in s["copies"]] for u in units]


def test_shards_are_cut_by_count():
    units = plan_units(selection(10), options(max_count=4))
    assert shards_of(units) == [[0, 0, 0, 0, 1, 1, 1, 1, 2, 2]] and units[0]["shards"] == 3


def test_shards_are_cut_by_bytes_exactly_for_original_images():
    units = plan_units(selection(6, nbytes=100_000), options(max_bytes=250_000, max_count=1000))
    planned = [s["planned_bytes"] for s in units[0]["samples"]]
    assert all(100_000 < p < 110_000 for p in planned)  # image + txt + json + tar headers
    assert shards_of(units) == [[0, 0, 1, 1, 2, 2]]
    # a single sample larger than max_bytes still gets a shard of its own
    big = plan_units(selection(2, nbytes=1_000_000), options(max_bytes=250_000))
    assert shards_of(big) == [[0, 1]]


def test_shards_never_mix_units_and_numbers_continue():
    table = pa.concat_tables([selection(3, "/in/a.tar"), selection(3, "/in/b.tar").set_column(
        0, "key", pa.array([f"b/{i}" for i in range(3)]))])
    units = plan_units(table, options(max_count=2))
    assert shards_of(units) == [[0, 0, 1], [2, 2, 3]] and [u["offset"] for u in units] == [0, 2]


def test_sizes_text_json_and_repeats():
    units = plan_units(selection(1, width=2048, height=1024, multiply=2.5, repeats=3), options(max_size=1024))
    sample = units[0]["samples"][0]
    assert sample["size"] == [1024, 512] and sample["reencode"] and sample["ext"] == "jpg"
    assert sample["txt"] == "1girl, long hair, ^_^"
    meta = json.loads(sample["json"])
    assert meta["multiply"] == 2.5 and meta["repeats"] == 3 and meta["tag_scores"]["long_hair"] == 0.9
    assert sample["kohya"] == f"{meta['repeats']}_g__h" and sample["everydream"] == "g__h_x2.5"
    small = plan_units(selection(1, width=512, height=512), options(max_size=1024))
    assert small[0]["samples"][0]["size"] == [512, 512] and not small[0]["samples"][0]["reencode"]
    gif = plan_units(selection(1, width=64, height=64, fmt="GIF"), options())
    assert gif[0]["samples"][0]["reencode"] and gif[0]["samples"][0]["ext"] == "png"
    # a trainer's Image.convert("RGB") clips 16-bit samples: white; re-encoded at 8 bits instead
    grey16 = plan_units(selection(1, width=64, height=64, fmt="PNG", mode="I;16"), options())
    assert grey16[0]["samples"][0]["reencode"] and grey16[0]["samples"][0]["ext"] == "png"


def test_the_balance_repeats_name_the_kohya_folder():
    """An image's whole repeats (sql/091_balance.sql gives them out per group) name its kohya
    folder; its multiply stays as it is for KEY.json and EveryDream."""
    for multiply, repeats in ((1.33, 2), (1.33, 1), (0.4, 1), (4.8, 5)):
        sample = plan_units(selection(1, multiply=multiply, repeats=repeats), options())[0]["samples"][0]
        assert sample["repeats"] == repeats and sample["kohya"] == f"{repeats}_g__h"
        assert json.loads(sample["json"])["multiply"] == multiply


def test_materialised_repeats_get_unique_names_and_a_shard_of_their_own():
    """Copies of one image are never in one shard: a trainer's shuffle buffer would batch them."""
    units = plan_units(selection(3, multiply=3.0, repeats=3), options(materialize_repeats=True, max_count=2))
    names = [c["name"] for s in units[0]["samples"] for c in s["copies"]]
    copies = [re.sub(r"-[0-9a-f]{10}$", "", n) for n in names]  # a copy's name carries a digest
    assert copies == ["a__000", "a__000-r1", "a__000-r2", "a__001", "a__001-r1", "a__001-r2",
                      "a__002", "a__002-r1", "a__002-r2"]
    assert len(set(names)) == 9 and all(re.search(r"-r\d-[0-9a-f]{10}$", n) for n in names if n not in copies)
    # the key `x-r1`'s own safe name, in another unit, is `x-r1`: never a copy's
    other = plan_units(pa.Table.from_pylist([{**r, "key": r["key"] + "-r1"}
                                             for r in selection(3, multiply=3.0, repeats=3).to_pylist()]),
                       options(materialize_repeats=True, max_count=2))
    assert not set(names) & {c["name"] for s in other[0]["samples"] for c in s["copies"]}
    # a round at a time (000 001 | 002 000 | 001 002 | 000 001 | 002), two to a shard, and a new
    # shard where the image is in the current one already
    assert [[c["shard"] for c in s["copies"]] for s in units[0]["samples"]] == [[0, 1, 3], [0, 2, 3], [1, 2, 4]]
    assert units[0]["shards"] == 5
    halves = [{**r, "repeats": 1 + i % 2} for i, r in enumerate(selection(20, multiply=1.5).to_pylist())]
    mixed = plan_units(pa.Table.from_pylist(halves), options(materialize_repeats=True, max_count=8))
    copies = [[c["shard"] for c in s["copies"]] for s in mixed[0]["samples"]]
    assert all(len(set(shards)) == len(shards) for shards in copies) and {len(c) for c in copies} == {1, 2}


def test_unit_ids_change_with_shaping_options_only():
    first = plan_units(selection(3), options())[0]["unit"]
    assert plan_units(selection(3), options())[0]["unit"] == first
    assert plan_units(selection(3), options(max_size=512))[0]["unit"] != first
    assert plan_units(selection(3), options(), "/elsewhere")[0]["unit"] != first


@pytest.mark.parametrize("size", [(1024, 1024), (832, 1216), (1216, 832), (896, 1152), (768, 1344)])
def test_kohya_buckets(size):
    from udfs.export.resize import bucket_sizes, nearest_bucket

    buckets = bucket_sizes(1024, 256, 2048, 64)
    assert size in buckets and all(w * h <= 1024 * 1024 and w % 64 == 0 and h % 64 == 0 for w, h in buckets)
    assert nearest_bucket(size[0] * 3, size[1] * 3, buckets) == size


def test_buckets_are_chosen_as_kohya_chooses_them():
    """kohya's select_bucket: the smallest |bucket aspect - image aspect| (not of their logs, which
    put 1371x1000 in 1216x832 where kohya puts it in 1152x896), an image at a bucket's size stays."""
    from udfs.export.resize import bucket_sizes, nearest_bucket

    buckets = bucket_sizes(1024, 256, 2048, 64)
    assert nearest_bucket(1371, 1000, buckets) == (1152, 896)
    assert nearest_bucket(447, 1000, buckets) == (640, 1536)
    assert nearest_bucket(832, 1216, buckets) == (832, 1216)


def test_bucket_sides_that_are_not_steps_are_rounded_as_kohya_rounds_them():
    """kohya rounds min_bucket_reso down and max_bucket_reso up to a multiple of bucket_reso_steps
    before it makes its buckets: with sides 300 and 2000 it buckets from 256 to 2048, and an image
    exported to a 300-wide bucket was not at a bucket of kohya's, which resized it again."""
    from udfs.export.resize import bucket_sizes

    assert bucket_sizes(1024, 300, 2000, 64) == bucket_sizes(1024, 256, 2048, 64)
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in bucket_sizes(1024, 300, 2000, 64))


@pytest.mark.parametrize(("max_size", "low", "high"), [(512, 768, 2048), (1024, 256, 512), (512, 520, 2048)])
def test_buckets_kohya_refuses_are_refused(max_size, low, high):
    """kohya asserts min_bucket_reso <= resolution <= max_bucket_reso (after rounding them to steps):
    a trainer could not bucket with the export's options (and its own buckets change every size)."""
    from jobs.config import ConfigError
    from jobs.export import check_options

    opts = options(buckets=True, max_size=max_size, bucket_min_side=low, bucket_max_side=high, bucket_step=64)
    if low - low % 64 <= max_size <= high:  # 520 is 512 to kohya
        check_options(opts)
        return
    with pytest.raises(ConfigError, match="kohya"):
        check_options(opts)


def test_units_that_re_encode_start_before_units_that_copy():
    """The driver starts the costliest units first (jobs/ray_env.largest_first), so that no long
    unit runs alone at the end: a unit of large images to resize outweighs units that copy more
    bytes, equal units keep export order, and shard numbers stay in export order."""
    from jobs.ray_env import largest_first

    table = pa.concat_tables([selection(3, "/in/a.tar", nbytes=400_000),
                              selection(3, "/in/b.tar", width=4000, height=3000, nbytes=300_000),
                              selection(3, "/in/c.tar", nbytes=400_000)])
    units = plan_units(table, options(max_size=1024))
    assert [u["samples"][0]["reencode"] for u in units] == [False, True, False]
    assert [u["offset"] for u in units] == [0, 1, 2]
    def started(planned: list[dict]) -> list[str]:
        return [u["source"] for u in largest_first(planned, lambda unit: unit["work"])]

    assert started(units) == ["/in/b.tar", "/in/a.tar", "/in/c.tar"]
    assert started(plan_units(table, options(max_size=0))) == ["/in/a.tar", "/in/c.tar", "/in/b.tar"]  # copies


def test_a_units_id_is_its_plan_not_its_place():
    """A unit whose shards move (one before it gained a shard) keeps its id: it is renamed
    (jobs/export_moves.py), not written again; a unit with another plan gets another id."""
    from jobs.export import place_units

    def ids(first_unit_shards: int, digests: str = "abc") -> list[str]:
        groups = [{"group": i, "source": f"/in/{i}.tar", "first_key": f"{i}/0", "path": ""}
                  for i in range(3)]
        planned = {0: {"shards": first_unit_shards, "samples": 4, "digest": digests[0]},
                   1: {"shards": 1, "samples": 1, "digest": digests[1]},
                   2: {"shards": 2, "samples": 5, "digest": digests[2]}}
        units = place_units(groups, planned, "{}")
        assert [u["offset"] for u in units] == [0, first_unit_shards, first_unit_shards + 1]
        return [u["unit"] for u in units]

    same = ids(1)
    assert same == ids(1) == ids(2)  # deterministic, and the same at other places
    assert ids(1, "abX")[:2] == same[:2] and ids(1, "abX")[2] != same[2]


def test_resized_images_keep_their_colours_and_transparency():
    """The export's resample (udfs/export/resize.resampled): area averaging down keeps a picture's
    mean colour, and transparent pixels lend no colour to their visible neighbours (premultiplied)."""
    import io

    import numpy as np
    from PIL import Image

    from udfs.export.resize import resize_image

    stripes = np.zeros((400, 600, 3), dtype=np.uint8)
    stripes[:, ::2] = (255, 0, 0)  # red and black columns: mean (127.5, 0, 0) at any size
    jpeg_free = io.BytesIO()
    Image.fromarray(stripes).save(jpeg_free, "PNG")
    small = Image.open(io.BytesIO(resize_image(jpeg_free.getvalue(), (150, 100), "png", 95, False)))
    assert small.size == (150, 100) and small.format == "PNG"
    assert np.abs(np.asarray(small).reshape(-1, 3).mean(axis=0) - (127.5, 0, 0)).max() < 1

    half = np.zeros((400, 600, 4), dtype=np.uint8)
    half[:, :305] = (255, 0, 0, 0)  # left: red, but invisible (up to the middle of an output pixel)
    half[:, 305:] = (0, 0, 255, 255)  # right: opaque blue
    png = io.BytesIO()
    Image.fromarray(half, "RGBA").save(png, "PNG")
    out = np.asarray(Image.open(io.BytesIO(resize_image(png.getvalue(), (60, 40), "png", 95, False))))
    visible = out[out[..., 3] > 0]
    assert visible[:, 0].max() == 0 and visible[:, 2].min() == 255  # no red bled into the blue edge


def test_a_lab_picture_is_re_encoded_without_an_alpha_channel():
    """A LAB TIFF's bands are L, A and B: its `A` (the green-red axis) was taken for an alpha
    channel, and the re-encoded PNG was RGBA (opaque, twice the channels to store and decode).
    A picture with real transparency stays transparent."""
    import io

    import numpy as np
    from PIL import Image

    from udfs.export.resize import resize_image

    lab = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).convert("LAB").save(lab, "TIFF")
    out = Image.open(io.BytesIO(resize_image(lab.getvalue(), (20, 15), "png", 95, False)))
    assert out.mode == "RGB"
    assert np.abs(np.asarray(out).reshape(-1, 3).mean(axis=0) - (200, 30, 30)).max() < 4
    palette = io.BytesIO()
    Image.new("P", (40, 30), 0).save(palette, "PNG", transparency=0)
    assert Image.open(io.BytesIO(resize_image(palette.getvalue(), (20, 15), "png", 95, False))).mode == "RGBA"


def test_transparent_pictures_are_flattened_onto_alpha_background_when_asked():
    """kohya reads a sprite with convert("RGB"): its transparent pixels (black here) become the
    background it trains on. export.alpha_background flattens them onto a colour, at any size."""
    import io

    import numpy as np
    from PIL import Image

    from udfs.export.resize import resize_image

    sprite = np.zeros((64, 64, 4), dtype=np.uint8)
    sprite[16:48, 16:48] = (0, 0, 255, 255)  # an opaque blue square on transparent black
    png = io.BytesIO()
    Image.fromarray(sprite, "RGBA").save(png, "PNG")
    row = {**selection(1, width=64, height=64, fmt="PNG", mode="RGBA").to_pylist()[0]}
    kept = plan_units(pa.Table.from_pylist([row]), options())[0]["samples"][0]
    flat = plan_units(pa.Table.from_pylist([row]), options(alpha_background="white"))[0]["samples"][0]
    assert not kept["reencode"] and flat["reencode"] and flat["background"] == "white"
    out = Image.open(io.BytesIO(resize_image(png.getvalue(), (64, 64), "png", 95, False, 1, flat["background"])))
    pixels = np.asarray(out)
    assert out.mode == "RGB" and tuple(pixels[0, 0]) == (255, 255, 255) and tuple(pixels[32, 32]) == (0, 0, 255)
    opaque = plan_units(selection(1, width=64, height=64, fmt="PNG"), options(alpha_background="white"))
    assert not opaque[0]["samples"][0]["reencode"]  # an RGB picture has nothing to flatten


def test_the_text_is_one_line():
    """kohya trains on a caption file's first line only: a caption over two lines (from its source,
    or typed in review) is one line in KEY.txt, KEY.json keeps it as it was, and a caption of
    white space alone is no caption (the tags are written)."""
    rows = selection(2).to_pylist()
    rows[0]["caption"] = "A girl smiles.\r\n\n  She waves.\t"
    rows[1]["caption"] = " \n\u3000 "
    samples = plan_units(pa.Table.from_pylist(rows), options(text="caption"))[0]["samples"]
    assert samples[0]["txt"] == "A girl smiles. She waves."
    assert json.loads(samples[0]["json"])["caption"] == rows[0]["caption"]
    assert samples[1]["txt"] == "1girl, long hair, ^_^" and json.loads(samples[1]["json"])["text_from"] == "tags"


def test_a_written_shard_of_original_images_is_within_max_bytes(tmp_path):
    """max_bytes is exact for original images: the tar's end (two zero blocks, then zeros to a
    whole 10 KiB record) counts too. Samples planned to just under the limit made a shard of up
    to 11 KiB over it (1,003,520 bytes for max_bytes 1,000,000 on the sample)."""
    from udfs.export.export_plan import plan_samples
    from udfs.export.export_shard import ShardTar

    rows = selection(4, nbytes=100_000).to_pylist()
    samples, _ = plan_samples(rows, options(max_bytes=10**9))
    total = sum(s["planned_bytes"] for s in samples)
    checked = 0
    for max_bytes in range(total - 4_000, total + 12_000, 331):
        samples, shards = plan_samples(rows, options(max_bytes=max_bytes, max_count=1000))
        for shard in range(shards):
            members = [s for s in samples if s["copies"][0]["shard"] == shard]
            path = tmp_path / f"{max_bytes}-{shard}.tar"
            tar = ShardTar(str(path))
            for s in members:
                tar.write(s["name"], {"jpg": b"\xff" * s["bytes"], "txt": s["txt"].encode(),
                                      "json": s["json"].encode()})
            tar.close()
            if len(members) > 1:  # a sample alone over the limit has a shard of its own
                assert path.stat().st_size <= max_bytes, (max_bytes, len(members), path.stat().st_size)
                checked += 1
    assert checked


def test_a_shard_is_byte_for_byte_what_tarfile_writes_and_webdataset_reads_it(tmp_path):
    """ShardTar frames tarfile's own headers itself (no copy of each image through BytesIO): the
    file must be the one tarfile.addfile writes (PAX headers for names tar's header cannot hold,
    padding to 512-byte blocks, the end record), sizes of 0 to a few blocks and a non-ASCII key."""
    import io

    import webdataset as wds

    from udfs.export.export_shard import ShardTar

    samples = [("a", {"png": b"", "txt": b"x", "json": b"{}"}),
               ("b" * 120, {"jpg": b"\xff" * 512, "txt": b"y" * 513, "json": b"{}"}),
               ("\u6771\u65b9 \u00e9t\u00e9", {"webp": bytes(range(256)) * 9, "txt": "\u00e9".encode(), "json": b"{}"})]
    ours, theirs = tmp_path / "ours.tar", tmp_path / "theirs.tar"
    writer = ShardTar(str(ours))
    for key, members in samples:
        writer.write(key, members)
    writer.close()
    with tarfile.open(theirs, "w", format=tarfile.PAX_FORMAT) as tar:
        for key, members in samples:
            for ext in sorted(members):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(members[ext]), 0, 0o444
                tar.addfile(info, io.BytesIO(members[ext]))
    assert ours.read_bytes() == theirs.read_bytes()
    read = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")})
            for s in wds.WebDataset(str(ours), shardshuffle=False)]
    assert read == samples


def test_a_members_header_is_the_one_tarfile_builds_for_every_name_and_size():
    """ShardTar builds the ustar header of an ASCII name itself (member_header): byte for byte
    tarfile's TarInfo.tobuf (PAX format, mode 0o444, mtime 0), for names of every length up to
    and past tar's 100, every ASCII character, random names, non-ASCII ones, and sizes up to and
    past the 8 GiB an octal field holds."""
    import random

    from udfs.export.export_shard import member_header

    rng = random.Random(0)
    names = ["k" * n + ".jpg" for n in range(0, 100)] + [f"a{chr(c)}b.txt" for c in range(128)]
    names += ["".join(chr(rng.randrange(128)) for _ in range(rng.randrange(1, 110))) for _ in range(500)]
    names += ["\u6771\u65b9.png", "\u00e9" * 60 + ".json", "x\udcff.txt", "b" * 120 + ".webp"]
    sizes = [0, 1, 511, 512, 513, 54_321, 8**11 - 1, 8**11, 10**12]
    checked = 0
    for name in names:
        for size in (*sizes, rng.randrange(8**11)):
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = size, 0, 0o444
            assert member_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING,
                                                           "surrogateescape"), (name, size)
            checked += 1
    assert checked == len(names) * (len(sizes) + 1)


# ---- units: content-defined cuts of a source's keys (sql/export_units.sql) ---------------------
def cut(keys_by_source: dict[str, list[str]], unit_size: int) -> list[tuple]:
    """(source, first_key, last_key, n_images) of the export's units over these selected keys."""
    import duckdb

    from jobs.export import unit_ranges

    con = duckdb.connect()
    con.register("export_selected", pa.Table.from_pylist(
        [{"source": s, "key": k} for s, keys in keys_by_source.items() for k in keys]))
    return [tuple(u[1:]) for u in unit_ranges(con, unit_size)]


def test_an_image_left_out_or_added_rewrites_its_own_units_not_the_rest_of_its_source():
    """Units were cut every max_count images of a source: one image left out (review, a flagged
    caption, --where) early in a 400-image folder moved every later unit's key range, and the
    export wrote the whole rest of the source again (100 of 100 units). Cut where the keys' hashes
    say, an image moves the units of its own run only."""
    keys = [f"art/img{i:04d}" for i in range(400)]
    before = cut({"/in/art": keys, "/in/b.tar": ["b/x", "b/y"]}, 4)
    assert all(n <= 4 for *_, n in before) and sum(n for *_, n in before) == 402
    assert len(before) <= 2 + 400 / (0.7 * 4)  # units of 0.7 max_count images and more, on average
    assert [u for u in before if u[0] == "/in/b.tar"] == [("/in/b.tar", "b/x", "b/y", 2)]
    for changed in ([k for k in keys if k != "art/img0003"], sorted(keys + ["art/img0003a"])):
        after = cut({"/in/art": changed, "/in/b.tar": ["b/x", "b/y"]}, 4)
        assert len(set(before) - set(after)) <= 3, set(before) - set(after)


def test_a_tar_on_object_storage_stays_one_unit():
    """It is read as one stream: cut, each unit would read it from its start."""
    keys = [f"s/{i:03d}" for i in range(50)]
    assert cut({"s3://bucket/s.tar": keys}, 4) == [("s3://bucket/s.tar", "s/000", "s/049", 50)]
