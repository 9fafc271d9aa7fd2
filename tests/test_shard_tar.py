"""udfs/ingest/shard_tar.py through read_unit: a damaged shard loses only the members under the
damage, says where, and never gives members that are not in it. Each case is read as a plain
local shard (seeks) and gzipped (a stream): the same items both ways. And compressed shards are
read whole, from local disk and from object storage."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import random
import shutil
import subprocess
import tarfile
from pathlib import Path

import pyarrow as pa
import pytest
from s3_server import AWS, get_requests, s3_filesystem

from udfs.ingest.sources import Unit, read_unit

MEMBERS = [(f"k{i}.{ext}", bytes([65 + i]) * (900 if ext == "jpg" else 10)) for i in range(4) for ext in ("jpg", "txt")]
LONG = "x" * 120 + ".jpg"  # over the header's 100 bytes: a pax (or GNU long-name) header before it


def tar_bytes(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def headers(data: bytes) -> dict[str, tuple[int, int]]:
    """{member: (where its headers start, where its own ustar header is)}."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name: (m.offset, m.offset_data - 512) for m in tar}


def damaged(data: bytes, at: int, zeroed: int = 0) -> bytes:
    """`data` with a wrong checksum in the header at `at`, or `zeroed` bytes of zeros from there."""
    out = bytearray(data)
    if zeroed:
        out[at:at + zeroed] = bytes(zeroed)
    else:
        out[at + 148:at + 156] = b"0000000\x00"
    return bytes(out)


def items(tmp_path: Path, data: bytes) -> list:
    """What read_unit gives for `data` as a plain shard, checked equal to what it gives gzipped:
    samples as (key, sorted extensions), problems as (member, kind, message)."""
    seen = []
    for name, content in (("s.tar", data), ("s.tar.gz", gzip.compress(data))):
        (tmp_path / name).write_bytes(content)
        seen.append([x if isinstance(x, tuple) else (x.key, sorted(x.members))
                     for x in read_unit(Unit("tar", str(tmp_path / name), "s"), 10**6)])
    assert seen[0] == seen[1]
    return seen[0]


def samples(found: list) -> list[str]:
    return [x[0] for x in found if len(x) == 2]


def problems(found: list) -> list[tuple[str, str, str]]:
    return [x for x in found if len(x) == 3]


def test_a_whole_shard_has_no_problem(tmp_path):
    assert items(tmp_path, tar_bytes(MEMBERS)) == [(f"k{i}", ["jpg", "txt"]) for i in range(4)]


@pytest.mark.parametrize("zeroed", [0, 512])
def test_a_damaged_or_zeroed_header_loses_its_member_only(tmp_path, zeroed):
    data = tar_bytes(MEMBERS)
    at = headers(data)["k1.jpg"][0]
    found = items(tmp_path, damaged(data, at, zeroed))
    assert found[0] == ("k0", ["jpg", "txt"])  # the sample before comes before the damage's row
    assert samples(found) == ["k0", "k1", "k2", "k3"] and ("k1", ["txt"]) in found
    [(member, kind, message)] = problems(found)
    why = "a zeroed header" if zeroed else "bad checksum"
    assert (member, kind) == ("", "corrupt_shard")
    assert f"at byte {at} ({why})" in message and f"at byte {headers(data)['k1.txt'][0]};" in message


def test_a_damaged_or_zeroed_first_header(tmp_path):
    """A bad first header kept the shard from opening, a zeroed one made it an empty archive:
    every member was lost, the zeroed case without a word."""
    data = tar_bytes(MEMBERS)
    for zeroed in (0, 512):
        found = items(tmp_path, damaged(data, 0, zeroed))
        assert samples(found) == ["k0", "k1", "k2", "k3"] and found[1] == ("k0", ["txt"])
        assert [k for _, k, _ in problems(found)] == ["corrupt_shard"] and "at byte 0" in found[0][2]


