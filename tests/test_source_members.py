"""Members read back from local shards by the jobs after ingest (udfs/source_members.py)."""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from s3_server import AWS, s3_filesystem

from udfs.caption.caption_images import read_members
from udfs.ingest.sources import Unit, read_unit
from udfs.source_members import local_tar_members, source_members

LONG = "a/" + "long-folder-name/" * 8 + "d.jpg"  # over tar's 100 characters: a pax header before it
MEMBERS = [("a.jpg", b"A" * 700), ("a.txt", b"tags a"), ("b.jpg", b"B" * 1300), ("b.txt", b"tags b"),
           ("c.jpg", b"C" * 90), (LONG, b"D" * 30)]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> dict[str, int]:
    """The tar, and where each member's header starts in it."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(path) as tar:
        return {m.name: m.offset for m in tar}  # a member after a pax header: where the pax header starts


def hide_the_members_after(path: Path, offset: int) -> None:
    """Put at `offset` a well-formed header of a member that claims the rest of the shard and
    more: a walk from the start, or a stream, passes over every member after it, where a read
    that seeks to a later member's own header finds that member."""
    info = tarfile.TarInfo("b.txt")
    info.size = 1 << 30
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(info.tobuf(tarfile.GNU_FORMAT))


def damage_header(path: Path, offset: int) -> None:
    """The header at `offset` with a checksum that does not match it."""
    with open(path, "r+b") as f:
        f.seek(offset + 148)
        f.write(b"0000000\x00")


def test_ingest_records_where_each_member_header_starts(tmp_path):
    offsets = write_tar(tmp_path / "s.tar", MEMBERS)
    samples = list(read_unit(Unit("tar", str(tmp_path / "s.tar"), "s"), 10**6))
    assert {s.member_names[ext]: s.offsets[ext] for s in samples for ext in s.members} == offsets


def test_members_are_read_at_their_offsets_past_a_header_a_walk_cannot_pass(tmp_path):
    """A header that claims the rest of the shard hides the members after it from a walk from the
    start; they are still read at the offsets ingest recorded."""
    path = tmp_path / "s.tar"
    offsets = write_tar(path, MEMBERS)
    hide_the_members_after(path, offsets["b.txt"])
    wanted = {name: offsets[name] for name in ("a.jpg", "b.jpg", "c.jpg", LONG)}
    every = {"a.jpg": b"A" * 700, "b.jpg": b"B" * 1300, "c.jpg": b"C" * 90, LONG: b"D" * 30}
    assert dict(local_tar_members(str(path), wanted, 10**6)) == every
    walked = dict(local_tar_members(str(path), dict.fromkeys(wanted), 10**6))
    assert walked == {"a.jpg": b"A" * 700, "b.jpg": b"B" * 1300}
    # the captioner's reads (udfs/caption/caption_images.py) seek the same way
    names = list(wanted)
    assert read_members([str(path)] * 4, names, [wanted[n] for n in names]) == [every[n] for n in names]
    assert read_members([str(path)] * 4, names) == [every["a.jpg"], every["b.jpg"], None, None]


def test_walks_and_streams_read_on_past_a_damaged_header(tmp_path):
    """Members without an offset (an older workspace), in a compressed shard, in a stream from an
    earlier member: each is found past a damaged member header, as ingest read them; only the
    member under that header is lost."""
    from review.image_bytes import image_bytes

    path = tmp_path / "s.tar"
    offsets = write_tar(path, MEMBERS)
    damage_header(path, offsets["b.txt"])
    after = {"c.jpg": b"C" * 90, LONG: b"D" * 30}
    assert dict(local_tar_members(str(path), {**dict.fromkeys(after), "b.txt": None}, 10**6)) == after
    packed = tmp_path / "s.tar.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    assert dict(source_members(str(packed), dict.fromkeys(after), 10**6)) == after
    ranged = {"b.jpg": offsets["b.jpg"], "c.jpg": offsets["c.jpg"]}  # one stream from b.jpg, through b.txt
    assert dict(source_members(path.as_uri(), ranged, 10**6)) == {"b.jpg": b"B" * 1300, "c.jpg": b"C" * 90}
    assert image_bytes(str(path), LONG) == b"D" * 30  # the review page's index of a shard
    first_zeroed = tmp_path / "z.tar"  # tarfile opens it as an empty archive
    first_zeroed.write_bytes(bytes(512) + path.read_bytes()[512:])
    assert dict(local_tar_members(str(first_zeroed), dict.fromkeys(after), 10**6)) == after
    assert image_bytes(str(first_zeroed), "c.jpg") == b"C" * 90


def test_a_shard_rewritten_since_ingest_is_walked_for_the_members_no_longer_at_their_offsets(tmp_path):
    path = tmp_path / "s.tar"
    old = write_tar(path, MEMBERS)
    write_tar(path, [MEMBERS[2], ("c.jpg", b"new c"), MEMBERS[0]])  # reordered, c.jpg rewritten
    got = list(local_tar_members(str(path), {"a.jpg": old["a.jpg"], "c.jpg": old["c.jpg"]}, 10**6))
    assert sorted(got) == [("a.jpg", b"A" * 700), ("c.jpg", b"new c")]


