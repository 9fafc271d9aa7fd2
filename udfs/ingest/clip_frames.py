"""Decode the frames of a clip as a stream: videos with PyAV (FFmpeg), animations with Pillow.

Animated GIF, APNG and WebP go through Pillow, which composes their frames (disposal and
blending) as every viewer does and reads all three; FFmpeg's WebP decoder reads no animation.
Everything else (MP4, WebM, MKV, ...) goes through PyAV, whose wheels bundle FFmpeg.

Only one decoded frame is held at a time: a two-hour episode never sits in memory.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from queue import Full, Queue
from typing import BinaryIO

import av
import numpy as np
import scipy.fft
from av.video.reformatter import VideoReformatter
from PIL import Image, ImageSequence

from udfs.ingest.probe import DECODE_ERRORS, bits_above_median, colour_signature, grey_hashes, image_hashes
from udfs.opencv import cv2

# The small picture scene-cut detection compares (PySceneDetect also works on downscaled frames)
SCENE_WIDTH = 96
HASH_SIDE = 32  # imagehash.phash's DCT size
# What a decoder that does not say may hold in flight: FFmpeg's most automatic threads, and
# H.264's deepest reordering (frames)
MAX_DECODER_THREADS, MAX_REORDER_DEPTH = 16, 16


class ClipError(Exception):
    """A clip that cannot be read (further); `kind` is the errors row's kind."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass
class ClipInfo:
    """What the container says about the clip, before decoding."""

    format: str
    codec: str
    width: int
    height: int
    fps: float  # nominal frames per second (0 when unknown)
    duration: float  # seconds (0 when unknown)


