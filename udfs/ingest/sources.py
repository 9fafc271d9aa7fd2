"""Input units (a WebDataset shard, or a chunk of a plain folder) and the samples in them.

A sample is the WebDataset notion: the members that share a key (`dir/name` up to the first
dot of the file name), e.g. `a.jpg` + `a.txt` + `a.json`.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import os
import re
import stat
import tarfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import pyarrow as pa
import pyarrow.fs as pafs
from braceexpand import braceexpand

from store.uris import filesystem_of, store_failure
from udfs.ingest.shard_tar import READ_ERRORS, how_it_ended, open_tar, problems_before

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif", "jxl")
SIDECAR_EXTENSIONS = ("txt", "tags", "json", "caption")
# Clips read by PyAV (udfs/ingest/clip_frames.py). Animated GIF/APNG/WebP are images until ingest
# sees more than one frame in them.
VIDEO_EXTENSIONS = ("mp4", "m4v", "mov", "webm", "mkv", "avi", "mpg", "mpeg", "ts", "flv", "wmv", "ogv")
READ_EXTENSIONS = frozenset(IMAGE_EXTENSIONS + SIDECAR_EXTENSIONS + VIDEO_EXTENSIONS)


class FileList(Sequence[str]):
    """A folder unit's files (paths or URIs) held as their common head and one string of their
    names in the folder, NUL between them (no file or object name holds one). The driver plans
    every unit of a folder of millions of files before the first task: a list of Python strings
    cost ~100 bytes a file there, this ~1 byte more than the name."""

    def __init__(self, head: str, names: Iterable[str]) -> None:
        self.head = head
        names = list(names)
        self.count = len(names)
        self.names = "\0".join(names)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[str]:
        return (self.head + name for name in (self.names.split("\0") if self.count else ()))

    def __getitem__(self, index):  # noqa: ANN001, ANN204 - an int or a slice, as a list's
        if isinstance(index, slice):
            return [self[i] for i in range(self.count)[index]]
        i = range(self.count)[index]  # IndexError as a list's
        if i == 0:  # unit_key asks for the first and last files of every unit: no split for them
            return self.head + self.names.partition("\0")[0]
        if i == self.count - 1:
            return self.head + self.names.rpartition("\0")[2]
        return self.head + self.names.split("\0")[i]

    def __eq__(self, other: object) -> bool:
        return list(self) == list(other) if isinstance(other, (FileList, list, tuple)) else NotImplemented

    __hash__ = None  # as a list's

    def __repr__(self) -> str:
        return f"FileList({list(self)!r})"


@dataclass
class Unit:
    """One unit of work: committed whole, skipped whole on a rerun."""

    kind: str  # "tar" or "folder"
    uri: str  # the shard, or the folder
    prefix: str  # key prefix: the input id, then the shard's path inside the input
    files: Sequence[str] = field(default_factory=list)  # for folders: the files of this chunk (a FileList)
    input: str = ""  # the input id (units of an input ingested again replace its old units)
    stamp: str = ""  # what the unit's content was (sizes and times): a changed unit is redone
    size: int = 0  # bytes of its files, as listed: the job starts the largest units first


@dataclass
class Sample:
    key: str  # key inside the unit (without the unit prefix)
    members: dict[str, bytes]  # extension -> bytes
    member_names: dict[str, str]  # extension -> member name
    # extension -> file path, for the videos of a plain folder: decoded from the file as a
    # stream, never read whole (an episode is gigabytes); their `members` entry is b""
    paths: dict[str, str] = field(default_factory=dict)
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (member, kind, msg)
    # extension -> where the member's header starts in its shard (a shard's members only): later
    # jobs seek there instead of walking every header (udfs/source_members.py)
    offsets: dict[str, int] = field(default_factory=dict)


def safe_text(name: str) -> str:
    """Names from tar headers and folders can hold undecodable bytes; keep them visible, not lost:
    each such byte is written `\\xNN`. A backslash that the name itself has before `xNN` is
    written `\\x5c`, so that a file literally named `\\xe9.png` and one whose name is the byte
    0xE9 get two keys (they had one, and the second image was lost); every other name, a backslash
    elsewhere included, is as it was."""
    name = re.sub(r"\\(?=x[0-9a-f]{2})", r"\\x5c", name)
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def source_kind(source: str) -> str:
    """"folder" or "tar": how ingest read the images of `source` (images.source). Folder units
    come from local directories and, on object storage, have a URI whose path ends with "/"
    (_object_units); every other input is read as a shard, whatever its name (.tar, .tar.gz, an
    object on storage). Not from the name's ending: a `.tar.gz` shard taken for a folder had
    every image missing in export."""
    if "://" in source:
        return "folder" if input_location(source).endswith("/") else "tar"
    return "folder" if os.path.isdir(source) else "tar"


def folder_member(folder: str, file: str) -> str:
    """The member name (images.member) of a file of a folder unit: its path in the folder. On
    object storage a unit's files are the folder's URI (without its query) and the name."""
    if "://" in folder:  # names on object storage are UTF-8: only a backslash before xNN is escaped
        return safe_text(file[len(input_location(folder)):])
    return safe_text(os.path.relpath(file, folder))


def member_path(folder: str, member: str) -> str:
    """The file of a folder's member as the tables name it: safe_text's form writes a name's
    undecodable bytes (and a backslash before `xNN`) as `\\xNN`, so those bytes are put back; where
    no file has the name they give, the name as written (a member stored by a version that did
    not escape such a backslash). On object storage, the object's URI without the folder's query
    (read with the folder's), with an escaped backslash put back."""
    if "://" in folder:
        return input_location(folder) + member.replace("\\x5c", "\\")
    path = os.path.join(folder, member)
    if "\\x" not in member:
        return path
    raw = re.sub(rb"\\x([0-9a-f]{2})", lambda m: bytes([int(m.group(1), 16)]), member.encode("utf-8"))
    decoded = os.path.join(folder, os.fsdecode(raw))
    return decoded if os.path.lexists(decoded) or not os.path.lexists(path) else path


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key ends at the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


def split_folder_name(name: str) -> tuple[str, str]:
    """A folder file's (key, extension). The key ends at the last dot: `yande.re 123.jpg` is one
    image (the first-dot rule is WebDataset's, for shards). A sidecar named after its image's
    whole name (`a.jpg.json`, as gallery-dl writes them) has the image's key."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.rpartition(".")
    if not stem:  # no dot, or a dot-file such as `.png`: a name without an extension
        stem, ext = base, ""
    inner, inner_dot, inner_ext = stem.rpartition(".")
    if ext.lower() in SIDECAR_EXTENSIONS and inner and inner_ext.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS:
        stem = inner
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def member_key(name: str, kind: str) -> str:
    """The sample key of a member of a unit of `kind` ("tar" or "folder"). A shard's member whose
    name starts with a dot has no key by WebDataset's rule (`dir/._a.png` would be `dir/`): its
    errors row takes the folder rule's (`dir/._a`)."""
    if kind == "tar" and not split_key(name)[0].rpartition("/")[2]:
        return split_folder_name(name)[0]
    return (split_key if kind == "tar" else split_folder_name)(name)[0]


# Files an operating system leaves beside the user's: macOS's AppleDouble `._NAME` (in every tar
# made on a Mac, on every copy to a disk that is not a Mac's) and `.DS_Store`, a macOS zip's
# `__MACOSX/` folder, Windows' `Thumbs.db` and `desktop.ini`. No sample: ignored, and named.
OS_FILES = {".ds_store": "macOS folder settings", "thumbs.db": "Windows thumbnail cache",
            "ehthumbs.db": "Windows thumbnail cache", "desktop.ini": "Windows folder settings"}


def os_file(name: str) -> tuple[str, str] | None:
    """The ignored_member problem of a member or folder entry (a path in its unit) that an
    operating system left, else None."""
    parts = name.split("/")
    if parts[-1].startswith("._") or "__MACOSX" in parts[:-1]:
        what = "a macOS AppleDouble file (resource fork and attributes)"
    elif parts[-1].lower() in OS_FILES:
        what = f"a {OS_FILES[parts[-1].lower()]} file"
    else:
        return None
    return "ignored_member", f"{what}: no sample, not read"


# ---- discovering units --------------------------------------------------------------------
def resolve_inputs(specs: list[str]) -> list[str]:
    """The concrete inputs of the specs (globs and braces expanded, unless a spec names a path
    that is there): absolute paths or URIs."""
    paths: list[str] = []
    for spec in specs:
        if "://" in spec:
            fs, path = filesystem_of(spec)
            if fs.get_file_info(path).type == pafs.FileType.NotFound:
                raise FileNotFoundError(f"input not found: {spec}")
            paths.append(without_trailing_slash(spec))
            continue
        if os.path.exists(spec):  # `[2023] art`, `art {a,b}`: a name that is there is no pattern
            paths.append(str(Path(spec).resolve()))
            continue
        found = [p for part in braceexpand(spec) for p in sorted(globlib.glob(part))]
        if not found or not all(os.path.exists(p) for p in found):
            raise FileNotFoundError(f"input not found: {spec}")
        paths += [str(Path(p).resolve()) for p in found]
    return list(dict.fromkeys(paths))


def without_trailing_slash(uri: str) -> str:
    """`uri` without "/" at the end of its path (its query kept): `s3://b/in/` and `s3://b/in` are
    one folder, as a local path is resolved, and must be one input with one id and the same keys."""
    location = input_location(uri)
    trimmed = location.rstrip("/")
    if not trimmed.split("://", 1)[1]:  # a root (`file:///`): nothing to trim
        return uri
    return trimmed + uri[len(location):]


def assign_input_ids(paths: list[str], registered: dict[str, str]) -> dict[str, str]:
    """Input ids, unique in the workspace and stable, by input_location: the one `registered` for
    it, else the input's name (a shard's without .tar), else the name and a hash of the full
    location when another input has the name already. The caller stores the result as the new
    registry. ValueError for two inputs at one location with different URI options."""
    by_location = {input_location(p): p for p in paths}
    if len(by_location) < len(paths):  # they would share one id, and so their keys
        twice = next(p for p in paths if by_location[input_location(p)] != p)
        other = by_location[input_location(twice)]
        raise ValueError(f"two inputs at one place, with different options: {twice} and {other}")
    ids = dict(registered)
    taken = set(ids.values())
    for path, given in by_location.items():
        if path in ids:
            continue
        if given in ids:  # registered with its query by an earlier version: its keys stay
            ids[path] = ids[given]
            continue
        if "://" in path and path + "/" in ids:  # registered with a trailing "/" by an earlier version
            ids[path] = ids[path + "/"]
            continue
        name = re.sub(r"[^\w.@+-]+", "_", re.sub(r"\.tar$", "", path.rstrip("/").rsplit("/", 1)[-1])) or "input"
        if name in taken:
            name = f"{name}-{hashlib.sha1(path.encode('utf-8', 'surrogateescape')).hexdigest()[:8]}"
        ids[path] = name
        taken.add(name)
    return ids


def input_location(path: str) -> str:
    """Where an input is, the key of its id: a URI without its query, which holds how to reach
    the store (endpoint_override, scheme, region), not what is in it. A new endpoint for the
    same bucket keeps the input's id, and the query never becomes part of a key."""
    return path.split("?", 1)[0] if "://" in path else path


def discover_units(inputs: list[str], folder_unit_size: int, ids: dict[str, str] | None = None,
                   listed: Callable[[int], None] = lambda files: None) -> list[Unit]:
    """Every unit of every input, in a stable order; keys start with the input's id in `ids`.
    `listed(n)` is told of each n files looked at (a folder of a million files takes minutes)."""
    paths = resolve_inputs(inputs)
    ids = ids if ids is not None else assign_input_ids(paths, {})
    units: list[Unit] = []
    for path in paths:
        units.extend(_units_of(path, ids[input_location(path)], folder_unit_size, listed))
    return units


def _units_of(path: str, input_id: str, folder_unit_size: int, listed: Callable[[int], None]) -> list[Unit]:
    if "://" in path:
        return _object_units(path, input_id, folder_unit_size, listed)
    if os.path.isdir(path):
        return _dir_units(Path(path), input_id, folder_unit_size, listed)
    st = os.stat(path)
    listed(1)
    return [_tar_unit(path, input_id, "", _stamp(st.st_size, st.st_mtime_ns), st.st_size)]


def _object_units(uri: str, input_id: str, folder_unit_size: int, listed: Callable[[int], None]) -> list[Unit]:
    """The units of an input on object storage: a shard, or a folder's shards and its loose files
    in folder units, as a local folder's (_dir_units). Each shard's URI keeps the input's query
    (the endpoint and options it is read with); a folder unit's URI is the folder's with a
    trailing "/" (how source_kind tells it from a shard), its files URIs without the query."""
    fs, local = filesystem_of(uri)
    info = fs.get_file_info(local)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"input not found: {uri}")
    scheme, query = uri.split("://", 1)[0], uri[len(input_location(uri)):]
    if info.type != pafs.FileType.Directory:  # a shard, never with a "/" after it: that says folder
        shard = f"{input_location(uri).rstrip('/')}{query}"
        return [_tar_unit(shard, input_id, "", _stamp(info.size, info.mtime_ns), info.size)]
    top = local.rstrip("/")
    listing = ObjectListing(fs.get_file_info(pafs.FileSelector(top, recursive=True)), len(top) + 1)
    listed(listing.files)
    folder = f"{scheme}://{uri_path(top)}/"
    check_key_prefixes([rel for rel, _, _ in listing.shards], listing.firsts, folder)
    units = [_tar_unit(f"{folder}{uri_path(rel)}{query}", input_id, rel, _stamp(size, mtime), size)
             for rel, size, mtime in listing.shards]
    return units + _folder_units(f"{folder}{query}", folder, input_id, listing.groups(), folder_unit_size)