def test_the_zeroed_header_of_an_empty_member_is_reported(tmp_path):
    data = tar_bytes([("a.jpg", b"A" * 700), ("a.txt", b""), ("b.jpg", b"B" * 600)])
    found = items(tmp_path, damaged(data, headers(data)["a.txt"][0], 512))
    assert samples(found) == ["a", "b"] and "512 bytes between are lost" in problems(found)[0][2]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_a_damaged_long_name_header_does_not_give_its_member_a_cut_name(tmp_path, fmt):
    """Past a damaged pax / GNU long-name header, the member's own header holds only the first
    100 bytes of its name: not read under that name (it would be a sample no one wrote)."""
    data = tar_bytes([("a.jpg", b"A" * 700), (LONG, b"X" * 600), ("c.jpg", b"C" * 300)], fmt)
    found = items(tmp_path, damaged(data, headers(data)[LONG][0]))
    assert samples(found) == ["a", "c"]
    assert [(m, k) for m, k, _ in problems(found)] == [("", "corrupt_shard"), ("x" * 100, "corrupt_shard")]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_a_damaged_header_after_a_long_name_header_is_read_past(tmp_path, fmt):
    """tarfile stops the whole shard there (a SubsequentHeaderError)."""
    data = tar_bytes([("a.jpg", b"A" * 700), (LONG, b"X" * 600), ("c.jpg", b"C" * 300)], fmt)
    long_at, own_header = headers(data)[LONG]
    found = items(tmp_path, damaged(data, own_header))
    assert samples(found) == ["a", "c"]
    [(_, kind, message)] = problems(found)
    assert kind == "corrupt_shard" and f"at byte {long_at} " in message


def test_a_long_named_member_lost_inside_a_sample_leaves_the_sample_whole(tmp_path):
    """The member under the damaged long-name header goes; the sample's other members stay one
    sample (not a second one under the same key, which ingest drops as a duplicate)."""
    key = "x" * 120
    data = tar_bytes([("a.jpg", b"A" * 700), (f"{key}.txt", b"tags"), (f"{key}.cls", b"7"), (f"{key}.jpg", b"X" * 600),
                      ("c.jpg", b"C" * 300)])
    found = items(tmp_path, damaged(data, headers(data)[f"{key}.cls"][0]))
    assert samples(found) == ["a", key, "c"] and (key, ["jpg", "txt"]) in found
    assert [m for m, _, _ in problems(found)] == ["", "x" * 100]


def test_a_name_of_100_bytes_after_a_damaged_header_is_its_own(tmp_path):
    """Only a name the skipped blocks hold at greater length was cut; one that simply fills the
    header's name field (no long-name header) is read."""
    own = "y" * 96 + ".jpg"
    data = tar_bytes([("a.jpg", b"A" * 700), ("b.jpg", b"B" * 600), (own, b"Y" * 300), ("c.jpg", b"C" * 300)])
    found = items(tmp_path, damaged(data, headers(data)["b.jpg"][0]))
    assert samples(found) == ["a", "y" * 96, "c"] and len(problems(found)) == 1


def test_zero_blocks_in_the_data_of_a_member_under_a_damaged_header_do_not_end_the_shard(tmp_path):
    """A member's data may hold zero blocks (an .npy latent, a BMP): past its damaged header they
    are not tar's end."""
    data = tar_bytes([("a.jpg", b"A" * 700), ("b.npy", b"\x93NUMPY" + bytes(4000)), ("b.jpg", b"B" * 600),
                      ("c.jpg", b"C" * 300)])
    found = items(tmp_path, damaged(data, headers(data)["b.npy"][0]))
    assert samples(found) == ["a", "b", "c"] and len(problems(found)) == 1


