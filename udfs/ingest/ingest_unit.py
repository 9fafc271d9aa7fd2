"""Ray Data batch UDF of the ingest job: read, probe and parse whole units, commit them.

Each unit (an input shard or a folder chunk) is read in batches of `batch_samples` samples:
each batch's tables are written as parts named after the unit and the batch, then the batch is
marked done, and once the whole unit is written its marker names every batch's parts. The UDF
returns one summary row per unit. A unit's memory is one batch's rows, whatever its size, and
a run killed half-way through a unit redoes only the batches it had not marked: the samples of
a unit come in the same order every time (a unit's id says what it holds), so a finished batch
is a range of that order.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import time
from collections import Counter, defaultdict
from typing import Any

from store.workspace import Workspace
from udfs.ingest.clips import ANIMATED_FORMATS, ingest_clip
from udfs.ingest.frame_selection import FrameRules
from udfs.ingest.frame_store import FrameStore
from udfs.ingest.probe import ProbeError, probe_image
from udfs.ingest.sidecars import (
    CUT_UTF8,
    SidecarError,
    cleaned_tags,
    decode_text,
    has_lone_surrogate,
    parse_sidecar,
    replace_lone_surrogates,
    without_controls,
)
from udfs.ingest.sources import (
    IMAGE_EXTENSIONS,
    SIDECAR_EXTENSIONS,
    VIDEO_EXTENSIONS,
    Sample,
    Unit,
    member_key,
    read_unit,
    split_folder_name,
    split_key,
)

JOB = "ingest"
TABLES = ("images", "source_tags", "source_text", "errors", "clips")
# A sample's picture: a video first (a same-key still is its poster, reported as extra_image)
MEDIA_EXTENSIONS = VIDEO_EXTENSIONS + IMAGE_EXTENSIONS
# the kinds of a member that is not opened: not a regular file, or a link out of a folder input
NOT_OPENED = ("not_a_regular_file", "link_outside_input")
# the kinds of a member row whose picture, if it is one, is not ingested (member_problem)
LOST_PICTURE_KINDS = (*NOT_OPENED, "duplicate_member")
SUMMARY = ("samples", "images", "clips", "frames", "errors", "dropped", "bytes", "seconds")


def ingest_units(items: list[dict], workspace: str, options: dict) -> list[dict]:
    """A Ray task (jobs/ray_env.unit_tasks): the units of `items` (ingest.shards_per_task of
    them), each read and committed; one summary per unit."""
    ws = Workspace(workspace)
    infos = []
    for item in items:
        unit = Unit(item["kind"], item["uri"], item["prefix"], list(item["files"]), input=item["input"])
        info = UnitIngest(ws, item["unit"], unit, options).run()
        infos.append({name: info[name] for name in SUMMARY} | {"error_kinds": dict(info["error_kinds"])})
    return infos


# Bumped when the reading of a unit changes what rows it gives (sidecar parsing, member rules):
# a killed run's batches written by the code before are redone, not mixed with the new rows.
# 3: shards are read past damaged member headers; 4: compressed shards read whole; 5: palette and
# 1-bit images of 512 pixels a side or more are probed (they were corrupt_image rows); 6: a
# second image under one key, or a member named as one that is not opened (a link), is a dropped
# sample (but a clip's poster), and a name's own `\xNN` is
# written `\x5cxNN` (a name with the byte and one with the text had one key, one image lost); 7: a
# JSON sidecar's gallery-dl `tags_<category>` fields give its tags their categories; 8: UTF-8 cut
# inside its last character is UTF-8 (it was guessed as a legacy code page, its tags garbled); 9:
# a legacy code page is the one whose reading holds the fewest unlikely characters; 10: hydrus's
# `creator:`, `series:`, `studio:` prefixes are the artist and copyright categories; 11: the files
# an operating system leaves (`._NAME`, `.DS_Store`, `Thumbs.db`) are ignored members, no samples;
# 12: a zero-byte video is an empty_file (it was a corrupt_clip); 13: a JSON sidecar's Danbooru
# `tag_string` alone gives tags, and one with no field read is a sidecar_json row; 14: a tag list's
# escaped backslash (`\\m/`, as imgutils writes `\m/`) is a backslash, as `\(` was already `(`
READER_VERSION = 14


def limits_digest(options: dict, **more: object) -> str:
    """A digest of the ingest limits (`more` added): what a unit's rows depend on besides its
    files. The batch size is not in it: a batch marker says which samples it holds."""
    rules = {k: v for k, v in options.items() if k != "batch_samples"} | more
    return hashlib.sha256(json.dumps(rules, sort_keys=True).encode()).hexdigest()[:16]


def options_fingerprint(options: dict) -> str:
    """What a batch's rows depend on besides its unit: a batch written with other limits (or
    another READER_VERSION) is redone."""
    return limits_digest(options, reader=READER_VERSION)


def batch_name(index: int) -> str:
    return f"b{index:05d}"


def item_id(item: Sample | tuple[str, str, str]) -> list[str]:
    """What a batch marker records of its last item, to check that a rerun reads the unit the
    same way up to there: a sample's key and the kinds of its problems (a sample cut short by
    a shard that ended early differs from the whole one), or a problem's member and kind."""
    if isinstance(item, tuple):
        return [item[0], item[1]]
    return [item.key, *(kind for _, kind, _ in item.problems)]