class ObjectListing:
    """The files of a recursive listing of a folder on object storage, as _folder_units wants
    them: shards (path in the folder, bytes, mtime) in path order, and the other files grouped by
    key in key order. pyarrow lists a folder whole (no pages); its FileInfo list, ~240 bytes a
    file, is taken apart as it is read (freed file by file) into Arrow columns of ~100 bytes a
    file, and the groups come from them in sorted slices: an input of ten million objects had
    the driver at ~1 KB a file (FileInfos, sorted, as tuples, then in a dict by key)."""

    SLICE = 1 << 12  # files turned from FileInfos into Arrow columns, and back into groups, at a time

    def __init__(self, infos: list[pafs.FileInfo], skip: int) -> None:
        self.shards: list[tuple[str, int, int]] = []
        folders: dict[str, str] = {}  # folder -> its first loose file (check_key_prefixes)
        columns, parts = {"key": [], "rel": [], "size": [], "mtime": []}, []
        self.files = 0
        while infos:  # from the end: each FileInfo freed as it is read
            info = infos.pop()
            if info.type != pafs.FileType.File:
                continue
            self.files += 1
            rel = info.path[skip:]
            if SHARD_NAME.search(rel):
                self.shards.append((rel, info.size, info.mtime_ns))
                continue
            folder = rel.rpartition("/")[0]
            if folder not in folders or rel < folders[folder]:
                folders[folder] = rel
            for name, value in zip(columns, (split_folder_name(rel)[0], rel, info.size, info.mtime_ns), strict=True):
                columns[name].append(value)
            if len(columns["rel"]) == self.SLICE:
                parts.append(pa.table(columns, schema=LOOSE_SCHEMA))
                columns = {name: [] for name in columns}
        parts.append(pa.table(columns, schema=LOOSE_SCHEMA))
        self.shards.sort()
        self.firsts = sorted(folders.values())
        self.loose = pa.concat_tables(parts).combine_chunks()

    def groups(self) -> Iterator[tuple[str, list[tuple[str, int, str]]]]:
        """(key, its files as (path in the folder, bytes, stamp)), in key order (a sample's files
        stay in one chunk), each key's files in path order. Arrow sorts strings by their UTF-8
        bytes: the order of Python's str comparison (code points) for the names object storage has."""
        import pyarrow.compute as pc  # the driver's listing only: not with every ingest worker's start

        order = pc.sort_indices(self.loose, [("key", "ascending"), ("rel", "ascending")])
        key, group = None, []
        for start in range(0, len(order), self.SLICE):
            part = self.loose.take(order[start:start + self.SLICE]).to_pydict()
            for name, rel, size, mtime in zip(part["key"], part["rel"], part["size"], part["mtime"], strict=True):
                if name != key:
                    if group:
                        yield key, group
                    key, group = name, []
                group.append((rel, size, f"{size}-{mtime}"))
        if group:
            yield key, group


