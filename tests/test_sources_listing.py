"""The driver's plan of a folder input: the units (ids, order, keys, files) of a folder are what
they were when it was listed whole, and the driver holds tens of bytes a file for them, not the
hundreds of a list of every file (a folder of millions of files is planned in the driver)."""

from __future__ import annotations

import gc
import hashlib
import os
import pickle
import tracemalloc

from udfs.ingest.sources import FileList, discover_units

# (kind, prefix, files in the folder) of varied_folder's units with folder_unit_size=2, as the
# listing of every file (os.walk, sorted) planned them: shards in os.walk's order, videos, then
# content-defined chunks of the sorted keys (a folder's keys sort among its parent's: a.b/z before a.k)
EXPECTED = [
    ("tar", "in/s", []),
    ("tar", "in/deep/s", []),
    ("folder", "in", ["clip.mp4", "clip.txt"]),
    ("folder", "in", ["late.webm"]),
    ("folder", "in", [".DS_Store"]),
    ("folder", "in", ["._a.png"]),
    ("folder", "in", [".png", "Z.png"]),
    ("folder", "in", ["\\xe9.png"]),
    ("folder", "in", ["a.jpg.json", "a.png", "a.txt", "a.zz"]),
    ("folder", "in", ["a-b.png"]),
    ("folder", "in", ["a-b/y.png"]),
    ("folder", "in", ["a.b/z.png", "a.b/z.tags", "a.k.png"]),
    ("folder", "in", ["a/x.png", "a/x.txt"]),
    ("folder", "in", ["a0.png", "deep/1.png"]),
    ("folder", "in", ["deep/1/2/3_abc.png", "deep/1/2/3_abc.txt", "deep/1/4.png", "deep_link", "name with space.png"]),
    ("folder", "in", ["noext"]),
    ("folder", "in", ["pipe.png"]),
    ("folder", "in", ["yande.re 123.jpg", "yande.re 123.jpg.json", "z/[2023] art {a,b}.png"]),
    ("folder", "in", ["z/~.png"]),
    ("folder", "in", ["é.png"]),
    ("folder", "in", ["\udce9.png"]),
]


def varied_folder(root) -> None:
    """Nested folders whose keys interleave with their parent's, sidecars, videos, shards, names
    with spaces, accents, dots, a literal `\\xe9` and an undecodable byte, OS files, a linked
    folder, a FIFO and an empty folder."""
    files = ["a.png", "a.txt", "a.jpg.json", "a-b.png", "a0.png", "a.k.png", "a.zz", "a/x.png", "a/x.txt",
             "a-b/y.png", "a.b/z.png", "a.b/z.tags", "clip.mp4", "clip.txt", "late.webm", "s.tar",
             "deep/1/2/3_abc.png", "deep/1/2/3_abc.txt", "deep/1/4.png", "deep/1.png", "deep/s.tar.gz",
             "name with space.png", "é.png", "\\xe9.png", "._a.png", ".DS_Store", "noext", ".png",
             "yande.re 123.jpg", "yande.re 123.jpg.json", "z/[2023] art {a,b}.png", "z/~.png", "Z.png"]
    for rel in files:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(rel.encode() * 3)
    with open(os.path.join(os.fsencode(root), b"\xe9.png"), "wb") as f:  # a name that is no UTF-8
        f.write(b"raw")
    os.makedirs(os.path.join(root, "empty"))
    os.symlink(os.path.join(root, "deep"), os.path.join(root, "deep_link"))  # a file, not walked
    os.mkfifo(os.path.join(root, "pipe.png"))