@pytest.mark.skipif(shutil.which("tar") is None, reason="GNU tar is not installed")
def test_a_cut_name_in_a_gnu_tar_oldgnu_shard(tmp_path):
    """GNU tar's oldgnu format keeps 99 bytes of a long name in the member's own header."""
    folder = tmp_path / "files"
    folder.mkdir()
    for name, data in (("a.jpg", b"A" * 700), ("l" * 120 + ".jpg", b"L" * 600), ("c.jpg", b"C" * 300)):
        (folder / name).write_bytes(data)
    names = sorted(p.name for p in folder.iterdir())
    subprocess.run(["tar", "--format=oldgnu", "-cf", str(tmp_path / "g.tar"), "-C", str(folder), *names], check=True)
    data = (tmp_path / "g.tar").read_bytes()
    found = items(tmp_path, damaged(data, headers(data)["l" * 120 + ".jpg"][0]))
    assert samples(found) == ["a", "c"] and len(problems(found)) == 2


def test_data_after_tars_end_is_reported_not_read(tmp_path):
    """Two zero blocks end a tar. What follows is not read (a shorter shard written over a longer
    one would give the stale members), but it is reported: it may be members lost to a zeroed
    stretch, or a second archive appended."""
    data, short = tar_bytes(MEMBERS), tar_bytes(MEMBERS[:2])
    longer = tar_bytes([(f"z{i}.jpg", b"Z" * 5000) for i in range(6)])
    cases = {"stale tail": short + longer[len(short):], "appended": short + data,
             "zeroed stretch": damaged(data, headers(data)["k1.txt"][0], 4096)}
    for case, shard in cases.items():
        found = items(tmp_path, shard)
        assert samples(found) == (["k0", "k1"] if case == "zeroed stretch" else ["k0"]), case
        [(_, kind, message)] = problems(found)
        assert kind == "corrupt_shard" and "end-of-archive blocks" in message and "then data again" in message, case


def test_a_file_that_is_no_tar_says_so(tmp_path):
    [(_, kind, message)] = items(tmp_path, bytes(range(256)) * 40)
    assert kind == "corrupt_shard" and "is it a tar?" in message


BIG = [(f"k{i}.{ext}", bytes([65 + i]) * (200_000 if ext == "jpg" else 10))
       for i in range(10) for ext in ("jpg", "txt")]


def in_pieces(data: bytes, compress, size: int = 150_000) -> bytes:
    """`data` compressed piece by piece and the pieces joined: what bgzip, pbzip2 or pzstd write,
    and what concatenating compressed files gives; each piece is a whole gzip member (or bz2, xz,
    zstd stream)."""
    return b"".join(compress(data[at:at + size]) for at in range(0, len(data), size))


COMPRESSORS = {"gzip": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress,
               "zstd": lambda piece: pa.Codec("zstd").compress(piece, asbytes=True)}


@pytest.mark.parametrize("codec", COMPRESSORS)
def test_a_shard_compressed_in_pieces_is_read_whole(tmp_path, codec):
    """Every member of the shard comes back, whatever the name says: tarfile's own stream stopped
    at the end of the first piece and lost the rest of the shard."""
    plain = tar_bytes(BIG)
    whole = [(f"k{i}", ["jpg", "txt"]) for i in range(10)]
    for name, data in (("p.tar.x", in_pieces(plain, COMPRESSORS[codec])), ("w.tar", COMPRESSORS[codec](plain))):
        (tmp_path / name).write_bytes(data)
        assert [x if isinstance(x, tuple) else (x.key, sorted(x.members))
                for x in read_unit(Unit("tar", str(tmp_path / name), "s"), 10**7)] == whole, (codec, name)


@pytest.mark.parametrize("after", [bytes(4096), b"junk after the last member"])
def test_what_follows_the_last_gzip_member_loses_no_member(tmp_path, after):
    """Zeros a tape or block writer pads with, or junk: the members before it are all read."""
    (tmp_path / "s.tar.gz").write_bytes(in_pieces(tar_bytes(BIG), gzip.compress) + after)
    found = list(read_unit(Unit("tar", str(tmp_path / "s.tar.gz"), "s"), 10**7))
    assert [x.key for x in found] == [f"k{i}" for i in range(10)] and not any(x.problems for x in found)