# large_string: more than 2 GB of names in one column (tens of millions of objects) is an input, not an error
LOOSE_SCHEMA = pa.schema([("key", pa.large_string()), ("rel", pa.large_string()), ("size", pa.int64()),
                          ("mtime", pa.int64())])


def uri_path(path: str) -> str:
    """A listed path as a URI's path: what the URI syntax does not allow (a space, "#", "?", "%",
    letters beyond ASCII) percent-encoded, as pyarrow's from_uri decodes it."""
    return quote(path, safe="/!$&'()*+,;=:@~")


def _stamp(*values: object) -> str:
    return hashlib.sha1(repr(values).encode()).hexdigest()[:16]


# Shards in a folder of inputs: plain or compressed tars (read_unit reads them as a stream,
# decompressed as their first bytes say). A compressed shard named as one input is read the same way.
SHARD_NAME = re.compile(r"\.(tar|tar\.gz|tgz|tar\.bz2|tar\.xz|tar\.zst|tzst)$")


def check_key_prefixes(shards: list[str], loose: list[str], folder: str) -> None:
    """ValueError where the shards and loose files of a folder (paths in it) would give keys
    under one prefix, which then would not say where an image is: a shard's keys are its path
    without .tar (.tar.gz, ...) then its members' names, so `s.tar` and `s.tar.gz`, or `s.tar`
    and the folder `s/` it was unpacked to, give the same keys (two rows under one key, every
    later join doubled). Told from the listing, before anything is read."""
    by_prefix: dict[str, str] = {}
    for rel in shards:
        inner = SHARD_NAME.sub("", rel)
        if inner in by_prefix:
            raise ValueError(_shared_prefix(by_prefix[inner], rel, inner, folder))
        by_prefix[inner] = rel
    if not by_prefix:
        return
    for inside, rel in [*by_prefix.items(), *((rel, rel) for rel in loose)]:
        parts = inside.split("/")[:-1]  # the folders it is in, each a prefix of its keys
        for depth in range(1, len(parts) + 1):
            inner = "/".join(parts[:depth])
            if inner in by_prefix:
                raise ValueError(_shared_prefix(by_prefix[inner], rel, inner, folder))