def test_a_member_of_another_size_than_ingest_saw_is_not_found(tmp_path):
    """Given the sizes ingest saw (images.bytes), a member rewritten since (the same name, other
    bytes) is not handed out as the image the rows describe: at its offset, on a walk, in a
    compressed shard read as a stream, on object storage and in a folder; one of the same size is."""
    sizes = {"a.jpg": 700, "c.jpg": 90}
    members = [("a.jpg", b"a" * 700), ("c.jpg", b"a new picture")] + MEMBERS[1:4]
    shard = tmp_path / "s.tar"
    old = write_tar(shard, MEMBERS)
    new = write_tar(shard, members)
    (tmp_path / "s.tar.gz").write_bytes(gzip.compress(shard.read_bytes()))
    folder = tmp_path / "f"
    folder.mkdir()
    for name, data in members:
        (folder / name).write_bytes(data)
    kept = {"a.jpg": b"a" * 700}
    for offsets in (old, new, {}):
        wanted = {name: offsets.get(name) for name in sizes}
        assert dict(local_tar_members(str(shard), wanted, 10**6, sizes)) == kept
        assert dict(source_members(shard.as_uri(), wanted, 10**6, sizes)) == kept
    for source in (str(tmp_path / "s.tar.gz"), str(folder)):
        assert dict(source_members(source, dict.fromkeys(sizes), 10**6, sizes)) == kept
    assert dict(source_members(str(shard), dict.fromkeys(sizes), 10**6)) == {**kept, "c.jpg": b"a new picture"}


def test_a_member_over_the_size_limit_is_not_read(tmp_path):
    path = tmp_path / "s.tar"
    offsets = write_tar(path, MEMBERS)
    wanted = {"a.jpg": offsets["a.jpg"], "b.jpg": offsets["b.jpg"], "c.jpg": None}
    assert dict(local_tar_members(str(path), wanted, 1000)) == {"a.jpg": b"A" * 700, "c.jpg": b"C" * 90}


def test_a_member_cut_short_since_ingest_is_not_read_and_a_sparse_one_is_read_whole(tmp_path):
    """A member read at its offset is the bytes tarfile gives for it: none when the shard now
    ends inside them (reported missing, not half an image), and a sparse member (GNU tar -S) with
    its holes filled, not the pieces as stored."""
    path = tmp_path / "s.tar"
    offsets = write_tar(path, MEMBERS)
    with open(path, "r+b") as f:
        f.truncate(offsets["b.jpg"] + 512 + 1000)  # b.jpg's header and 1000 of its 1300 bytes
    wanted = {"a.jpg": offsets["a.jpg"], "b.jpg": offsets["b.jpg"]}
    assert dict(local_tar_members(str(path), wanted, 10**6)) == {"a.jpg": b"A" * 700}
    if shutil.which("tar") is None:
        pytest.skip("no tar command to write a sparse member")
    image = tmp_path / "sparse.jpg"
    with open(image, "wb") as f:
        f.write(b"head")
        f.seek(200_000)
        f.write(b"tail")
    subprocess.run(["tar", "-S", "-cf", "sparse.tar", "sparse.jpg"], cwd=tmp_path, check=True)
    with tarfile.open(tmp_path / "sparse.tar") as tar:
        member = tar.getmember("sparse.jpg")
        assert member.sparse  # else this tar wrote no sparse member, and the test proves nothing
    expected = image.read_bytes()
    assert dict(local_tar_members(str(tmp_path / "sparse.tar"), {"sparse.jpg": member.offset}, 10**6)) == \
        {"sparse.jpg": expected}


def test_a_repeated_member_name_is_read_as_ingest_took_it(tmp_path):
    """The first of a repeated name that fits max_member_bytes: its offset, and the walk's pick."""
    path = tmp_path / "s.tar"
    write_tar(path, [("a.jpg", b"first-long"), ("a.jpg", b"second"), ("a.txt", b"tags")])
    with tarfile.open(path) as tar:
        first, second = [m.offset for m in tar.getmembers()[:2]]
    for limit, data, offset in ((10**6, b"first-long", first), (8, b"second", second)):
        [sample] = [s for s in read_unit(Unit("tar", str(path), "s"), limit) if not isinstance(s, tuple)]
        assert (sample.members["jpg"], sample.offsets["jpg"]) == (data, offset)
        assert dict(local_tar_members(str(path), {"a.jpg": offset}, limit)) == {"a.jpg": data}
        assert dict(local_tar_members(str(path), {"a.jpg": None}, limit)) == {"a.jpg": data}


