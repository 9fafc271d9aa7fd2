"""Input units (a WebDataset shard, or a chunk of a plain folder) and the samples in them.

A sample is the WebDataset notion: the members that share a key (`dir/name` up to the first
dot of the file name), e.g. `a.jpg` + `a.txt` + `a.json`.
"""

from __future__ import annotations

import glob as globlib
import os
import re
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs
from braceexpand import braceexpand

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff", "avif", "jxl")
SIDECAR_EXTENSIONS = ("txt", "tags", "json", "caption")


@dataclass
class Unit:
    """One unit of work: committed whole, skipped whole on a rerun."""

    kind: str  # "tar" or "folder"
    uri: str  # the shard, or the folder
    prefix: str  # key prefix: the shard's or folder's path relative to its input root
    files: list[str] = field(default_factory=list)  # for folders: the files of this chunk


@dataclass
class Sample:
    key: str  # key inside the unit (without the unit prefix)
    members: dict[str, bytes]  # extension -> bytes
    member_names: dict[str, str]  # extension -> member name
    problems: list[tuple[str, str, str]] = field(default_factory=list)  # (member, kind, msg)


def safe_text(name: str) -> str:
    """Names from tar headers can hold undecodable bytes; keep them visible, not lost."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def split_key(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key ends at the first dot of the file name."""
    directory, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    key = f"{directory}/{stem}" if directory else stem
    return key, ext.lower() if dot else ""


# ---- discovering units --------------------------------------------------------------------
def discover_units(inputs: list[str], folder_unit_size: int) -> list[Unit]:
    """Every unit of every input, in a stable order."""
    units: list[Unit] = []
    for spec in inputs:
        units.extend(_units_of(spec, folder_unit_size))
    return units


def _units_of(spec: str, folder_unit_size: int) -> list[Unit]:
    if "://" in spec:
        fs, path = pafs.FileSystem.from_uri(spec)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            files = fs.get_file_info(pafs.FileSelector(path, recursive=True))
            tars = sorted(f.path for f in files if f.path.endswith(".tar"))
            scheme = spec.split("://", 1)[0]
            return [_tar_unit(f"{scheme}://{t}", path, t) for t in tars]
        return [_tar_unit(spec, os.path.dirname(path), path)]
    paths = [p for part in braceexpand(spec) for p in sorted(globlib.glob(part))] or [spec]
    units: list[Unit] = []
    for path in paths:
        p = Path(path)
        if p.is_file():
            units.append(_tar_unit(str(p.resolve()), str(p.resolve().parent), str(p.resolve())))
        elif p.is_dir():
            units.extend(_dir_units(p.resolve(), folder_unit_size))
        else:
            raise FileNotFoundError(f"input not found: {spec}")
    return units


def _tar_unit(uri: str, root: str, path: str) -> Unit:
    rel = os.path.relpath(path, root) if root else os.path.basename(path)
    prefix = re.sub(r"\.tar$", "", rel)
    return Unit("tar", uri, prefix)


def _dir_units(root: Path, folder_unit_size: int) -> list[Unit]:
    """Shards inside a directory are shard units; loose files form folder units."""
    tars, loose = [], []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            (tars if name.endswith(".tar") else loose).append(full)
    units = [_tar_unit(t, str(root), t) for t in tars]
    # keep a sample's files in one chunk: chunk on sorted keys, not on files
    by_key: dict[str, list[str]] = {}
    for full in loose:
        by_key.setdefault(split_key(os.path.relpath(full, root))[0], []).append(full)
    keys = sorted(by_key)
    for start in range(0, len(keys), folder_unit_size):
        chunk = keys[start : start + folder_unit_size]
        files = [f for k in chunk for f in by_key[k]]
        units.append(Unit("folder", str(root), f"{root.name}@{start:09d}", files))
    return units


# ---- reading samples ----------------------------------------------------------------------
def read_unit(unit: Unit, max_member_bytes: int) -> Iterator[Sample | tuple[str, str, str]]:
    """Samples of a unit; unit-level problems come out as (member, kind, message) tuples."""
    if unit.kind == "tar":
        yield from _read_tar(unit.uri, max_member_bytes)
    else:
        yield from _read_folder(unit, max_member_bytes)


def _open(uri: str):
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs.open_input_stream(path)
    return open(uri, "rb")


def _read_tar(uri: str, max_member_bytes: int) -> Iterator[Sample | tuple[str, str, str]]:
    """Stream a shard member by member.

    Written on tarfile rather than webdataset's tar iterator because that one reads every
    member whole before the caller sees it: we must refuse huge members before reading them,
    and account for every member of a truncated or corrupt shard.
    """
    current: Sample | None = None
    seen: set[str] = set()
    try:
        with _open(uri) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                name = safe_text(info.name)
                key, ext = split_key(name)
                if current is None or key != current.key:
                    if current is not None:
                        yield current
                    current = Sample(key, {}, {})
                    if key in seen:  # WebDataset samples are contiguous: a later repeat is a second sample
                        current.problems.append((name, "duplicate_key", f"key {key!r} seen earlier in the shard"))
                    seen.add(key)
                _add_member(current, ext, name, info.size, max_member_bytes, lambda i=info: tar.extractfile(i).read())
    except (tarfile.TarError, EOFError, OSError) as exc:
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
    sample.members[ext] = read()
    sample.member_names[ext] = name


def _read_folder(unit: Unit, max_member_bytes: int) -> Iterator[Sample | tuple[str, str, str]]:
    root = unit.uri
    samples: dict[str, Sample] = {}
    for full in unit.files:
        rel = safe_text(os.path.relpath(full, root))
        key, ext = split_key(rel)
        sample = samples.setdefault(key, Sample(key, {}, {}))
        try:
            size = os.path.getsize(full)
            _add_member(sample, ext, rel, size, max_member_bytes, lambda f=full: Path(f).read_bytes())
        except OSError as exc:
            sample.problems.append((rel, "unreadable", f"{type(exc).__name__}: {exc}"))
    yield from samples.values()