def _shared_prefix(shard: str, other: str, inner: str, folder: str) -> str:
    return (f"{shard} and {other} in {folder} would both give keys that begin {inner}/ (a shard's keys are its "
            "path without .tar, .tar.gz, ... then its members' names): keep one of them, or move one to a "
            "folder of its own")


def _tar_unit(uri: str, input_id: str, rel: str, stamp: str, size: int) -> Unit:
    """A shard: keys are `<input id>/<shard path in the input, without .tar>/<member key>`."""
    inner = SHARD_NAME.sub("", rel)
    return Unit("tar", uri, f"{input_id}/{inner}" if inner else input_id, input=input_id, stamp=stamp, size=size)


def _dir_units(root: Path, input_id: str, folder_unit_size: int, listed: Callable[[int], None]) -> list[Unit]:
    """Shards inside a directory are shard units; loose files form folder units.

    Every entry is listed, whatever it is (links, FIFOs, devices: read_unit reports those without
    opening them). Folder units are content-defined chunks of the sorted sample keys, so adding or
    removing a file changes only the unit it falls in; keys never depend on the chunks.

    The folder is walked in the order of its keys (_keyed_files), each unit made as its last key
    is listed: the driver holds the units (~50 bytes a file) and one folder's listing, not a list
    of every file (~570 bytes a file at the peak: a million files, 0.6 GB).
    """
    top = str(root)
    tars: list[str] = []  # paths relative to root
    firsts: list[str] = []  # the first loose file of each folder that has one: enough for check_key_prefixes
    groups = _keyed_files(top, "", tars, firsts, listed)
    units = _folder_units(top, top if top.endswith(os.sep) else top + os.sep, input_id, groups, folder_unit_size)
    # shards and firsts in os.walk's order, as they were listed before (the first clash is the one named)
    tars.sort(key=_walk_order)
    firsts.sort(key=_walk_order)
    check_key_prefixes(tars, firsts, top)
    shards = []
    for rel in tars:
        size, stamp = _file_stat(os.path.join(top, rel), listed)
        shards.append(_tar_unit(os.path.join(top, rel), input_id, rel, stamp, size))
    return shards + units


