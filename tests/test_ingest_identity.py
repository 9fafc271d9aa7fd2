"""Identity: a key is `<input id>/<path in the input>`, never where a file fell in a chunk; a grown
folder adds exactly its new files, a removed file is reported; every folder entry and tar member
that is not a regular file is accounted for without being opened."""

from __future__ import annotations

import io
import os
import tarfile

import pytest
from hostile_data import encode, picture
from kill_mid_run import booruset

from jobs import ingest
from jobs.config import ConfigError, load_config
from store.workspace import Workspace

pytestmark = pytest.mark.usefixtures("ray_local")


def ingest_inputs(ws_path, *inputs, unit_size: int = 3) -> tuple:
    quoted = ", ".join(f'"{i}"' for i in inputs)
    cfg = load_config(None, [f'workspace.path="{ws_path}"', f"ingest.inputs=[{quoted}]",
                             f"ingest.folder_unit_size={unit_size}"])
    ws = Workspace(str(ws_path))
    return ingest.run(cfg, ws), ws


def add_image(folder, name: str, seed: int) -> None:
    picture(seed=seed).save(folder / f"{name}.png")
    (folder / f"{name}.txt").write_text(f"1girl, tag_{name}")


def images_by_key(ws) -> dict[str, str]:
    rows = ws.read_table("images").to_pylist()
    assert len(rows) == len({r["key"] for r in rows}), "a key twice"
    return {r["key"]: r["sha256"] for r in rows}