def kept_batches(markers: dict[str, dict], fingerprint: str) -> list[dict]:
    """The batch markers a rerun of a unit keeps ({batch: marker}, as done_batches gives them):
    b00000, b00001, ... in a row, written with this run's options, each starting where the one
    before ended. The first that is not stops the row; later ones are redone (and overwritten)."""
    kept: list[dict] = []
    for index in itertools.count():
        marker = markers.get(batch_name(index))
        if marker is None or marker.get("options") != fingerprint or marker["items"][0] != (
                kept[-1]["items"][1] if kept else 0):
            return kept
        kept.append(marker)


class UnitIngest:
    """One unit, batch by batch, then its commit; the batches a killed run finished are kept."""

    def __init__(self, ws: Workspace, uid: str, unit: Unit, options: dict) -> None:
        self.ws, self.uid, self.unit, self.options = ws, uid, unit, options
        self.fingerprint = options_fingerprint(options)
        found = ws.done_batches(JOB, uid)
        self.markers = kept_batches(found, self.fingerprint)
        # markers past the kept ones name parts this run rewrites: gone before it does, so that
        # no later run keeps a marker over another run's rows
        ws.drop_batches(JOB, uid, {name: m for name, m in found.items() if m not in self.markers})

    def run(self) -> dict:
        if not self.write_batches():  # the unit read differently this time: its kept batches do not fit
            self.ws.drop_batches(JOB, self.uid, {batch_name(i): m for i, m in enumerate(self.markers)})
            self.markers = []
            self.write_batches()
        return self.commit_unit()

    def write_batches(self) -> bool:
        """Read the unit and write the batches after the kept ones; False, having written
        nothing, when the read does not pass through the kept batches' last item (a shard that
        ended early this time, or the last time)."""
        skip = self.markers[-1]["items"][1] if self.markers else 0
        rows: UnitRows | None = None
        position = -1
        started = time.perf_counter()
        try:
            # Skipped samples are still read (a shard is a stream), but never probed or parsed.
            for position, item in enumerate(read_unit(self.unit, self.options["max_member_bytes"],
                                                      self.options["follow_links_out"])):
                if position < skip:
                    if position == skip - 1 and item_id(item) != self.markers[-1]["last"]:
                        return False
                    continue
                if rows is None:
                    part = f"{self.uid}-{batch_name(len(self.markers))}"
                    rows = UnitRows(self.unit, FrameStore(self.ws, part), part, position)
                rows.add(item, self.options)
                if rows.items >= self.options["batch_samples"]:
                    self.commit_batch(rows, item, time.perf_counter() - started)
                    rows, started = None, time.perf_counter()
            if rows is not None:
                self.commit_batch(rows, item, time.perf_counter() - started)
                rows = None
        finally:
            if rows is not None:
                rows.frame_store.abort()
        return position + 1 >= skip

    def commit_batch(self, rows: UnitRows, last: Sample | tuple[str, str, str], seconds: float) -> None:
        rows.frame_store.close()  # before the marker that names its frames
        tables = [t for t in TABLES if rows.tables[t]]
        for table in tables:
            self.ws.write_part(table, rows.part, rows.tables[table])
        marker = {"items": [rows.start, rows.start + rows.items], "last": item_id(last), "input": self.unit.input,
                  "options": self.fingerprint, "info": rows.summary(seconds),
                  "parts": {table: [rows.part] for table in tables}}
        self.ws.commit_batch(JOB, self.uid, batch_name(len(self.markers)), marker)
        self.markers.append(marker)

    def commit_unit(self) -> dict:
        """The unit's marker, naming the parts of all its batches, with their summaries added up."""
        parts: dict[str, list[str]] = defaultdict(list)
        info: dict[str, Any] = {name: 0 for name in SUMMARY}
        kinds: Counter[str] = Counter()
        for marker in self.markers:
            for table, names in marker["parts"].items():
                parts[table] += names
            for name in info:
                info[name] += marker["info"][name]
            kinds.update(marker["info"]["error_kinds"])
        info.update(error_kinds=dict(kinds), seconds=round(info["seconds"], 4), input=self.unit.input,
                    reader=READER_VERSION)
        self.ws.commit_unit(JOB, self.uid, info, parts=dict(parts))
        self.ws.forget_batches(JOB, self.uid)
        return info