def _keyed_files(top: str, inner: str, tars: list[str], firsts: list[str], listed: Callable[[int], None]
                 ) -> Iterator[tuple[str, list[tuple[str, int, str]]]]:
    """(key, its files as (path in top, bytes, stamp)) of each sample of the folder `inner` of
    `top` and of the folders in it, in the order of the keys: a folder's keys all begin with
    `<its path>/`, so its keys sort together where that string sorts among its parent's keys.
    Shards (paths in top) are added to `tars`, each folder's first loose file to `firsts`.
    Links to folders are files, never walked; a folder that cannot be listed is passed over (as
    os.walk did)."""
    here = os.path.join(top, inner) if inner else top
    names, folders = [], []  # names only, no DirEntry kept: a folder may hold a million files
    try:
        with os.scandir(here) as listing:
            for entry in listing:
                (folders if _walked_into(entry) else names).append(entry.name)
    except OSError:
        return
    prefix = inner + "/" if inner else ""
    by_stem: dict[str, list[str]] = {}  # a key in this folder without the folder's path
    for name in sorted(names):
        full = os.path.join(here, name)
        if SHARD_NAME.search(name) and os.path.isfile(full) and not os.path.islink(full):
            tars.append(prefix + name)
        else:
            by_stem.setdefault(split_folder_name(name)[0], []).append(name)
    del names
    if by_stem:
        firsts.append(prefix + min(name for group in by_stem.values() for name in group))
    for stem in sorted([*by_stem, *(f"{name}/" for name in folders)]):  # a key never ends with "/"
        if stem.endswith("/"):  # a folder: its keys are here in the order
            yield from _keyed_files(top, prefix + stem[:-1], tars, firsts, listed)
            continue
        group = []
        for name in by_stem.pop(stem):
            group.append((prefix + name, *_file_stat(os.path.join(here, name), listed)))
        yield prefix + stem, group