def test_keys_do_not_move_when_a_folder_grows(tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    for i in range(10, 30):
        add_image(folder, f"img{i}", i)
    first, ws = ingest_inputs(tmp_path / "ws", folder)
    before = images_by_key(ws)
    assert sorted(before) == [f"art/img{i}" for i in range(10, 30)]
    for name, seed in (("img00", 100), ("img19b", 101), ("img99", 102)):  # front, middle, end
        add_image(folder, name, seed)
        summary, ws = ingest_inputs(tmp_path / "ws", folder)
        now = images_by_key(ws)
        assert {k: now[k] for k in before} == before  # no key moved, no image changed its key
        assert set(now) - set(before) == {f"art/{name}"}  # exactly the new file was added
        assert summary.units_done < first.units_done  # only the unit the file fell in is redone
        assert len(ws.read_table("source_tags")) == len(now) * 2
        before = now
    assert [e for e in ws.read_table("errors").to_pylist() if e["kind"] == "removed_from_input"] == []


def test_a_removed_file_is_reported_and_its_rows_go(tmp_path):
    folder = tmp_path / "art"
    folder.mkdir()
    for i in range(12):
        add_image(folder, f"img{i:02d}", i)
    ingest_inputs(tmp_path / "ws", folder)
    (folder / "img05.png").unlink()
    (folder / "img05.txt").unlink()
    summary, ws = ingest_inputs(tmp_path / "ws", folder)
    assert sorted(images_by_key(ws)) == [f"art/img{i:02d}" for i in range(12) if i != 5]
    assert "art/img05" not in {r["key"] for r in ws.read_table("source_tags").to_pylist()}
    removed = [e for e in ws.read_table("errors").to_pylist() if e["kind"] == "removed_from_input"]
    assert [(e["key"], e["member"]) for e in removed] == [("art/img05", "img05.png")]
    assert any("1 images are no longer in the inputs" in n for n in summary.notes)
    assert summary.errors_by_kind["removed_from_input"] == 1  # its errors row counts with the run's errors
    summary, ws = ingest_inputs(tmp_path / "ws", folder)  # nothing to do: the table's rows, as for every kind
    assert summary.units_done == 0 and summary.errors == ws.read_table("errors").num_rows == 1


def test_an_image_removed_beside_its_kept_sidecar_is_reported_removed(tmp_path):
    """img05.png deleted, img05.txt left: the image is gone from the input as much as when both
    go. It was a no_image row only, and the summary said "0 images are no longer in the inputs"."""
    folder = tmp_path / "art"
    folder.mkdir()
    for i in range(12):
        add_image(folder, f"img{i:02d}", i)
    ingest_inputs(tmp_path / "ws", folder)
    (folder / "img05.png").unlink()
    summary, ws = ingest_inputs(tmp_path / "ws", folder)
    assert "art/img05" not in images_by_key(ws)
    kinds = sorted((e["kind"], e["member"]) for e in ws.read_table("errors").to_pylist())
    assert kinds == [("no_image", "img05.txt"), ("removed_from_input", "img05.png")]
    assert any("1 images are no longer in the inputs" in n for n in summary.notes)


def test_an_image_put_back_loses_its_removed_from_input_row(tmp_path):
    """A file removed, then put back: its removed_from_input row stayed for ever, saying "no
    longer in the input" beside the image's rows. Only the rows of images put back go."""
    folder = tmp_path / "art"
    folder.mkdir()
    for i in range(12):
        add_image(folder, f"img{i:02d}", i)
    ingest_inputs(tmp_path / "ws", folder)
    for name in ("img03", "img05"):
        (folder / f"{name}.png").unlink()
    _, ws = ingest_inputs(tmp_path / "ws", folder)
    assert removed_keys(ws) == ["art/img03", "art/img05"]
    add_image(folder, "img05", 5)
    _, ws = ingest_inputs(tmp_path / "ws", folder)
    assert "art/img05" in images_by_key(ws) and removed_keys(ws) == ["art/img03"]
    add_image(folder, "img03", 3)
    summary, ws = ingest_inputs(tmp_path / "ws", folder)
    assert ws.read_table("errors").num_rows == 0 and len(images_by_key(ws)) == 12
    summary, _ = ingest_inputs(tmp_path / "ws", folder)
    assert summary.units_done == 0


def test_a_member_gone_from_a_rewritten_shard_is_reported_removed(tmp_path):
    """A shard written again without b.png: b's rows went with no removed_from_input row, and
    the summary said 0 images were no longer in the inputs. The members it still holds are not
    reported; a second run changes nothing."""
    (tmp_path / "in").mkdir()
    shard = tmp_path / "in" / "s.tar"
    members = {name: encode(picture(seed=i), "PNG") for i, name in enumerate(("a.png", "b.png", "c.png"))}

    def write(names: list[str]) -> None:
        with tarfile.open(shard, "w") as tar:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = len(members[name])
                tar.addfile(info, io.BytesIO(members[name]))

    write(["a.png", "b.png", "c.png"])
    ingest_inputs(tmp_path / "ws", tmp_path / "in")
    write(["a.png", "c.png"])
    summary, ws = ingest_inputs(tmp_path / "ws", tmp_path / "in")
    assert sorted(images_by_key(ws)) == ["in/s/a", "in/s/c"] and removed_keys(ws) == ["in/s/b"]
    assert any("1 images are no longer in the inputs" in n for n in summary.notes)
    assert summary.errors_by_kind["removed_from_input"] == 1
    write(["a.png", "b.png", "c.png"])  # put back
    summary, ws = ingest_inputs(tmp_path / "ws", tmp_path / "in")
    assert len(images_by_key(ws)) == 3 and removed_keys(ws) == [] and "removed_from_input" not in summary.errors_by_kind
    summary, _ = ingest_inputs(tmp_path / "ws", tmp_path / "in")
    assert summary.units_done == 0

    write(["c.png", "a.png"])  # killed right after the old unit is retired, then run again
    killed = booruset("ingest", "-w", str(tmp_path / "ws"), "-i", str(tmp_path / "in"), "--set",
                      "ingest.folder_unit_size=3", BOORUSET_KILL_AFTER_COMMITS="1")
    killed.communicate(timeout=300)
    assert killed.returncode == -9
    _, ws = ingest_inputs(tmp_path / "ws", tmp_path / "in")
    assert sorted(images_by_key(ws)) == ["in/s/a", "in/s/c"] and removed_keys(ws) == ["in/s/b"]


def test_the_start_line_does_not_say_a_rewritten_shards_members_stayed(tmp_path, capsys):
    """A shard written again without b.png: ingest's first line said "0 images gone from the
    inputs" (its members are known only once it is read) while its summary said 1. It now says
    how many may be gone."""
    (tmp_path / "in").mkdir()
    shard = tmp_path / "in" / "s.tar"
    members = {name: encode(picture(seed=i), "PNG") for i, name in enumerate(("a.png", "b.png"))}
    for names in (["a.png", "b.png"], ["a.png"]):
        with tarfile.open(shard, "w") as tar:
            for name in names:
                info = tarfile.TarInfo(name)
                info.size = len(members[name])
                tar.addfile(info, io.BytesIO(members[name]))
        capsys.readouterr()
        summary, ws = ingest_inputs(tmp_path / "ws", tmp_path / "in")
    first = capsys.readouterr().out.splitlines()[0]
    assert "0 images gone from the inputs (and up to 2 of 1 rewritten shards, known once read)" in first, first
    assert any("1 images are no longer in the inputs" in n for n in summary.notes)


def removed_keys(ws) -> list[str]:
    return sorted(e["key"] for e in ws.read_table("errors").to_pylist() if e["kind"] == "removed_from_input")


def test_inputs_with_the_same_name_get_distinct_ids(tmp_path):
    for side in ("a", "b"):
        folder = tmp_path / side / "dup"
        folder.mkdir(parents=True)
        for i in range(5):
            add_image(folder, f"img{i}", i + (10 if side == "b" else 0))
    _, ws = ingest_inputs(tmp_path / "ws", tmp_path / "a" / "dup", tmp_path / "b" / "dup")
    keys = images_by_key(ws)
    assert len(keys) == 10
    prefixes = sorted({k.split("/", 1)[0] for k in keys})
    assert prefixes[0] == "dup" and prefixes[1].startswith("dup-")
    # the ids are the workspace's: ingesting b alone later keeps b's keys
    _, ws = ingest_inputs(tmp_path / "ws", tmp_path / "b" / "dup")
    assert images_by_key(ws) == keys


def one_image_tar(path, member: str = "a.png") -> None:
    with tarfile.open(path, "w:gz" if path.name.endswith(".gz") else "w") as tar:
        data = encode(picture(seed=1), "PNG")
        info = tarfile.TarInfo(member)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("beside", ["s.tar.gz", "s/a.png", "s/sub.tar", "s/deeper/b.png"])
def test_a_shard_and_what_would_share_its_keys_are_refused_before_anything_is_read(tmp_path, beside):
    """A shard's keys are its path without .tar then its members' names: `s.tar` beside `s.tar.gz`,
    or beside the folder `s/` it was unpacked to, gave two images rows under one key (export then
    refused the workspace). Refused at planning with both names; names that only look alike pass."""
    folder = tmp_path / "in"
    (folder / "s" / "deeper").mkdir(parents=True)
    one_image_tar(folder / "s.tar")
    if beside.endswith((".tar", ".gz")):
        one_image_tar(folder / beside)
    else:
        add_image(folder / beside.rsplit("/", 1)[0], beside.rsplit("/", 1)[1].removesuffix(".png"), 2)
    with pytest.raises(ConfigError, match=r"s\.tar and s.* would both give keys that begin s/"):
        ingest_inputs(tmp_path / "ws", folder)
    assert not list((tmp_path / "ws").rglob("*.parquet"))


def test_names_that_only_look_like_a_shards_are_its_neighbours(tmp_path):
    folder = tmp_path / "in"
    (folder / "s2").mkdir(parents=True)
    one_image_tar(folder / "s.tar")
    one_image_tar(folder / "s.x.tar")
    add_image(folder, "s", 3)  # key in/s: beside the shard's in/s/a, not under one prefix
    add_image(folder / "s2", "a", 4)
    _, ws = ingest_inputs(tmp_path / "ws", folder)
    assert sorted(images_by_key(ws)) == ["in/s", "in/s.x/a", "in/s/a", "in/s2/a"]


def test_units_know_their_bytes_and_the_largest_start_first(tmp_path):
    """The job starts its largest units first (jobs/ray_env.largest_first over Unit.size), so that
    no large shard is left to run alone at the end; a unit's size is the bytes of its files."""
    from jobs.ray_env import largest_first
    from udfs.ingest.sources import discover_units

    folder = tmp_path / "in"
    folder.mkdir()
    for name, n in (("a_small", 1), ("z_large", 6)):  # listed small first
        with tarfile.open(folder / f"{name}.tar", "w") as tar:
            for i in range(n):
                data = encode(picture(seed=i), "PNG")
                info = tarfile.TarInfo(f"{i}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    for i in range(2):
        add_image(folder, f"loose{i}", 10 + i)
    units = discover_units([str(folder)], 100)
    sizes = {u.prefix: u.size for u in units}
    loose = sum(p.stat().st_size for p in folder.iterdir() if p.suffix != ".tar")
    assert sizes == {"in/a_small": (folder / "a_small.tar").stat().st_size,
                     "in/z_large": (folder / "z_large.tar").stat().st_size, "in": loose}
    assert [u.prefix for u in units][:2] == ["in/a_small", "in/z_large"]
    assert max(sizes.values()) == sizes["in/z_large"] > sizes["in/a_small"]
    assert [u.prefix for u in largest_first(units, lambda unit: unit.size)][0] == "in/z_large"


def test_folder_entries_that_are_not_regular_files(tmp_path):
    folder = tmp_path / "art"
    (folder / "sub").mkdir(parents=True)
    add_image(folder, "good", 1)
    secret = tmp_path / "outside.png"
    picture(seed=2).save(secret)
    os.symlink(folder / "good.png", folder / "inside_link.png")  # a link inside the input: followed
    os.symlink(secret, folder / "outside_link.png")  # out of the input: refused
    os.symlink(folder / "sub", folder / "dir_link")  # a linked directory: not walked
    os.symlink(tmp_path, folder / "out_dir_link")
    os.mkfifo(folder / "pipe.png")  # opening it would block for ever
    _, ws = ingest_inputs(tmp_path / "ws", folder)
    assert sorted(images_by_key(ws)) == ["art/good", "art/inside_link"]
    errors = {e["key"]: (e["kind"], e["message"]) for e in ws.read_table("errors").to_pylist()}
    assert errors["art/outside_link"][0] == errors["art/out_dir_link"][0] == "link_outside_input"
    assert errors["art/pipe"] == ("not_a_regular_file", "folder entry is a FIFO")
    assert errors["art/dir_link"] == ("not_a_regular_file", "folder entry is a directory")
    # an entry named as an image that is not read is a picture lost: a dropped sample (it was not)
    dropped = {e["key"] for e in ws.read_table("errors").to_pylist() if e["dropped"]}
    assert dropped == {"art/outside_link", "art/pipe"}


def test_tar_members_that_are_not_regular_files(tmp_path):
    shard = tmp_path / "odd.tar"
    png = encode(picture(), "PNG")
    with tarfile.open(shard, "w") as tar:
        info = tarfile.TarInfo("good.png")
        info.size = len(png)
        tar.addfile(info, io.BytesIO(png))
        for name, kind in (("folder", tarfile.DIRTYPE), ("link.png", tarfile.SYMTYPE), ("hard.png", tarfile.LNKTYPE),
                           ("tty.png", tarfile.CHRTYPE), ("disk.png", tarfile.BLKTYPE), ("pipe.png", tarfile.FIFOTYPE)):
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = "good.png" if kind in (tarfile.SYMTYPE, tarfile.LNKTYPE) else ""
            tar.addfile(info)
    summary, ws = ingest_inputs(tmp_path / "ws", shard)
    assert sorted(images_by_key(ws)) == ["odd/good"]
    errors = {e["key"]: e["message"] for e in ws.read_table("errors").to_pylist() if e["kind"] == "not_a_regular_file"}
    assert errors == {"odd/folder": "tar member is a directory", "odd/link": "tar member is a symbolic link",
                      "odd/hard": "tar member is a hard link", "odd/tty": "tar member is a character device",
                      "odd/disk": "tar member is a block device", "odd/pipe": "tar member is a FIFO"}
    assert summary.rows_out["images"] + summary.dropped == summary.rows_in
    # the links and devices named as images were lost without counting: dropped samples now
    dropped = {e["key"] for e in ws.read_table("errors").to_pylist() if e["dropped"]}
    assert dropped == {"odd/link", "odd/hard", "odd/tty", "odd/disk", "odd/pipe"}
    assert (summary.rows_in, summary.dropped) == (6, 5)


def test_other_ingest_limits_read_every_unit_again(tmp_path):
    """Rows follow the limits of the last run: a run with another max_tags reads every unit again
    (units read under other limits are other units), replacing their rows without a
    removed_from_input row; before, units already read kept the old limits and only the rest
    took the new ones, so a run killed part way ended otherwise than one that was not."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        picture(seed=i).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text("1girl, solo, smile, red_hair, long_hair")
    ws_path = tmp_path / "ws"

    def tags_per_image(*overrides: str) -> set[int]:
        quoted = f'"{folder}"'
        cfg = load_config(None, [f'workspace.path="{ws_path}"', f"ingest.inputs=[{quoted}]",
                                 "ingest.folder_unit_size=2", *overrides])
        summary = ingest.run(cfg, Workspace(str(ws_path)))
        assert "removed_from_input" not in summary.errors_by_kind
        counts = Workspace(str(ws_path)).connect().execute("select count(*) from source_tags group by key")
        return {n for (n,) in counts.fetchall()}

    assert tags_per_image() == {5}
    keys = images_by_key(Workspace(str(ws_path)))
    assert tags_per_image("ingest.max_tags=2") == {2}
    assert images_by_key(Workspace(str(ws_path))) == keys
    assert tags_per_image() == {5}


APPLE_DOUBLE = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + bytes(64)  # a `._` file's header


def test_files_an_operating_system_leaves_are_not_samples(tmp_path):
    """A tar made on macOS holds a `._NAME` AppleDouble file before each file, and folders copied
    about hold `.DS_Store`, `Thumbs.db`, `desktop.ini`: each was a dropped sample (the `._` ones
    under one key `dir/`, `duplicate_key`), and the job failed on max_error_rate with every image
    ingested. They are ignored members: named, not read, not samples."""
    members = []
    for i in range(3):
        members += [(f"dir/._img{i}.png", APPLE_DOUBLE), (f"dir/img{i}.png", encode(picture(seed=i), "PNG")),
                    (f"dir/img{i}.txt", b"1girl")]
    members += [("dir/.DS_Store", b"\0\0\0\1Bud1"), ("._dir", APPLE_DOUBLE), ("__MACOSX/dir/._img0.png", APPLE_DOUBLE)]
    shard = tmp_path / "in" / "mac.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    folder = tmp_path / "in" / "art"
    folder.mkdir()
    add_image(folder, "a", 5)
    for name, data in (("._a.png", APPLE_DOUBLE), (".DS_Store", b"\0\0\0\1Bud1"), ("Thumbs.db", b"\xd0\xcf\x11\xe0"),
                       ("desktop.ini", b"[.ShellClassInfo]\r\n")):
        (folder / name).write_bytes(data)
    summary, ws = ingest_inputs(tmp_path / "ws", tmp_path / "in")
    assert sorted(images_by_key(ws)) == ["in/art/a", "in/mac/dir/img0", "in/mac/dir/img1", "in/mac/dir/img2"]
    errors = {e["key"]: (e["kind"], e["dropped"]) for e in ws.read_table("errors").to_pylist()}
    assert errors == {key: ("ignored_member", False) for key in (
        "in/mac/dir/._img0", "in/mac/dir/._img1", "in/mac/dir/._img2", "in/mac/dir/.DS_Store", "in/mac/._dir",
        "in/mac/__MACOSX/dir/._img0", "in/art/._a", "in/art/.DS_Store", "in/art/Thumbs", "in/art/desktop")}
    assert (summary.rows_in, summary.dropped) == (4, 0)


def test_putting_back_rewritten_shards_holds_one_shards_keys_at_a_time(tmp_path):
    """Every shard of an input written again (a re-download, a repack): forget_returned, in the
    driver, checks each reported image against the keys of its shard's new unit, and kept the
    keys of every shard it had read until it returned, the keys of the whole input at once (a
    million images: ~100 MB more in the driver). A retired unit's rows are of one shard: its
    keys are needed only while that unit is checked, so the peak does not grow with the shards."""
    import tracemalloc

    from udfs.ingest.sources import Unit

    def peak(shards: int, per_shard: int = 3000) -> int:
        ws = Workspace(str(tmp_path / f"ws{shards}"))
        units = [Unit("tar", f"/in/s{i}.tar", f"in/s{i}", input="in", stamp="new") for i in range(shards)]
        for i, unit in enumerate(units):
            keys = [f"in/s{i}/{j:06d}" for j in range(per_shard)]
            ws.write_part("images", f"now{i}", [{"key": k, "source": unit.uri, "member": f"{k[-6:]}.png"}
                                                for k in keys])
            ws.commit_unit("ingest", ingest.unit_key(unit), {"input": "in", "images": per_shard},
                           parts={"images": [f"now{i}"]})
            ws.write_part("errors", f"removed-old{i}", [
                {"key": k, "source": unit.uri, "member": f"{k[-6:]}.png", "stage": "ingest",
                 "kind": "removed_from_input", "message": "no longer in the input", "dropped": False} for k in keys])
            ws.commit_unit("ingest", f"old{i}", {"retired": True, "input": "in", "removed": per_shard},
                           parts={"errors": [f"removed-old{i}"]})
        tracemalloc.start()
        try:
            back = ingest.forget_returned(ws, units)
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
            assert back == {f"old{i}": per_shard for i in range(shards)}  # every image is back

    few, many = peak(2), peak(10)
    assert many < 1.3 * few, (few, many)


def test_a_growing_folder_lists_its_planned_keys_once_a_run(tmp_path, monkeypatch):
    """A folder chunk that gains a file is retired with no image gone (its errors part is
    empty); forget_returned then computed the key of every planned file of the inputs (a
    relpath each: 1M files ~25 s on the driver) before and after every later run with work, to
    find no row to look at. It skips retired units that reported no image."""
    folder = tmp_path / "art"
    folder.mkdir()
    for i in range(10, 30):
        add_image(folder, f"img{i}", i)
    ingest_inputs(tmp_path / "ws", folder)
    calls = []
    planned_keys = ingest.planned_keys
    monkeypatch.setattr(ingest, "planned_keys", lambda units: calls.append(1) or planned_keys(units))
    for name, seed in (("img15b", 100), ("img25b", 101)):
        add_image(folder, name, seed)
        calls.clear()
        summary, ws = ingest_inputs(tmp_path / "ws", folder)
        assert summary.units_done >= 1 and "removed_from_input" not in summary.errors_by_kind
        assert len(calls) == 1  # retire_stale_units's, for the chunk the file fell in
    assert sorted(images_by_key(ws)) == sorted(f"art/img{i}" for i in (*range(10, 30), "15b", "25b"))


def test_the_planned_keys_of_a_rerun_hold_a_few_bytes_an_image(tmp_path):
    """A rerun that retires a unit (a file added, removed or changed) checks each image it reported
    against the planned keys of the folders: a set of every planned key held ~120 bytes an image
    in the driver (a million images: 120 MB). The key ranges of the folder units, and a few units'
    keys while they are looked in, tell the same."""
    import gc
    import tracemalloc

    from udfs.ingest.sources import FileList, Unit

    def unit(chunk: int) -> Unit:
        names = [f"{chunk:03d}/{i:05d}_{i * 7919 % 100003:016x}.{ext}" for i in range(1000) for ext in ("png", "txt")]
        return Unit("folder", "/data/in", "in", FileList("/data/in/", names), input="in", stamp="s")

    units = [unit(chunk) for chunk in range(20)] + [Unit("tar", "/data/s.tar", "in/s", input="in")]
    gc.collect()
    tracemalloc.start()
    try:
        planned, shards = ingest.planned_keys(units)
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held / 20000 < 10, f"{held / 20000:.0f} bytes an image held"
    assert shards == {"in/s"}
    keys = [f"in/{c:03d}/{i:05d}_{i * 7919 % 100003:016x}" for c in range(20) for i in range(1000)]
    assert all(key in planned for key in keys)
    assert not any(key in planned for key in (keys[5] + "0", keys[5][:-1], "in", "in/005", "in/s/x", "zz", ""))


def test_a_retired_units_images_are_looked_up_in_key_order(tmp_path, monkeypatch):
    """The planned keys are built a unit at a time as the keys checked fall in them (PlannedKeys
    keeps a few): a retired unit's images in another order than their keys' (an old chunk now cut
    in twelve) are checked in key order, each planned unit's keys built once, and the images gone
    are reported as before."""
    from udfs.ingest.sources import FileList, Unit

    built = []
    unit_keys = ingest.PlannedKeys.unit_keys
    monkeypatch.setattr(ingest.PlannedKeys, "unit_keys", lambda self, index: built.append(index)
                        or unit_keys(self, index))
    names = [f"{i:03d}.png" for i in range(120) if i % 10 != 3]  # the images ending in 3 are gone
    units = [Unit("folder", "/data/in", "in", FileList("/data/in/", names[c * 10:c * 10 + 10]), input="in", stamp="s")
             for c in range(12)]
    ws = Workspace(str(tmp_path / "ws"))
    scrambled = [f"{(i * 7) % 120:03d}" for i in range(120)]  # every image, out of key order
    ws.write_part("images", "old", [{"key": f"in/{k}", "source": "/data/in", "member": f"{k}.png"} for k in scrambled])
    done = {"old": {"input": "in", "parts": {"images": ["old"]}}}
    replaced, removed, _ = ingest.retire_stale_units(ws, done, units)
    assert (replaced, removed) == (1, 12)
    assert sorted(built) == sorted(set(built)), "a planned unit's keys built twice"
    gone = sorted(row["key"] for row in ws.read_part("errors", "removed-old", ["key"]))
    assert gone == [f"in/{i:03d}" for i in range(120) if i % 10 == 3]