def test_a_shard_on_object_storage_is_read_from_its_first_wanted_member(tmp_path):
    """A URI source (file:// here, s3:// on a cluster): one ranged stream from the first wanted
    member's header, where a stream from the start passes over them (a header before them claims the rest)."""
    path = tmp_path / "s.tar"
    offsets = write_tar(path, MEMBERS)
    hide_the_members_after(path, offsets["b.txt"])
    uri = path.as_uri()
    wanted = {"c.jpg": offsets["c.jpg"], LONG: offsets[LONG]}
    assert dict(source_members(uri, wanted, 10**6)) == {"c.jpg": b"C" * 90, LONG: b"D" * 30}
    assert dict(source_members(uri, dict.fromkeys(wanted), 10**6)) == {}


def test_members_no_longer_at_their_offsets_on_object_storage_are_read_from_the_start(tmp_path):
    path = tmp_path / "s.tar"
    old = write_tar(path, MEMBERS)
    write_tar(path, [("c.jpg", b"new c"), MEMBERS[0]])  # shorter now: c.jpg's old offset is past its end
    assert list(source_members(path.as_uri(), {"c.jpg": old["c.jpg"]}, 10**6)) == [("c.jpg", b"new c")]


def test_a_compressed_shard_is_read_as_a_shard_whatever_its_name(tmp_path):
    """images.source names a shard or a folder; which one is not in the name's ending: a .tar.gz
    is a shard (read as a stream), a folder named x.tar a folder (export, annotate, the captioner,
    the report and the review page all ask source_kind)."""
    from review.image_bytes import image_bytes
    from store.workspace import Workspace
    from udfs.annotate.annotate_rows import read_unit_images
    from udfs.ingest.sources import source_kind

    offsets = write_tar(tmp_path / "s.tar", MEMBERS)
    packed = tmp_path / "s.tar.gz"
    packed.write_bytes(gzip.compress((tmp_path / "s.tar").read_bytes()))
    (tmp_path / "odd.tar").mkdir()
    (tmp_path / "odd.tar" / "e.jpg").write_bytes(b"E")
    assert [source_kind(str(p)) for p in (packed, tmp_path / "s.tar", tmp_path / "odd.tar")] == ["tar", "tar", "folder"]
    assert source_kind("s3://bucket/shards/s.tgz") == "tar"

    assert image_bytes(str(packed), "c.jpg", offsets["c.jpg"]) == b"C" * 90
    assert image_bytes(str(packed), LONG) == b"D" * 30
    assert image_bytes(str(tmp_path / "odd.tar"), "e.jpg") == b"E"
    assert read_members([str(packed)] * 2, ["b.jpg", "nope.jpg"]) == [b"B" * 1300, None]

    ws = Workspace(str(tmp_path / "ws"))
    ws.write_part("images", "u0", [{"key": f"k/{m}", "source": str(packed), "member": m} for m in ("a.jpg", "b.jpg")]
                  + [{"key": "k/e", "source": str(tmp_path / "odd.tar"), "member": "e.jpg"}])
    rows = list(read_unit_images({"unit": "u0", "parts": ["u0"]}, str(tmp_path / "ws"), 10**6))
    assert {r["key"]: r["data"] for r in rows} == {"k/a.jpg": b"A" * 700, "k/b.jpg": b"B" * 1300, "k/e": b"E"}


def test_a_shard_on_s3_is_read_with_ranged_gets_from_its_first_wanted_member(tmp_path, s3_endpoint, monkeypatch):
    """The same on a real S3-compatible server on loopback (moto's, tests/s3_server.py): members
    that a header before them hides from a stream of the whole shard are found, so the read began
    at the first wanted member's offset;
    the captioner's reads take the same path."""
    for name, value in AWS.items():
        monkeypatch.setenv(name, value)
    path = tmp_path / "s.tar"
    offsets = write_tar(path, MEMBERS)
    hide_the_members_after(path, offsets["b.txt"])
    with s3_filesystem(s3_endpoint).open_output_stream("ws-bucket/shards/s.tar") as out:
        out.write(path.read_bytes())
    uri = f"s3://ws-bucket/shards/s.tar?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    wanted = {"c.jpg": offsets["c.jpg"], LONG: offsets[LONG]}
    assert dict(source_members(uri, wanted, 10**6)) == {"c.jpg": b"C" * 90, LONG: b"D" * 30}
    assert dict(source_members(uri, {"a.jpg": offsets["a.jpg"], "c.jpg": None}, 10**6)) == {"a.jpg": b"A" * 700}
    names = [LONG, "c.jpg"]
    assert read_members([uri] * 2, names, [offsets[n] for n in names]) == [b"D" * 30, b"C" * 90]


def test_a_folders_members_come_in_name_order(tmp_path):
    """The members of a folder source come in name order, not a set's (which changes with each
    process's hash seed): an export shard of a folder input held its samples in another order on
    every run."""
    folder = tmp_path / "f"
    folder.mkdir()
    names = [f"{word}{i}.jpg" for i, word in enumerate(["zeta", "alpha", "mid", "beta", "omega"] * 6)]
    for name in names:
        (folder / name).write_bytes(name.encode())
    got = [name for name, _ in source_members(str(folder), dict.fromkeys(names), 10**6)]
    assert got == sorted(names)