def _walked_into(entry: os.DirEntry) -> bool:
    """Whether os.walk's listing would go into a folder entry: a folder, not a link to one."""
    try:
        return entry.is_dir() and not entry.is_symlink()
    except OSError:
        return False


def _walk_order(rel: str) -> list[tuple[int, str]]:
    """Where os.walk with sorted names lists a file (a path in the folder): a folder's files before
    the folders in it."""
    parts = rel.split("/")
    return [(1, part) for part in parts[:-1]] + [(0, parts[-1])]


def _folder_units(top: str, head: str, input_id: str, groups: Iterable[tuple[str, list[tuple[str, int, str]]]],
                  folder_unit_size: int) -> list[Unit]:
    """Folder units of a folder's samples, `groups` of (key, its files as (path in the folder,
    bytes, stamp)) in key order: content-defined chunks of the keys (_cuts_after), cut after 4 x
    the target keys at most (bounded memory), made as the keys come; a video a unit of its own (a
    kill mid-episode redoes only it), the videos' units first. A unit's files are `head` + their
    paths."""
    target = max(folder_unit_size, 1)
    clips, units, chunk, keys = [], [], [], 0
    for key, group in groups:
        if any(_is_video(rel) for rel, _, _ in group):
            clips.append(_folder_unit(top, head, input_id, group))
            continue
        chunk += group
        keys += 1
        if _cuts_after(key, target) or keys >= 4 * target:
            units.append(_folder_unit(top, head, input_id, chunk))
            chunk, keys = [], 0
    if chunk:
        units.append(_folder_unit(top, head, input_id, chunk))
    return clips + units


def _folder_unit(top: str, head: str, input_id: str, files: list[tuple[str, int, str]]) -> Unit:
    return Unit("folder", top, input_id, FileList(head, (rel for rel, _, _ in files)), input=input_id,
                stamp=_stamp(*[(rel, stamp) for rel, _, stamp in files]), size=sum(size for _, size, _ in files))


def _is_video(path: str) -> bool:
    return split_folder_name(os.path.basename(path))[1] in VIDEO_EXTENSIONS


def _file_stat(path: str, listed: Callable[[int], None]) -> tuple[int, str]:
    """(bytes, stamp) of a listed file; one gone since the listing: 0 bytes, stamp "gone"."""
    listed(1)
    try:
        st = os.lstat(path)
    except OSError:
        return 0, "gone"
    return st.st_size, f"{st.st_size}-{st.st_mtime_ns}"