@pytest.mark.parametrize("codec", ["gzip", "xz"])
def test_a_damaged_compressed_stream_keeps_what_came_before_and_says_so(tmp_path, codec):
    """gzip's inflate raises zlib.error (a bad block type where the third piece's data begins)
    and xz's lzma.LZMAError, neither an OSError: each becomes a row, and the samples before the
    damage are kept."""
    plain = tar_bytes(BIG)
    pieces = [COMPRESSORS[codec](plain[at:at + 150_000]) for at in range(0, len(plain), 150_000)]
    data = bytearray(b"".join(pieces))
    at = len(pieces[0]) + len(pieces[1]) + (10 if codec == "gzip" else len(pieces[2]) // 2)
    data[at:at + 8] = b"\xff" * 8
    (tmp_path / "s.tar.x").write_bytes(bytes(data))
    found = list(read_unit(Unit("tar", str(tmp_path / "s.tar.x"), "s"), 10**7))
    kept = [x.key for x in found if not isinstance(x, tuple) and not x.problems]
    assert 1 <= len(kept) < 10 and kept == [f"k{i}" for i in range(len(kept))]
    assert [x[1] for x in found if isinstance(x, tuple)] == ["corrupt_shard"]


@pytest.mark.parametrize("codec", COMPRESSORS)
@pytest.mark.parametrize("cut", [10, 300_000])
def test_a_cut_compressed_shard_keeps_every_member_before_the_cut(tmp_path, codec, cut):
    """A compressed shard cut short (its last bytes, or most of its last piece, lost): each
    member whose bytes came before the cut is read, and the cut is said. The decompressors'
    read(size) raised EOFError at the end and dropped what the same read had decompressed
    before it: a cut .tar.xz of six samples gave none."""
    noise = random.Random(0)  # incompressible: the cut falls where it is meant to
    plain = tar_bytes([(name, noise.randbytes(len(data))) for name, data in BIG])
    data = in_pieces(plain, COMPRESSORS[codec], size=len(plain) - 300_000)
    (tmp_path / "s.tar.x").write_bytes(data[:-cut])
    found = list(read_unit(Unit("tar", str(tmp_path / "s.tar.x"), "s"), 10**7))
    whole = [x.key for x in found if not isinstance(x, tuple) and not x.problems]
    reported = [p[1] for x in found for p in ([x] if isinstance(x, tuple) else x.problems)]
    # Cut 10 bytes: gzip and xz lose only their end checks, zstd its last 128 kB block (k9's
    # tail), bzip2 the last stream. Cut 300 kB: the first piece's end is lost too (k8's tail);
    # bzip2 hands on a 900 kB block only once it is whole, and its cut block holds k4..k8.
    assert whole == [f"k{i}" for i in range(len(whole))], whole
    assert len(whole) == {"gzip": (10, 8), "xz": (10, 8), "zstd": (9, 8), "bz2": (8, 4)}[codec][cut > 10], whole
    if len(whole) < 10:
        assert reported and set(reported) <= {"truncated_shard", "corrupt_shard"}, reported


def pzstd_like(data: bytes) -> bytes:
    """zstd frames each after a skippable frame (magic 0x184D2A50, little-endian), as pzstd writes."""
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"size"
    return in_pieces(data, lambda piece: skippable + COMPRESSORS["zstd"](piece))


def test_compressed_formats_are_told_by_their_whole_magic(tmp_path):
    """pzstd's shards begin with a skippable frame; an .lzma file (xz's older format) is read as
    tarfile reads it; a plain shard whose first member's name begins "BZh" is no bzip2 file (read
    as a stream here: file://)."""
    whole = [(f"k{i}", ["jpg", "txt"]) for i in range(10)]
    renamed = [("BZh" + name, data) for name, data in BIG]
    for name, data, keys in (("z.tar.zst", pzstd_like(tar_bytes(BIG)), whole),
                             ("a.tar.lzma", lzma.compress(tar_bytes(BIG), format=lzma.FORMAT_ALONE), whole),
                             ("b.tar", tar_bytes(renamed), [("BZh" + k, exts) for k, exts in whole])):
        (tmp_path / name).write_bytes(data)
        for uri in (str(tmp_path / name), (tmp_path / name).as_uri()):
            assert [x if isinstance(x, tuple) else (x.key, sorted(x.members))
                    for x in read_unit(Unit("tar", uri, "s"), 10**7)] == keys, uri


def test_a_gzip_whose_check_fails_at_its_end_is_reported(tmp_path):
    """gzip checks a member's CRC after its last byte, which for a .tar.gz comes after tar's end:
    a byte changed inside a member's data is reported there."""
    data = bytearray(gzip.compress(tar_bytes(BIG), compresslevel=0))  # stored: the byte reaches the member
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "s.tar.gz").write_bytes(bytes(data))
    found = list(read_unit(Unit("tar", str(tmp_path / "s.tar.gz"), "s"), 10**7))
    [(member, kind, message)] = [x for x in found if isinstance(x, tuple)]
    assert kind == "corrupt_shard" and "CRC check failed" in message and "damaged" in message
    assert [x.key for x in found[:-1]] == [f"k{i}" for i in range(10)]


