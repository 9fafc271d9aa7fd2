"""Decode the frames of a clip as a stream: videos with PyAV (FFmpeg), animations with Pillow.

Animated GIF, APNG and WebP go through Pillow, which composes their frames (disposal and
blending) as every viewer does and reads all three; FFmpeg's WebP decoder reads no animation.
Everything else (MP4, WebM, MKV, ...) goes through PyAV, whose wheels bundle FFmpeg.

Only one decoded frame is held at a time: a two-hour episode never sits in memory.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from typing import BinaryIO

import av
import numpy as np
from PIL import Image, ImageSequence

# The small picture scene-cut detection compares (PySceneDetect also works on downscaled frames)
SCENE_WIDTH = 96


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
    """One decoded frame: its index in the clip, its time, and its pixels on demand."""

    def __init__(self, index: int, time: float, source: av.VideoFrame | Image.Image) -> None:
        self.index, self.time, self.source = index, time, source

    def small(self) -> np.ndarray:
        """RGB uint8 at SCENE_WIDTH wide: what scene-cut detection compares."""
        width, height = self.source.width, self.source.height
        size = (SCENE_WIDTH, max(1, round(height * SCENE_WIDTH / max(width, 1))))
        if isinstance(self.source, av.VideoFrame):
            return self.source.reformat(width=size[0], height=size[1], format="rgb24").to_ndarray()
        return np.asarray(self.source.resize(size, Image.Resampling.BOX))

    def image(self) -> Image.Image:
        """The whole frame as an RGB picture."""
        if isinstance(self.source, av.VideoFrame):
            return self.source.to_image()
        return self.source


class ClipReader:
    """Opens one clip and yields its frames in order.

    `skip_until(t)` tells the reader that no frame before time t is wanted: PyAV then seeks to
    the key frame before t when that is at least `seek_seconds` ahead (no decoding in between).
    """

    def __init__(self, data: bytes | str, animated: bool, max_pixels: int, seek_seconds: float = 0.0) -> None:
        self.data, self.animated, self.max_pixels, self.seek_seconds = data, animated, max_pixels, seek_seconds
        self.wanted_from = 0.0
        self.decoded = 0  # frames decoded, including those skipped

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
        if ctx is None or not ctx.codec.name:
            raise ClipError("unsupported_codec", f"no decoder for codec {stream.codec_tag!r}")
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
        last_time, sought = -1.0, -1.0
        rate = Fraction(info.fps).limit_denominator(1001) if info.fps else Fraction(0)
        counted = 0
        while True:
            restart = False
            try:
                for frame in container.decode(stream):
                    self.decoded += 1
                    counted += 1
                    time = float(frame.time - start) if frame.time is not None else counted / max(info.fps, 1)
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
                    index = round(time * rate) if rate else counted - 1
                    yield Frame(int(index), time, frame)
            except av.FFmpegError as exc:
                raise ClipError("corrupt_clip", f"decoding stopped: {_reason(exc)}") from exc
            if not restart:
                break
        if info.duration and last_time >= 0 and last_time + max(1.0, 0.1 * info.duration) < info.duration:
            raise ClipError("truncated_clip", f"frames end at {last_time:.2f} s of {info.duration:.2f} s: "
                                              "the file is cut short")

    def _seek_worth_it(self, time: float, sought: float) -> bool:
        return bool(self.seek_seconds) and self.wanted_from - time >= self.seek_seconds and sought < self.wanted_from

    # ---- animations ---------------------------------------------------------------------
    def _animation(self) -> Iterator[ClipInfo | Frame]:
        try:
            image = Image.open(self._file())
        except (OSError, ValueError, SyntaxError) as exc:
            raise ClipError("corrupt_clip", f"{type(exc).__name__}: {exc}") from exc
        with image:
            if image.width * image.height > self.max_pixels:
                raise ClipError("frame_too_large", f"{image.width}x{image.height} frames > {self.max_pixels} pixels")
            yield ClipInfo(image.format or "", image.format or "", image.width, image.height, 0.0, 0.0)
            time = 0.0
            try:
                for index, frame in enumerate(ImageSequence.Iterator(image)):
                    self.decoded += 1
                    duration = float(frame.info.get("duration") or 0) / 1000
                    if time >= self.wanted_from:
                        yield Frame(index, time, frame.convert("RGB"))
                    time += duration or 0.1  # browsers show frames without a duration for 0.1 s
            except (OSError, ValueError, SyntaxError, EOFError) as exc:
                raise ClipError("truncated_clip", f"frames end after {self.decoded}: {type(exc).__name__}: {exc}"
                                ) from exc


def _reason(exc: Exception) -> str:
    """FFmpeg's message without the file name (a BytesIO's address differs on every run)."""
    return getattr(exc, "strerror", None) or str(exc)