def _cuts_after(key: str, target: int) -> bool:
    """Whether a folder unit ends after `key`: 1 key in `target` by its hash. A boundary depends
    only on the key before it, so a key added or removed moves no boundary elsewhere
    (content-defined chunking, as in rsync)."""
    return int.from_bytes(hashlib.sha1(key.encode("utf-8", "surrogateescape")).digest()[:8], "big") % target == 0


# ---- reading samples ----------------------------------------------------------------------
def read_unit(unit: Unit, max_member_bytes: int, links_leave_input: bool = True
              ) -> Iterator[Sample | tuple[str, str, str]]:
    """Samples of a unit; problems of members that are no sample (a directory entry, a device, a
    link out of the input) come out as (member, kind, message) tuples.

    links_leave_input: follow a folder's symbolic links whose target is outside the input folder.
    Ingest passes its option (off by default); later jobs re-read only members ingest accepted.
    """
    if unit.kind == "tar":
        yield from _read_tar(unit.uri, max_member_bytes)
    else:
        yield from _read_folder(unit, max_member_bytes, links_leave_input)


def _read_tar(uri: str, max_member_bytes: int) -> Iterator[Sample | tuple[str, str, str]]:
    """A shard's samples, member by member in shard order, read past damaged member headers
    (udfs/ingest/shard_tar.py), with a problem item for each damaged stretch and for a shard that
    ended badly.

    Written on tarfile rather than webdataset's tar iterator because that one reads every
    member whole before the caller sees it: we must refuse huge members before reading them,
    and account for every member of a truncated or corrupt shard.
    """
    current: Sample | None = None
    seen: set[str] = set()
    try:
        with open_tar(uri) as tar:
            for info in tar:
                name = safe_text(info.name)
                problems, skip = problems_before(tar, info)
                if problems and current is not None and not skip and split_key(name)[0] != current.key:
                    yield current  # the sample before the damage, then the damage
                    current = None
                yield from problems
                if skip:
                    continue
                if left := os_file(name):
                    yield (name, *left)
                    continue
                if not info.isfile():
                    yield (name, "not_a_regular_file", f"tar member is a {TAR_TYPES.get(info.type, 'special file')}")
                    continue
                key, ext = split_key(name)
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = Sample(key, {}, {})
                    if key in seen:  # WebDataset samples are contiguous: a later repeat is a second sample
                        current.problems.append((name, "duplicate_key", f"key {key!r} seen earlier in the shard"))
                    seen.add(key)
                _add_member(current, ext, name, info.size, max_member_bytes, lambda i=info: tar.extractfile(i).read())
                if current.member_names.get(ext) == name and ext not in current.offsets:
                    current.offsets[ext] = info.offset  # the first of a repeated name: the one ingest read
            ended = how_it_ended(tar)
        if ended:
            if current is not None:
                yield current
                current = None
            yield ended
    except READ_ERRORS as exc:
        if failed := store_failure(exc, uri):  # the store, not the shard: the unit fails, uncommitted
            raise failed from None  # its message holds exc's: the one line says what to do
        if current is not None:
            current.problems.append(("", "truncated_shard", f"shard ended early: {exc}"))
            yield current
            current = None
        yield ("", "corrupt_shard", f"{type(exc).__name__}: {exc}")
    if current is not None:
        yield current


def _add_member(sample: Sample, ext: str, name: str, size: int, limit: int, read) -> None:
    if ext in sample.members:
        sample.problems.append((name, "duplicate_member", f"second member with extension {ext!r}"))
        return
    if size > limit:
        sample.problems.append((name, "too_large", f"{size} bytes > max_member_bytes {limit}"))
        return
    # a member of another kind (a .npy latent, a .psd) is named, not read: ingest reports it as ignored
    sample.members[ext] = read() if ext in READ_EXTENSIONS else b""
    sample.member_names[ext] = name


def _read_folder(unit: Unit, max_member_bytes: int, links_leave_input: bool
                 ) -> Iterator[Sample | tuple[str, str, str]]:
    """A folder chunk's samples: its files grouped by key first (names only), then each sample's
    bytes read as it is yielded, so that only one sample's bytes are in memory at a time."""
    if "://" in unit.uri:
        yield from _read_object_folder(unit, max_member_bytes)
        return
    root = unit.uri
    entries: dict[str, list[tuple[str, str, OSError | None]]] = {}  # key -> (name, path, lstat error)
    for full in unit.files:
        rel = folder_member(root, full)
        if left := os_file(rel):
            yield (rel, *left)
            continue
        try:
            refusal = _refusal(full, root, links_leave_input)
        except OSError as exc:
            refusal, error = None, exc
        else:
            error = None
        if refusal:
            yield (rel, *refusal)
            continue
        entries.setdefault(split_folder_name(rel)[0], []).append((rel, full, error))
    for key, files in entries.items():
        yield _folder_sample(key, files, max_member_bytes)