def test_the_units_of_a_varied_folder_are_the_ones_planned_before(tmp_path):
    """Unit ids are (prefix, kind, uri, stamp, first and last file): any change to a unit's files,
    their order or its stamp would have every existing workspace ingest its folders again."""
    root = str(tmp_path / "in")
    varied_folder(root)
    units = discover_units([root], 2)
    assert [(u.kind, u.prefix, [f[len(root) + 1:] for f in u.files]) for u in units] == EXPECTED
    for unit in units:
        if unit.kind == "tar":
            st = os.stat(unit.uri)
            assert unit.uri.startswith(root + "/") and unit.size == st.st_size
            assert unit.stamp == f"{st.st_size}-{st.st_mtime_ns}"  # a shard in a folder: its stat, unhashed
            continue
        assert unit.uri == root and unit.input == "in"
        stats = [(f[len(root) + 1:], os.lstat(f)) for f in unit.files]
        stamped = tuple((rel, f"{st.st_size}-{st.st_mtime_ns}") for rel, st in stats)
        assert unit.stamp == hashlib.sha1(repr(stamped).encode()).hexdigest()[:16]
        assert unit.size == sum(st.st_size for _, st in stats)


def test_a_units_files_read_as_a_list_of_paths():
    files = FileList("/in/", ["a.png", "a.txt", "b/c.png", "é.png"])
    paths = ["/in/a.png", "/in/a.txt", "/in/b/c.png", "/in/é.png"]
    assert files == paths and list(files) == paths and len(files) == 4
    assert (files[0], files[2], files[-1], files[-4]) == ("/in/a.png", "/in/b/c.png", "/in/é.png", "/in/a.png")
    assert files[:1] == ["/in/a.png"] and files[-1:] == ["/in/é.png"] and files[1:3] == paths[1:3]
    assert pickle.loads(pickle.dumps(files)) == paths  # what a Ray task is handed
    empty = FileList("/in/", [])
    assert empty == [] and len(empty) == 0 and empty[:1] == [] and list(empty) == []
    for index in (4, -5):
        try:
            files[index]
        except IndexError:
            continue
        raise AssertionError(f"files[{index}] gave no IndexError")


def test_the_driver_holds_tens_of_bytes_a_file_of_a_folder(tmp_path):
    """20,000 files as a booru dump lays them out (folders of folders, an image and its tags each):
    the units hold each file's name once, in one string per unit, and the folder is listed one
    folder at a time. It held ~125 bytes a file after the listing and ~570 at its peak (a
    million files: 0.6 GB), a list of every file's path, name, size and stamp."""
    root = tmp_path / "danbooru"
    for a in range(4):
        for b in range(5):
            folder = root / f"{a:02d}" / f"{b:04d}"
            folder.mkdir(parents=True)
            for i in range(500):
                for ext in ("png", "txt"):
                    (folder / f"{a * 10000 + b * 1000 + i}_{i * 7919 % 100003:016x}.{ext}").touch()
    gc.collect()
    tracemalloc.start()
    try:
        units = discover_units([str(root)], 1000)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(len(u.files) for u in units) == 20000
    assert held / 20000 < 100, f"{held / 20000:.0f} bytes a file held"
    assert peak / 20000 < 150, f"{peak / 20000:.0f} bytes a file at the peak"


# (kind, prefix, files in the folder) of object_folder's units with folder_unit_size=2, as the
# listing planned them when it was sorted whole in Python (FileInfos by path, then a dict by key)
EXPECTED_OBJECTS = [
    ("tar", "in/deep/s", []),
    ("tar", "in/s", []),
    ("folder", "in", ["clip.mp4", "clip.txt"]),
    ("folder", "in", ["late.webm"]),
    ("folder", "in", [".DS_Store"]),
    ("folder", "in", ["._a.png"]),
    ("folder", "in", [".png", "Z.png"]),
    ("folder", "in", ["\\xe9.png"]),
    ("folder", "in", ["a.jpg.json", "a.png", "a.png.txt", "a.txt", "a.zz"]),
    ("folder", "in", ["a b.png"]),
    ("folder", "in", ["a!.png", "a-b.png"]),
    ("folder", "in", ["a-b/y.png"]),
    ("folder", "in", ["a.b/z.png", "a.b/z.tags", "a.k.png"]),
    ("folder", "in", ["a/x.png", "a/x.txt"]),
    ("folder", "in", ["a0.png", "deep/1.png"]),
    ("folder", "in", ["deep/1/2/3_abc.png", "deep/1/2/3_abc.txt", "deep/1/4.png", "name with space.png"]),
    ("folder", "in", ["noext"]),
    ("folder", "in", ["yande.re 123.jpg", "yande.re 123.jpg.json", "z/[2023] art {a,b}.png"]),
    ("folder", "in", ["z/~.png"]),
    ("folder", "in", ["é.png"]),
    ("folder", "in", ["ü/ä.png"]),
]


