"""Output names from sample keys that can never leave the export folder.

Keys come from tar headers and folder paths of untrusted inputs: `../x`, `/etc/passwd`,
`a\\b`, control characters, Windows device names, dots (WebDataset ends a key at the first
dot of the file name), names too long for a file system, and keys that differ only in case
(one file on Windows and macOS, where kohya users train) all occur. A safe name keeps the
readable part of the key and adds a short hash whenever anything had to change or the key has
capitals, so two keys never end up with the same name, whatever the file system's case rule.
"""

from __future__ import annotations

import hashlib
import os
import re

UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
WINDOWS_DEVICES = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
# characters of a safe name, its digest included: with a materialised copy's suffix
# (-r<n>-<digest>, n < 1000) and ".json", a shard member's name fits the 100 bytes of a tar
# header's own name field. Longer names need a PAX header, and wids (the random-access reader
# of index.wids.json) reads the 100-byte field only: the member lost its extension.
MAX_NAME = 78


def key_digest(key: str) -> str:
    return hashlib.sha1(key.encode("utf-8", "surrogateescape")).hexdigest()[:10]


def safe_name(key: str) -> str:
    """A flat file-name stem for `key`: [A-Za-z0-9_-] only, "/" as "__", unique per key.

    Lower-case keys made of [a-z0-9_-] path segments (without "__") map one to one without a
    hash; any other key gets "-<sha1 prefix>" so that neither sanitising nor a file system that
    ignores case can merge two keys.
    """
    segments = [UNSAFE.sub("_", s).strip("_") for s in key.split("/")]
    readable = "__".join(s for s in segments if s) or "sample"
    lossless = "__" not in key and all(s and not UNSAFE.search(s) for s in key.split("/"))
    lossless = lossless and readable == key.replace("/", "__") and key == key.lower()
    device = readable.lower() in WINDOWS_DEVICES
    if lossless and not device and len(readable) <= MAX_NAME:
        return readable
    digest = key_digest(key)
    return f"{readable[:MAX_NAME - len(digest) - 1].rstrip('_')}-{digest}"


def safe_folder(name: str) -> str:
    """A single folder name (kohya concept, EveryDream folder) from free text such as a group path."""
    return safe_name(name)


def inside(root: str, relative: str) -> str:
    """root/relative, refusing anything that would resolve outside root (defence in depth)."""
    base = os.path.realpath(root)
    path = os.path.realpath(os.path.join(base, relative))
    if os.path.commonpath([base, path]) != base or path == base:
        raise ValueError(f"output path {relative!r} leaves the export folder")
    return path
