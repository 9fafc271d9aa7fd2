"""Which frames of a clip to keep: slices at scene cuts, a bounded rate, no near-identical frames.

A clip is cut into slices at scene cuts (and every `slice_seconds` when set). Within a slice,
a frame is a candidate at most `max_fps` times a second; a candidate is kept when its pHash is
more than `similarity_distance` bits from the last kept frame's, or while the slice has fewer
than `min_frames_per_slice`; a slice keeps at most `max_frames_per_slice`.

Why pHash for similarity: ingest computes it for every image anyway (the `images.phash`
column), it ignores compression noise and small motion, and curate's near-duplicate rule
speaks the same distance; a colour histogram cannot tell a pan over one background from a
still.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # a type only: clip_frames' PyAV and scipy.fft load where a clip is met (udfs/ingest/clips.py)
    from udfs.ingest.clip_frames import Frame


@dataclass(frozen=True)
class FrameRules:
    """The [ingest.frames] options (jobs/defaults.toml documents each)."""

    max_fps: float = 2.0
    min_frames_per_slice: int = 1
    max_frames_per_slice: int = 8
    max_frames_per_clip: int = 2000
    max_decoded_frames: int = 500_000
    similarity_distance: int = 10
    min_detail: float = 2.0
    scene_threshold: float = 27.0
    min_scene_seconds: float = 0.5
    slice_seconds: float = 0.0
    min_side: int = 64
    max_side: int = 4096
    seek_seconds: float = 2.0
    format: str = "jpg"
    quality: int = 95

    @classmethod
    def from_options(cls, options: dict) -> FrameRules:
        return cls(**{k: type(getattr(cls, k))(options[k]) for k in cls.__dataclass_fields__ if k in options})

    @property
    def may_seek(self) -> bool:
        """Scene-cut detection compares consecutive frames, so it needs every one decoded."""
        return self.scene_threshold == 0 and self.max_fps > 0


class SceneCuts:
    """PySceneDetect's content detector (mean absolute change of hue, saturation and value
    between consecutive downscaled frames, a cut at `threshold` on its 0-255 scale, scenes at
    least `min_seconds` long), run on the frames this reader decodes anyway.

    Written here rather than imported: scenedetect 0.6 pins click < 8.3 (huggingface-hub needs
    >= 8.4) and 0.7 requires the GUI build of OpenCV, which clashes with the headless build the
    annotate models use; the detector itself is these few lines.
    """

    def __init__(self, threshold: float, min_seconds: float) -> None:
        self.threshold, self.min_seconds = threshold, min_seconds
        self.last: np.ndarray | None = None
        self.scene_start = 0.0

    def is_cut(self, small_rgb: np.ndarray, time: float) -> bool:
        from udfs.opencv import cv2  # here: OpenCV is 50 ms of the start of every ingest worker, most never see a clip

        hsv = cv2.cvtColor(small_rgb, cv2.COLOR_RGB2HSV)
        last, self.last = self.last, hsv
        if last is None or last.shape != hsv.shape:
            return False
        change = cv2.norm(hsv, last, cv2.NORM_L1) / hsv.size  # the mean absolute change, in one pass
        if change >= self.threshold and time - self.scene_start >= self.min_seconds:
            self.scene_start = time
            return True
        return False


class FrameSelector:
    """Decides frame by frame (in order) which frames of one clip are kept."""

    def __init__(self, rules: FrameRules) -> None:
        self.rules = rules
        self.cuts = SceneCuts(rules.scene_threshold, rules.min_scene_seconds) if rules.scene_threshold else None
        self.slice, self.slice_start, self.slice_kept, self.kept = 0, 0.0, 0, 0
        self.next_time = 0.0  # the earliest time of the next candidate
        self.last_hash: int | None = None

    def select(self, frame: Frame) -> dict | None:
        """The frame's hashes (phash, detail, colour) when it is kept, else None."""
        if self._starts_slice(frame):
            self.slice += 1
            self.slice_start, self.slice_kept, self.next_time = frame.time, 0, frame.time
        if frame.time < self.next_time or self.slice_kept >= self.rules.max_frames_per_slice:
            return None
        if self.rules.max_fps:
            self.next_time = frame.time + 1.0 / self.rules.max_fps
        quick, detail = frame.quick_hash()
        if detail < self.rules.min_detail:
            return None  # a fade to black, a blank card: nothing to learn from
        near = self.last_hash is not None and (quick ^ self.last_hash).bit_count() <= self.rules.similarity_distance
        if near and self.slice_kept >= self.rules.min_frames_per_slice:
            return None
        self.last_hash = quick
        self.slice_kept += 1
        self.kept += 1
        return frame.hashes()

    def _starts_slice(self, frame: Frame) -> bool:
        cut = self.cuts is not None and self.cuts.is_cut(frame.small(), frame.time)
        forced = bool(self.rules.slice_seconds) and frame.time - self.slice_start >= self.rules.slice_seconds
        return cut or forced

    @property
    def slices(self) -> int:
        return self.slice + 1
