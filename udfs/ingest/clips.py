"""One clip (a video, or an animated GIF / APNG / WebP) -> its kept frames as `images` rows.

Frames are decoded as a stream (udfs/ingest/clip_frames.py), chosen by
udfs/ingest/frame_selection.py, encoded and stored in the unit's frame store. The key of a
frame is `<clip key>/f<frame index>`: the same on every run, whatever else is in the input.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image

from udfs.ingest.frame_selection import FrameRules, FrameSelector
from udfs.ingest.frame_store import FrameStore

if TYPE_CHECKING:  # imported where a clip is met: PyAV, scipy.fft and OpenCV cost an ingest worker
    # 0.15 s of its start, and most workers ingest still images only
    from udfs.ingest.clip_frames import ClipInfo, Frame

ANIMATED_FORMATS = ("GIF", "PNG", "WEBP")  # Pillow formats whose files can hold an animation
PILLOW_FORMAT = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


@dataclass
class ClipResult:
    """What one clip gave: its `clips` row, its frames' `images` rows, and its problems."""

    clip: dict
    frames: list[dict] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, message)


def frame_key(clip_key: str, index: int) -> str:
    return f"{clip_key}/f{index:06d}"


def ingest_clip(clip_key: str, data: bytes | str, animated: bool, rules: FrameRules, max_pixels: int,
                store: FrameStore) -> ClipResult:
    """Decode, select and store the frames of one clip. Frames kept before the clip breaks stay."""
    from udfs.ingest.clip_frames import ClipError, ClipInfo, ClipReader

    if _no_bytes(data):  # FFmpeg's own word for it is "Invalid data found", as for random bytes
        result = ClipResult({"key": clip_key}, problems=[("empty_file", "zero-byte video")])
        result.clip.update(_clip_columns(None, 0, 0, 0, 1))
        return result
    reader = ClipReader(data, animated, max_pixels, rules.seek_seconds if rules.may_seek else 0.0)
    selector = FrameSelector(rules)
    result = ClipResult({"key": clip_key})
    info: ClipInfo | None = None
    try:
        for item in reader.frames():
            if isinstance(item, ClipInfo):
                info = item
                _check_size(info, rules)
                continue
            if reader.decoded > rules.max_decoded_frames or selector.kept >= rules.max_frames_per_clip:
                result.problems.append(("too_many_frames", _too_many(reader.decoded, selector.kept, rules)))
                break
            hashes = selector.select(item)
            if hashes is not None:
                result.frames.append(_store_frame(clip_key, item, hashes, selector.slice, rules, store))
            if rules.may_seek:
                reader.skip_until(selector.next_time)
    except ClipError as exc:
        result.problems.append((exc.kind, str(exc)))
    if reader.gaps or (reader.skipped and not any(kind == "corrupt_clip" for kind, _ in result.problems)):
        result.problems.append(("frames_missing", _gaps_message(reader.gaps, reader.skipped)))
    if info is not None and animated and not info.fps:  # stopped before its last frame: the rate so far
        info = dataclasses.replace(info, fps=reader.frame_rate())
    if info is not None and reader.decoded == 0 and not result.problems:
        result.problems.append(("empty_clip", "the clip has no frames"))
    result.clip.update(_clip_columns(info, reader.decoded, len(result.frames), selector.slices,
                                     len(result.problems)))
    return result


def _no_bytes(data: bytes | str) -> bool:
    """Whether a clip (its bytes, or the path of its file) is empty; a file that cannot be
    looked at is left to the reader, which says why."""
    try:
        return (os.path.getsize(data) if isinstance(data, str) else len(data)) == 0
    except OSError:
        return False


def _check_size(info: ClipInfo, rules: FrameRules) -> None:
    from udfs.ingest.clip_frames import ClipError

    if min(info.width, info.height) < rules.min_side:
        raise ClipError("frames_too_small", f"{info.width}x{info.height} frames: shorter side < "
                                            f"ingest.frames.min_side {rules.min_side}; skipped")


def _gaps_message(gaps: list[tuple[float, float]], skipped: int) -> str:
    lost = sum(end - start for start, end in gaps)
    first = ", ".join(f"{start:.2f}-{end:.2f} s" for start, end in gaps[:3])
    stretches = (f"{len(gaps)} stretches without frames ({lost:.2f} s in all: {first}"
                 f"{', ...' if len(gaps) > 3 else ''})") if gaps else ""
    packets = f"{skipped} damaged packets skipped" if skipped else ""
    return f"{'; '.join(filter(None, (stretches, packets)))}: the frames around them stay"


def _too_many(decoded: int, kept: int, rules: FrameRules) -> str:
    return (f"stopped after {decoded} frames decoded, {kept} kept (ingest.frames.max_decoded_frames "
            f"{rules.max_decoded_frames}, max_frames_per_clip {rules.max_frames_per_clip}); the rest is left out")


def _store_frame(clip_key: str, frame: Frame, hashes: dict, slice_index: int, rules: FrameRules,
                 store: FrameStore) -> dict:
    """Encode a kept frame into the store; its `images` row."""
    image = frame.image()
    if max(image.size) > rules.max_side:  # frames above the maximum are resized, not skipped
        image = image.copy()
        image.thumbnail((rules.max_side, rules.max_side), Image.Resampling.LANCZOS)
    out = io.BytesIO()
    fmt = PILLOW_FORMAT[rules.format]  # checked with the config (jobs/ingest.frame_options)
    image.save(out, fmt, **({"quality": rules.quality} if fmt != "PNG" else {}))
    data = out.getvalue()
    key = frame_key(clip_key, frame.index)
    member = f"{key}.{rules.format}"
    offset = store.add(member, data)
    return {"key": key, "source": store.uri, "member": member, "member_offset": offset,
            "width": image.width, "height": image.height, "format": fmt, "mode": image.mode, "n_frames": 1,
            "orientation": 1, "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(), **hashes,
            "clip": clip_key, "frame": frame.index, "frame_time": round(frame.time, 6), "slice": slice_index}


def _clip_columns(info: ClipInfo | None, decoded: int, kept: int, slices: int, problems: int) -> dict:
    from udfs.ingest.clip_frames import ClipInfo

    known = info or ClipInfo("", "", 0, 0, 0.0, 0.0)
    return {"format": known.format, "codec": known.codec, "width": known.width, "height": known.height,
            "fps": known.fps, "duration": known.duration, "frames_seen": decoded, "frames_kept": kept,
            "slices": slices if kept else 0, "errors": problems}