def object_folder(root) -> None:
    """varied_folder's files as object storage has them (UTF-8 names, no links or FIFOs), and
    keys that sort before a key they begin with (`a b`, `a!` before `a`, whose files follow
    theirs in path order)."""
    files = ["a.png", "a.txt", "a.jpg.json", "a.png.txt", "a-b.png", "a0.png", "a.k.png", "a.zz", "a/x.png",
             "a/x.txt", "a-b/y.png", "a.b/z.png", "a.b/z.tags", "clip.mp4", "clip.txt", "late.webm", "s.tar",
             "deep/1/2/3_abc.png", "deep/1/2/3_abc.txt", "deep/1/4.png", "deep/1.png", "deep/s.tar.gz",
             "name with space.png", "é.png", "\\xe9.png", "._a.png", ".DS_Store", "noext", ".png", "a b.png",
             "a!.png", "ü/ä.png", "yande.re 123.jpg", "yande.re 123.jpg.json", "z/[2023] art {a,b}.png", "z/~.png",
             "Z.png"]
    for rel in files:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(rel.encode() * 3)


def test_the_units_of_a_folder_on_object_storage_are_the_ones_planned_before(tmp_path):
    """file:// stands in for object storage (the same listing code as s3://). Any change to a
    unit's files, their order or its stamp would have every workspace ingest it again."""
    root = str(tmp_path / "in")
    object_folder(root)
    units = discover_units([f"file://{root}"], 2)
    head = f"file://{root}/"
    assert [(u.kind, u.prefix, [f[len(head):] for f in u.files]) for u in units] == EXPECTED_OBJECTS
    for unit in units:
        if unit.kind == "tar":
            st = os.stat(unit.uri[len("file://"):])
            assert unit.stamp == hashlib.sha1(repr((st.st_size, st.st_mtime_ns)).encode()).hexdigest()[:16]
            continue
        assert unit.uri == head and unit.input == "in"
        stats = [(f[len(head):], os.stat(os.path.join(root, f[len(head):]))) for f in unit.files]
        stamped = tuple((rel, f"{st.st_size}-{st.st_mtime_ns}") for rel, st in stats)
        assert unit.stamp == hashlib.sha1(repr(stamped).encode()).hexdigest()[:16]
        assert unit.size == sum(st.st_size for _, st in stats)


def test_the_driver_lists_a_folder_on_object_storage_in_about_the_listings_own_memory(tmp_path):
    """40,000 images and their tags under one prefix (file:// for s3://, whose listing pyarrow
    gives whole): the FileInfos are taken apart into Arrow columns as they are read. The driver's
    Python objects peaked at 322 bytes a file here (the FileInfos sorted, tuples, a dict by key;
    420 at 100,000 files) and its memory at ~1 KB a file: 10 GB for an input of ten million
    objects. Now about the FileInfo list itself (110 bytes a file in Python objects)."""
    root = tmp_path / "flat"
    root.mkdir()
    for i in range(20000):
        for ext in ("png", "txt"):
            (root / f"{i * 7919 % 100003:08d}_{i:016x}.{ext}").touch()
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "a.png").touch()
    discover_units([f"file://{tmp_path / 'one'}"], 1000)  # imports and first uses outside the measure
    gc.collect()
    tracemalloc.start()
    try:
        units = discover_units([f"file://{root}"], 1000)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(len(u.files) for u in units) == 40000
    assert peak / 40000 < 200, f"{peak / 40000:.0f} bytes a file at the peak"