def test_a_gzip_member_whose_header_is_damaged_is_reported_with_the_rest(tmp_path):
    """Past a damaged member header the rest of a gzip cannot be read; ending there is said (the
    tar stream ends inside a member), unlike junk after the last member."""
    plain = tar_bytes(BIG)
    pieces = [gzip.compress(plain[at:at + 150_000]) for at in range(0, len(plain), 150_000)]
    data = bytearray(b"".join(pieces))
    at = len(pieces[0]) + len(pieces[1])
    data[at:at + 2] = b"XX"
    (tmp_path / "s.tar.gz").write_bytes(bytes(data))
    found = list(read_unit(Unit("tar", str(tmp_path / "s.tar.gz"), "s"), 10**7))
    assert found[0].key == "k0" and not found[0].problems
    assert [p[1] for x in found[1:-1] for p in x.problems] == ["truncated_shard"] and found[-1][1] == "corrupt_shard"


def test_a_shard_on_s3_is_read_in_pieces_of_mbs_and_decompressed_by_its_bytes(tmp_path, s3_endpoint, monkeypatch):
    """On a real S3-compatible server on loopback (moto's, tests/s3_server.py): Arrow's S3 stream
    makes each read a ranged GET, and tarfile reads 64 KiB at a time (a 2 MB shard was 33 GETs, a
    50 MB one 761). The compression is told from the bytes: a plain shard named .tar.gz (which
    Arrow would decompress by its name) and a gzipped one named .tar are both read."""
    for name, value in AWS.items():
        monkeypatch.setenv(name, value)
    plain = tar_bytes(BIG)
    fs = s3_filesystem(s3_endpoint)
    for key, data in (("shards/p.tar", plain), ("shards/plain.tar.gz", plain),
                      ("shards/gz.tar", in_pieces(plain, gzip.compress)),
                      ("shards/z.tar.zst", in_pieces(plain, COMPRESSORS["zstd"]))):
        with fs.open_output_stream(f"ws-bucket/{key}", compression=None) as out:  # not by its name
            out.write(data)
        gets = get_requests(s3_endpoint, f"ws-bucket/{key}")
        uri = f"s3://ws-bucket/{key}?endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
        found = list(read_unit(Unit("tar", uri, "s"), 10**7))
        assert not [x for x in found if isinstance(x, tuple) or x.problems], key
        assert [x.key for x in found] == [f"k{i}" for i in range(10)], key
        assert get_requests(s3_endpoint, f"ws-bucket/{key}") - gets <= 3, key  # its first bytes, then 8 MiB pieces