class UnitRows:
    """The rows of the ingest tables for one batch of a unit, and its accounting."""

    def __init__(self, unit: Unit, frame_store: FrameStore, part: str = "", start: int = 0) -> None:
        self.unit = unit
        self.frame_store = frame_store  # where this batch's clips put their kept frames
        self.part, self.start = part, start  # the batch's part name, its first item in the unit
        self.items = 0  # samples and problem tuples read into this batch
        self.tables: dict[str, list[dict]] = {t: [] for t in TABLES}
        self.samples = 0
        self.bytes = 0
        self.clips = 0  # samples that became clips with at least one frame kept
        self.frames = 0
        self.tag_counts: Counter[str] = Counter()  # tags kept per key, for max_tags

    def add(self, item: Sample | tuple[str, str, str], options: dict) -> None:
        self.items += 1
        if isinstance(item, tuple):  # a member that is no sample, or the unit itself (a corrupt shard)
            member, kind, message = item
            key = f"{self.unit.prefix}/{member_key(member, self.unit.kind)}" if member else self.unit.prefix
            self.member_problem(key, member, kind, message)
            return
        self.samples += 1
        before = self.marks(item.key)
        try:
            self.add_sample(item, options)
        except MemoryError:
            raise  # not the sample's: a rerun must not read it otherwise
        except Exception as exc:  # noqa: BLE001 - a decoder's unforeseen error loses its sample, not the run
            self.restore(item.key, before)
            member = next(iter(item.member_names.values()), "")
            said = re.sub(r" at 0x[0-9a-f]+", "", f"{type(exc).__name__}: {exc}")  # an address: not the same on a rerun
            self.error(f"{self.unit.prefix}/{item.key}", member, "ingest_error", said, dropped=True)

    def marks(self, key: str) -> tuple:
        """Where the rows and counts stand before a sample (restore puts them back)."""
        return ({t: len(rows) for t, rows in self.tables.items()}, self.samples, self.bytes, self.clips, self.frames,
                self.tag_counts[f"{self.unit.prefix}/{key}"])

    def restore(self, key: str, marks: tuple) -> None:
        """The rows and counts as they were before a sample that failed half-way (its frames stay
        in the batch's frame tar, named by no row)."""
        lengths, self.samples, self.bytes, self.clips, self.frames, self.tag_counts[f"{self.unit.prefix}/{key}"] = marks
        for table, length in lengths.items():
            del self.tables[table][length:]

    def add_sample(self, sample: Sample, options: dict) -> None:
        key = f"{self.unit.prefix}/{sample.key}"
        pictures = [e for e in MEDIA_EXTENSIONS if e in sample.members]
        image_ext = pictures[0] if pictures else None
        problems = list(sample.problems)
        if any(kind == "duplicate_key" for _, kind, _ in problems):
            image_ext = None  # a second sample under a key already taken: never two rows per key
        if image_ext is None:
            kind, message = _missing_image_reason(problems, sample)
            # the member it had, else the one its problem names (a file that could not be read)
            member = next(iter(sample.member_names.values()), next((m for m, _, _ in problems if m), ""))
            self.error(key, member, kind, message, dropped=True)
            problems = [p for p in problems if p[1] != kind]
            if pictures:
                self.extra_pictures(key, sample, pictures[0], pictures[1:], clip=False)
        else:
            for index, ext in enumerate(pictures):
                self.samples += index > 0  # the picture before could not be read: a dropped sample
                read_as = self.add_image(key, sample, ext, options)
                if read_as:
                    self.extra_pictures(key, sample, ext, pictures[index + 1:], clip=read_as == "clip")
                    break
        for member, kind, message in problems:
            self.member_problem(key, member, kind, message)

    def member_problem(self, key: str, member: str, kind: str, message: str) -> None:
        """An errors row of a member. One named as an image or video that is not ingested is a
        dropped sample: an entry not opened (a tar's hard or symbolic link, a folder's link out of
        the input, a FIFO), or a second picture under the sample's key and extension (a tar's
        `/a.png` beside `a.png`, a name repeated)."""
        lost = kind in LOST_PICTURE_KINDS and _extension(member, self.unit.kind) in MEDIA_EXTENSIONS
        self.samples += lost
        self.error(key, member, kind, message, dropped=lost)

    def extra_pictures(self, key: str, sample: Sample, ext: str, others: list[str], clip: bool) -> None:
        """The sample's pictures after the one it was read with (`ext`): beside a still (a.png and
        a.jpg in a folder) each is a picture lost, a dropped sample; beside a clip, its poster."""
        for other in others:
            self.samples += not clip
            self.error(key, sample.member_names[other], "extra_image",
                       f"sample has a .{ext} image already; .{other} ignored", dropped=not clip)

    def add_image(self, key: str, sample: Sample, ext: str, options: dict) -> str | None:
        """The sample's picture: "clip" (a video or an animation), "image", or None when it
        cannot be read (an errors row; the sample's next picture, if any, is tried)."""
        member = sample.member_names[ext]
        if ext in VIDEO_EXTENSIONS:
            self.add_clip(key, sample, ext, False, [], options)
            return "clip"
        data = sample.members[ext]
        self.bytes += len(data)
        try:
            probed = probe_image(data, options["max_pixels"], options["max_text_chars"])
        except ProbeError as exc:
            self.error(key, member, exc.kind, str(exc), dropped=True)
            return None
        texts = probed.pop("texts")
        if probed["n_frames"] > 1 and probed["format"] in ANIMATED_FORMATS and options["frames"]["enabled"]:
            self.add_clip(key, sample, ext, True, texts, options)
            return "clip"
        self.tables["images"].append({"key": key, "source": self.unit.uri, "member": member,
                                      "member_offset": sample.offsets.get(ext), **probed})
        self.add_companions(key, [key], None, sample, ext, texts, options)
        return "image"

    def add_clip(self, key: str, sample: Sample, ext: str, animated: bool, texts: list[tuple[str, str]],
                 options: dict) -> None:
        """A video or an animation: its kept frames become images rows `<key>/f<index>`, which
        all get the clip's sidecar tags and texts (origin `clip`)."""
        member = sample.member_names[ext]
        data = sample.paths.get(ext) or sample.members[ext]
        if not animated:  # an animation's bytes were counted when it was probed as an image
            self.bytes += os.path.getsize(data) if isinstance(data, str) else len(data)
        rules = FrameRules.from_options(options["frames"])
        result = ingest_clip(key, data, animated, rules, options["max_pixels"], self.frame_store)
        self.tables["clips"].append({**result.clip, "source": self.unit.uri, "member": member})
        self.tables["images"] += result.frames
        if not result.frames and not result.problems:
            result.problems.append(("no_frames_kept", "every frame was too flat (ingest.frames.min_detail)"))
        for kind, message in result.problems:
            self.error(key, member, kind, message, dropped=not result.frames)
        if result.frames:
            self.clips += 1
            self.frames += len(result.frames)
            self.add_companions(key, [f["key"] for f in result.frames], "clip", sample, ext, texts, options)

    def add_companions(self, key: str, targets: list[str], origin: str | None, sample: Sample, ext: str,
                       texts: list[tuple[str, str]], options: dict) -> None:
        """The image's embedded texts and its sidecars, for the `targets` (the image itself, or the
        frames of a clip), and the members of its sample that are not read."""
        member = sample.member_names[ext]
        self.add_texts(key, targets, member, texts, options)
        for other in sample.members:
            if other not in MEDIA_EXTENSIONS and other not in SIDECAR_EXTENSIONS:
                self.error(key, sample.member_names[other], "ignored_member",
                           f"'.{other}' is no image, video or sidecar extension: not read", dropped=False)
        for side in SIDECAR_EXTENSIONS:
            if side in sample.members:
                self.add_sidecar(key, targets, origin, sample, side, options)

    def add_sidecar(self, key: str, targets: list[str], origin_of_all: str | None, sample: Sample, ext: str,
                    options: dict) -> None:
        member, data = sample.member_names[ext], sample.members[ext]
        if len(data) > options["max_sidecar_bytes"]:
            message = f"{len(data)} bytes > max_sidecar_bytes {options['max_sidecar_bytes']}; ignored"
            self.error(key, member, "sidecar_too_large", message, dropped=False)
            return
        try:
            text, guessed = decode_text(data)
            if guessed == CUT_UTF8:
                self.error(key, member, "bad_characters", "UTF-8 cut inside its last character: that character "
                           "left out", dropped=False)
            elif guessed:
                self.error(key, member, "sidecar_encoding_guessed", f"not UTF-8; read as {guessed}", dropped=False)
            text, controls = without_controls(text)
            if controls:
                self.error(key, member, "bad_characters", f"{controls} control characters (NUL, ...) removed",
                           dropped=False)
            tags, texts, origin = parse_sidecar(ext, text)
        except SidecarError as exc:
            self.error(key, member, exc.kind, str(exc), dropped=False)
            return
        tags, problems = cleaned_tags(tags)
        for problem in problems:
            self.error(key, member, "bad_characters", problem, dropped=False)
        origin = origin_of_all or origin
        for position, (tag, category) in enumerate(self.bounded_tags(key, member, tags, options)):
            self.tables["source_tags"] += [
                {"key": target, "tag": tag, "category": category, "origin": origin, "position": position}
                for target in targets]
        self.add_texts(key, targets, member, texts, options)

    def bounded_tags(self, key: str, member: str, tags: list[tuple[str, str]], options: dict) -> list[tuple[str, str]]:
        """The tags within max_tag_chars, at most max_tags per image; one errors row per kind of excess.
        Every later stage (curate's substring rule, captions) is bounded by these two numbers."""
        limit = options["max_tag_chars"]
        long = [t for t, _ in tags if len(t) > limit]
        if long:
            self.error(key, member, "tag_too_long", f"{len(long)} tags longer than max_tag_chars {limit} left out "
                       f"(the first starts {long[0][:40]!r}, {len(long[0])} characters)", dropped=False)
        tags = [(t, c) for t, c in tags if len(t) <= limit]
        room = max(0, options["max_tags"] - self.tag_counts[key])
        if len(tags) > room:
            self.error(key, member, "too_many_tags", f"{self.tag_counts[key] + len(tags)} tags > max_tags "
                       f"{options['max_tags']}: the last {len(tags) - room} left out", dropped=False)
            tags = tags[:room]
        self.tag_counts[key] += len(tags)
        return tags

    def add_texts(self, key: str, targets: list[str], member: str, texts: list[tuple[str, str]],
                  options: dict) -> None:
        limit = options["max_text_chars"]
        for kind, text in texts:
            # a JSON sidecar's escapes ("\u001b") and an image's own text chunks get past the
            # raw sidecar's cleaning
            text, controls = without_controls(text)
            if controls:
                self.error(key, member, "bad_characters", f"{kind} with {controls} control characters (NUL, ESC, ...): "
                           "removed", dropped=False)
            if has_lone_surrogate(text):
                self.error(key, member, "bad_characters", f"{kind} with half a UTF-16 pair (a \\udXXX escape): "
                           "each replaced with '?'", dropped=False)
                text = replace_lone_surrogates(text)
            if len(text) > limit:
                self.error(key, member, "text_too_long", f"{kind} of {len(text)} characters > max_text_chars "
                           f"{limit}; left out", dropped=False)
            else:
                self.tables["source_text"] += [{"key": target, "kind": kind, "text": text} for target in targets]

    def error(self, key: str, member: str, kind: str, message: str, dropped: bool) -> None:
        self.tables["errors"].append({"key": key, "source": self.unit.uri, "member": member, "stage": "ingest",
                                      "kind": kind, "message": message[:2000], "dropped": dropped})

    def summary(self, seconds: float) -> dict:
        kinds = Counter(e["kind"] for e in self.tables["errors"])
        return {"samples": self.samples, "images": len(self.tables["images"]), "clips": self.clips,
                "frames": self.frames, "errors": len(self.tables["errors"]), "error_kinds": dict(kinds),
                # samples that left no image and no clip (one may have several dropped errors rows)
                "dropped": self.samples - (len(self.tables["images"]) - self.frames) - self.clips,
                "bytes": self.bytes, "seconds": round(seconds, 4)}


def _extension(member: str, unit_kind: str) -> str:
    """A member's extension as its unit's samples are keyed (first dot in a shard, last in a folder)."""
    return (split_key if unit_kind == "tar" else split_folder_name)(member)[1]


def _missing_image_reason(problems: list[tuple[str, str, str]], sample: Sample) -> tuple[str, str]:
    """Why a sample has no image: the problem that took it, else that it never had one."""
    for _, kind, message in problems:
        if kind == "duplicate_key":
            return kind, message
    for member, kind, message in problems:
        if member.rsplit(".", 1)[-1].lower() in MEDIA_EXTENSIONS or kind == "truncated_shard":
            return kind, message
    found = ", ".join(sorted(sample.member_names.values())) or "nothing"
    return "no_image", f"sample has no image member (found {found})"