class Frame:
    """One decoded frame: its index in the clip, its time, and its pixels on demand.

    `reformatter` converts video frames; one per clip, because FFmpeg's conversion context is
    built per reformatter (a frame's own one costs 20 ms at 720p, eight times the conversion)."""

    def __init__(self, index: int, time: float, source: av.VideoFrame | Image.Image,
                 reformatter: VideoReformatter | None = None) -> None:
        self.index, self.time, self.source = index, time, source
        self.reformatter = reformatter or VideoReformatter()
        self._image: Image.Image | None = None
        self._small: np.ndarray | None = None  # scene detection's picture, reused for the colour

    def small(self) -> np.ndarray:
        """RGB uint8 about SCENE_WIDTH wide: what scene-cut detection compares."""
        if self._small is None:
            self._small = self._make_small()
        return self._small

    def _make_small(self) -> np.ndarray:
        width, height = self.source.width, self.source.height
        if _large_420(self.source, 4 * SCENE_WIDTH):
            return _subsampled_rgb(self.source, width // SCENE_WIDTH // 2 * 2)  # even: chroma is half size
        size = (SCENE_WIDTH, max(1, round(height * SCENE_WIDTH / max(width, 1))))
        if isinstance(self.source, av.VideoFrame):
            return self.reformatter.reformat(self.source, width=size[0], height=size[1], format="rgb24").to_ndarray()
        return np.asarray(self.source.resize(size, Image.Resampling.BOX))

    def image(self) -> Image.Image:
        """The whole frame as an RGB picture."""
        if self._image is None:
            # to_ndarray + fromarray: a fifth of the time of PyAV's to_image for the same pixels
            if isinstance(self.source, av.VideoFrame):
                rgb = self.reformatter.reformat(self.source, format="rgb24").to_ndarray()
                self._image = Image.fromarray(rgb)
            else:
                self._image = self.source
        return self._image

    def quick_hash(self) -> tuple[int, float]:
        """(pHash, detail) of the frame's grey picture area-averaged to 32x32 by OpenCV: what
        frame selection compares, about three times cheaper than the `images` hashes below
        (Pillow's box reduction, then Lanczos), so every candidate can afford it. Same DCT and
        bit order as imagehash.phash; it differs from the stored pHash by 0-4 bits of 64."""
        if _large_420(self.source, 2 * HASH_SIDE):
            grey = _plane(self.source.planes[0])
        else:
            grey = np.asarray(self.image().convert("L"))
        small = _area_resize(grey, HASH_SIDE).astype(np.float64)
        low = scipy.fft.dct(scipy.fft.dct(small, axis=0), axis=1)[:8, :8]
        return bits_above_median(low), float(small.std())

    def hashes(self) -> dict:
        """phash, detail and colour (the `images` columns), as udfs/ingest/probe.py computes them.

        A large 4:2:0 frame is hashed from its luma plane, read in place, and its colour from the
        small picture of scene detection: a candidate that is not kept is never converted to RGB
        (a third of the cost). Its pHash differs from the RGB frame's by 0-2 bits of 64."""
        if _large_420(self.source, 512):
            grey = Image.fromarray(np.ascontiguousarray(_plane(self.source.planes[0])))
            return {**grey_hashes(grey), "colour": colour_signature(Image.fromarray(self.small()))}
        return image_hashes(self.image())


def _area_resize(grey: np.ndarray, side: int) -> np.ndarray:
    """Area average to side x side: first by a whole factor (OpenCV's fast path for INTER_AREA;
    a fractional factor on a large picture is five times slower), then to the exact size."""
    factor = max(1, min(grey.shape) // (2 * side))
    if factor > 1:
        height, width = grey.shape[0] // factor, grey.shape[1] // factor
        grey = cv2.resize(grey[:height * factor, :width * factor], (width, height), interpolation=cv2.INTER_AREA)
    return cv2.resize(grey, (side, side), interpolation=cv2.INTER_AREA)


def _large_420(source: av.VideoFrame | Image.Image, min_side: int) -> bool:
    return isinstance(source, av.VideoFrame) and source.format.name in ("yuv420p", "yuvj420p") \
        and min(source.width, source.height) >= min_side


def _plane(plane: av.video.plane.VideoPlane) -> np.ndarray:
    """One plane of a frame, read in place (its rows are line_size bytes apart)."""
    return np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, :plane.width]


def _subsampled_rgb(frame: av.VideoFrame, step: int) -> np.ndarray:
    """Every `step`-th pixel of a 4:2:0 frame's planes, as RGB: ~10x cheaper than a swscale
    resize of the whole frame, and enough for a mean change over the picture (PySceneDetect
    0.5 downscaled by the same slicing). It runs on every decoded frame, so the planes are
    fetched once (PyAV builds them anew on each `planes`)."""
    planes, half = frame.planes, step // 2
    y = _plane(planes[0])[::step, ::step]
    u, v = _plane(planes[1])[::half, ::half], _plane(planes[2])[::half, ::half]
    height, width = min(y.shape[0], u.shape[0], v.shape[0]), min(y.shape[1], u.shape[1], v.shape[1])
    return cv2.cvtColor(cv2.merge((y[:height, :width], u[:height, :width], v[:height, :width])), cv2.COLOR_YUV2RGB)


# Two frames decoded in a row further apart than this (and than GAP_FRAMES frames at the nominal
# rate) say that frames between them were lost: a 2 s hole in a 12 fps MKV whose middle was
# damaged had no other trace. A variable-rate clip holds a still picture for a while, not seconds.
MIN_GAP_SECONDS, GAP_FRAMES = 1.0, 10
MAX_SKIPPED_PACKETS = 100  # damaged packets skipped in one clip before it is given up as corrupt


class ClipReader:
    """Opens one clip and yields its frames in order.

    `skip_until(t)` tells the reader that no frame before time t is wanted: PyAV then seeks to
    the key frame before t when that is at least `seek_seconds` ahead (no decoding in between).
    """

    def __init__(self, data: bytes | str, animated: bool, max_pixels: int, seek_seconds: float = 0.0) -> None:
        self.data, self.animated, self.max_pixels, self.seek_seconds = data, animated, max_pixels, seek_seconds
        self.wanted_from = 0.0
        self.decoded = 0  # frames decoded, including those skipped
        self.shown_frames, self.shown_seconds = 0, 0.0  # an animation's frames decoded whole, how long they show
        # (from, to) seconds between two frames decoded one after the other, without a seek, that
        # lie further apart than a frame rate allows: FFmpeg skips a damaged stretch and goes on
        self.gaps: list[tuple[float, float]] = []
        self.skipped = 0  # packets FFmpeg refused (a damaged stretch): skipped, decoding goes on
        self.reformatter = VideoReformatter()

    def frame_rate(self) -> float:
        """An animation's frames per second over the frames decoded so far (0 before any): all
        of them, or those before the caller stopped (the rest are not read to measure it)."""
        return round(self.shown_frames / self.shown_seconds, 3) if self.shown_seconds else 0.0

    def skip_until(self, time: float) -> None:
        self.wanted_from = max(self.wanted_from, time)

    def frames(self) -> Iterator[Frame]:
        """Yields ClipInfo first, then the frames; raises ClipError when the clip breaks."""
        if self.animated:
            yield from self._animation()
        else:
            yield from self._video()

    # ---- videos -------------------------------------------------------------------------
    def _video(self) -> Iterator[ClipInfo | Frame]:
        try:
            container = av.open(self._file(), mode="r")
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise ClipError("corrupt_clip", f"no container FFmpeg can read: {_reason(exc)}") from exc
        with container:
            if not container.streams.video:
                raise ClipError("no_video_stream", "the file holds no video stream")
            stream = container.streams.video[0]
            info = self._video_info(container, stream)
            yield info
            stream.thread_type = "AUTO"  # frame and slice threads: decoding is the cost here
            yield from self._decode(container, stream, info)

    def _file(self) -> str | BinaryIO:
        return self.data if isinstance(self.data, str) else io.BytesIO(self.data)

    def _video_info(self, container: av.container.InputContainer, stream: av.VideoStream) -> ClipInfo:
        ctx = stream.codec_context
        if ctx is None or not ctx.codec.name:  # (a stream has no codec_tag of its own in PyAV 12 and later)
            tag = getattr(ctx, "codec_tag", "") or "unknown"
            raise ClipError("unsupported_codec", f"no decoder for the codec of video stream {stream.index} "
                                                 f"(tag {tag!r}) in a {container.format.name} container")
        width, height = ctx.width, ctx.height
        if width * height > self.max_pixels:
            raise ClipError("frame_too_large", f"{width}x{height} frames > {self.max_pixels} pixels")
        if width <= 0 or height <= 0:
            raise ClipError("corrupt_clip", f"frame size {width}x{height}")
        rate = stream.average_rate or stream.guessed_rate or 0
        duration = float(container.duration / av.time_base) if container.duration else 0.0
        return ClipInfo(container.format.name, ctx.codec.name, width, height, float(rate), duration)

    def _decode(self, container: av.container.InputContainer, stream: av.VideoStream, info: ClipInfo
                ) -> Iterator[Frame]:
        """Frames in order; seeks ahead when skip_until allows. Indices come from timestamps
        (time x nominal rate), so they are the same whether or not the reader sought."""
        start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0
        last_time, sought, reached = -1.0, -1.0, -1.0  # reached: the latest time decoded
        rate = Fraction(info.fps).limit_denominator(1001) if info.fps else Fraction(0)
        gap = max(MIN_GAP_SECONDS, GAP_FRAMES / info.fps) if info.fps else MIN_GAP_SECONDS
        while True:
            restart = False
            try:
                decoded = container.decode(stream)
                for frame in decoded if self.seek_seconds else decoded_ahead(decoded):
                    self.decoded += 1
                    time = float(frame.time - start) if frame.time is not None else self.decoded / max(info.fps, 1)
                    if not self.seek_seconds and reached >= 0 and time - reached > gap:  # a reader that
                        self.gaps.append((reached, time))  # seeks or skips frames leaves gaps of its own
                    reached = max(reached, time)
                    if self.seek_seconds and rate:
                        self._skip_unreferenced(stream, time)
                    if time <= last_time:
                        continue  # re-decoded after a seek landed before where we were
                    if time < self.wanted_from:
                        if self._seek_worth_it(time, sought):
                            sought = self.wanted_from
                            container.seek(int((self.wanted_from + start) / stream.time_base), stream=stream,
                                           backward=True)
                            restart = True
                            break
                        continue
                    last_time = time
                    index = round(time * rate) if rate else self.decoded - 1
                    yield Frame(int(index), time, frame, self.reformatter)
            except av.FFmpegError as exc:
                # a packet the decoder refuses ends the decode loop, not the clip: FFmpeg's own
                # command line goes on past it, and so does a new loop (a 10 s MKV with 100 bad
                # bytes at 7 s lost its last 4 s). Bounded, for a file that fails at every packet.
                self.skipped += 1
                if self.skipped > MAX_SKIPPED_PACKETS:
                    raise ClipError("corrupt_clip", f"decoding stopped: {_reason(exc)} "
                                                    f"({self.skipped} damaged packets)") from exc
                restart = True
            if not restart:
                break
        if info.duration and reached >= 0 and reached + max(1.0, 0.1 * info.duration) < info.duration:
            raise ClipError("truncated_clip", f"frames end at {reached:.2f} s of {info.duration:.2f} s: "
                                              "the file is cut short")

    def _skip_unreferenced(self, stream: av.VideoStream, time: float) -> None:
        """Far before the next wanted frame, let FFmpeg skip frames that no other frame refers
        to (most B-frames): nothing needs them. Near it, decode every frame again, so the wanted
        frame is the one a full decode would give. The setting reaches only packets sent from now
        on, so "near" must cover the frames already in flight: one per decoder thread, and the
        reordering delay twice (frames held back for it, and packets sent ahead in decode order),
        plus two to spare. 9 frames with 2 cores and x264's B-frames."""
        ctx = stream.codec_context
        threads = ctx.thread_count or MAX_DECODER_THREADS
        reorder = getattr(ctx, "reorder_depth", MAX_REORDER_DEPTH)  # not in every PyAV
        margin = (threads + 2 * reorder + 2) / float(stream.average_rate or stream.guessed_rate or 1)
        ctx.skip_frame = "NONREF" if time < self.wanted_from - margin else "DEFAULT"

    def _seek_worth_it(self, time: float, sought: float) -> bool:
        return bool(self.seek_seconds) and self.wanted_from - time >= self.seek_seconds and sought < self.wanted_from

    # ---- animations ---------------------------------------------------------------------
    def _animation(self) -> Iterator[ClipInfo | Frame]:
        try:
            image = Image.open(self._file())
        except Image.DecompressionBombError as exc:  # probe refused such a file first; bytes as a clip's too
            raise ClipError("frame_too_large", str(exc)) from exc
        except DECODE_ERRORS as exc:
            raise ClipError("corrupt_clip", f"{type(exc).__name__}: {exc}") from exc
        with image:
            if image.width * image.height > self.max_pixels:
                raise ClipError("frame_too_large", f"{image.width}x{image.height} frames > {self.max_pixels} pixels")
            fmt = image.format or ""
            yield ClipInfo(fmt, fmt, image.width, image.height, 0.0, 0.0)
            try:
                for index, frame in enumerate(ImageSequence.Iterator(image)):
                    self.decoded += 1
                    picture = frame.convert("RGB")  # loads the frame: WebP states its duration only then
                    time = self.shown_seconds
                    # browsers show frames without a duration for 0.1 s
                    self.shown_seconds += float(frame.info.get("duration") or 0) / 1000 or 0.1
                    self.shown_frames += 1
                    if time >= self.wanted_from:
                        yield Frame(index, time, picture)
                # only the frames say how long an animation runs: its rate and length, once known
                yield ClipInfo(fmt, fmt, image.width, image.height, self.frame_rate(), round(self.shown_seconds, 6))
            except Image.DecompressionBombError as exc:  # a later frame's own size, checked as it is reached
                raise ClipError("frame_too_large", f"frame {self.decoded}: {exc}; the frames before stay") from exc
            except DECODE_ERRORS as exc:
                raise ClipError("truncated_clip", f"frames end after {self.decoded}: {type(exc).__name__}: {exc}"
                                ) from exc


def decoded_ahead(frames: Iterator[av.VideoFrame], depth: int = 8) -> Iterator[av.VideoFrame]:
    """The frames, decoded by a thread of their own up to `depth` frames ahead of the caller.

    PyAV releases the GIL while FFmpeg decodes, so decoding goes on while this thread hashes,
    converts and encodes the frames it keeps; without it, FFmpeg's frame threads stall whenever
    the caller is busy (bench/frames.py measures both against a bare decode loop)."""
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> None:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.05)
                return
            except Full:
                continue

    def decode() -> None:
        try:
            for frame in frames:
                put(frame)
                if stop.is_set():
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, raised there
            put(exc)

    worker = threading.Thread(target=decode, name="clip-decode", daemon=True)
    worker.start()
    try:
        while (item := queue.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()  # the caller stopped early, or is done: the worker ends before the file closes
        worker.join()


_END = object()


def _reason(exc: Exception) -> str:
    """FFmpeg's message without the file name (a BytesIO's address differs on every run)."""
    return getattr(exc, "strerror", None) or str(exc)