def _folder_sample(key: str, files: list[tuple[str, str, OSError | None]], max_member_bytes: int) -> Sample:
    sample = Sample(key, {}, {})
    for rel, full, error in files:
        ext = split_folder_name(rel)[1]
        try:
            if error is not None:
                raise error
            if ext in VIDEO_EXTENSIONS and ext not in sample.members:
                sample.members[ext], sample.member_names[ext], sample.paths[ext] = b"", rel, full
                continue
            _add_member(sample, ext, rel, os.path.getsize(full), max_member_bytes, lambda f=full: Path(f).read_bytes())
        except OSError as exc:
            sample.problems.append((rel, "unreadable", f"{type(exc).__name__}: {exc}"))
    return sample


# Samples of a folder on object storage fetched ahead of the one being read: each object is a GET
# of its own (tens of ms, where probing an image takes a few), so several are under way at once.
OBJECT_SAMPLES_AHEAD = 8


def _read_object_folder(unit: Unit, max_member_bytes: int) -> Iterator[Sample | tuple[str, str, str]]:
    """A folder chunk's samples on object storage, in key order, up to OBJECT_SAMPLES_AHEAD of
    them fetched at once (so up to that many samples' bytes in memory, plus the one read). No
    links, FIFOs or devices there: every listed object is a file."""
    fs, top = pafs.FileSystem.from_uri(unit.uri)
    entries: dict[str, list[tuple[str, str]]] = {}  # key -> (name in the folder, path in the store)
    for full in unit.files:
        rel = folder_member(unit.uri, full)
        if left := os_file(rel):
            yield (rel, *left)
            continue
        entries.setdefault(split_folder_name(rel)[0], []).append(
            (rel, f"{top.rstrip('/')}/{full[len(input_location(unit.uri)):]}"))
    with ThreadPoolExecutor(OBJECT_SAMPLES_AHEAD, thread_name_prefix="object-folder") as pool:
        pending: deque = deque()
        for key, files in entries.items():
            pending.append(pool.submit(_object_sample, fs, key, files, max_member_bytes, unit.uri))
            if len(pending) >= OBJECT_SAMPLES_AHEAD:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _object_sample(fs: pafs.FileSystem, key: str, files: list[tuple[str, str]], max_member_bytes: int,
                   folder: str) -> Sample:
    sample = Sample(key, {}, {})
    for rel, path in files:
        try:
            with fs.open_input_file(path) as f:
                _add_member(sample, split_folder_name(rel)[1], rel, f.size(), max_member_bytes, f.read)
        except (OSError, ValueError) as exc:  # ValueError: a key pyarrow refuses as a path (`a//b.png`)
            if failed := store_failure(exc, folder):  # the store, not the object: the unit fails
                raise failed from None  # its message holds exc's: the one line says what to do
            sample.problems.append((rel, "unreadable", f"{type(exc).__name__}: {exc}"))
    return sample


def _refusal(full: str, root: str, links_leave_input: bool) -> tuple[str, str] | None:
    """(kind, message) when a folder entry must not be opened: anything but a regular file (a
    FIFO would block for ever, a device never ends), or a link out of the input folder."""
    mode = os.lstat(full).st_mode
    if stat.S_ISLNK(mode):
        target = os.path.realpath(full)
        inside = os.path.commonpath([target, os.path.realpath(root)]) == os.path.realpath(root)
        if not inside and not links_leave_input:
            return "link_outside_input", "symbolic link to outside the input folder (ingest.follow_links_out)"
        mode = os.stat(full).st_mode
    if not stat.S_ISREG(mode):
        return "not_a_regular_file", f"folder entry is a {_file_type(mode)}"
    return None


def _file_type(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device")):
        if test(mode):
            return name
    return "special file"


TAR_TYPES = {tarfile.DIRTYPE: "directory", tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link",
             tarfile.CHRTYPE: "character device", tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "FIFO"}
