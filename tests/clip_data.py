"""Clips made for the tests: videos written with PyAV, animations with Pillow."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image

SIZE = (320, 240)  # width, height


def scene_picture(seed: int, size: tuple[int, int] = SIZE) -> np.ndarray:
    """A smooth, detailed RGB picture (sums of waves): compresses well, hashes far from other seeds."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        wave = np.zeros((height, width), np.float32)
        for _ in range(4):
            fx, fy, phase = rng.uniform(0.005, 0.05), rng.uniform(0.005, 0.05), rng.uniform(0, 6.3)
            wave += np.sin(x * fx + y * fy + phase)
        channels.append(wave)
    picture = np.stack(channels, axis=-1)
    picture = (picture - picture.min()) / (np.ptp(picture) + 1e-6) * 255
    return picture.astype(np.uint8)


def write_video(path: Path, frames: list[np.ndarray], fps: int = 12, codec: str = "libx264") -> Path:
    """Encode RGB frames (all one size) into `path`; the container follows the extension."""
    height, width = frames[0].shape[:2]
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"g": str(fps * 2)}  # a key frame every 2 s, as streaming encoders do
        for array in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def three_scenes(seconds: float = 3.0, fps: int = 12) -> list[np.ndarray]:
    """Three static scenes of `seconds` each: long stretches of identical pictures, two hard cuts."""
    per_scene = int(seconds * fps)
    return [picture for seed in (1, 2, 3) for picture in [scene_picture(seed)] * per_scene]


def slow_pan(seconds: float = 6.0, fps: int = 12, speed: float = 20.0) -> list[np.ndarray]:
    """A window sliding `speed` pixels a second over one wide picture: no cut, steady change."""
    wide = scene_picture(7, (SIZE[0] * 3, SIZE[1]))
    steps = int(seconds * fps)
    return [wide[:, int(i * speed / fps):int(i * speed / fps) + SIZE[0]] for i in range(steps)]


def write_gif(path: Path, frames: list[np.ndarray], duration_ms: int = 100) -> Path:
    pictures = [Image.fromarray(f) for f in frames]
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=duration_ms, loop=0)
    return path
