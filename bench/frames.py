"""Frame selection from clips against the decode floor of the same clips, in the same run.

Makes anime-episode-like clips from the bundled sample (a background with sprites, panned
slowly, a hard cut every few seconds; 1280x720 H.264 with x264's default key frames, which
fall on scene cuts), then times, alternating the sides `--repeats` times (median reported):
  - floor: PyAV decoding every frame of every clip (frame threads on, nothing else done),
  - select: udfs.ingest.clips.ingest_clip with the default [ingest.frames] rules (scene cuts,
    at most 2 candidate frames a second, pHash against the last kept frame, JPEG into a frame
    store): the whole per-clip work of ingest;
  - sparse: scene detection off and one frame every 5 s, decoding everything (seek_seconds=0)
    against seeking to the key frame before each wanted frame (seek_seconds=2).
Both sides run in this one process (PyAV's decoder threads on both), so wall and CPU time are
compared on equal terms.

    python bench/frames.py --quick
    RESULT frames_select_vs_decode_floor ratio=<floor time / select time> goal=0.8 met=yes|no
    RESULT frames_seek_speedup ratio=<linear time / seeking time> goal=2.0 met=yes|no
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from ingest import sample_art  # noqa: E402  (bench/ingest.py: the sample's sprites and backgrounds)

from store.workspace import Workspace  # noqa: E402
from udfs.ingest.clips import ingest_clip  # noqa: E402
from udfs.ingest.frame_selection import FrameRules  # noqa: E402
from udfs.ingest.frame_store import FrameStore  # noqa: E402

SIZE = (1280, 720)
FPS = 24
SCENE_SECONDS = 4
PAN_PIXELS_PER_SECOND = 40
SELECT_GOAL, SEEK_GOAL = 0.8, 2.0


def scene(rng: random.Random, sprites: list[Image.Image], backgrounds: list[Image.Image]) -> np.ndarray:
    """A picture wider than the frame (the pan slides over it): a background and 1-2 sprites."""
    width = SIZE[0] + PAN_PIXELS_PER_SECOND * SCENE_SECONDS
    canvas = rng.choice(backgrounds).resize((width, SIZE[1]), Image.BILINEAR)
    for _ in range(rng.randint(1, 2)):
        sprite = rng.choice(sprites)
        scale = rng.uniform(0.6, 0.95) * SIZE[1] / sprite.height
        sprite = sprite.resize((max(1, int(sprite.width * scale)), max(1, int(sprite.height * scale))))
        canvas.paste(sprite, (rng.randint(0, max(0, width - sprite.width)), SIZE[1] - sprite.height), sprite)
    return np.asarray(canvas)


def write_clip(path: Path, seconds: int, rng: random.Random, art: tuple[list, list]) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = SIZE[0], SIZE[1], "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20"}
        for start in range(0, seconds, SCENE_SECONDS):
            wide = scene(rng, *art)
            for i in range(min(SCENE_SECONDS, seconds - start) * FPS):
                x = i * PAN_PIXELS_PER_SECOND // FPS
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(wide[:, x:x + SIZE[0]]), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def decode_floor(clips: list[Path]) -> int:
    frames = 0
    for clip in clips:
        with av.open(str(clip)) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            for _ in container.decode(stream):
                frames += 1
    return frames


def select(clips: list[Path], ws: Workspace, rules: FrameRules) -> tuple[int, int]:
    """(frames kept, frames decoded) by the ingest code with `rules`."""
    kept = decoded = 0
    for i, clip in enumerate(clips):
        store = FrameStore(ws, f"bench-{i}")
        result = ingest_clip(f"bench/{clip.stem}", str(clip), False, rules, 1 << 40, store)
        store.close()
        assert not result.problems, result.problems
        kept, decoded = kept + len(result.frames), decoded + result.clip["frames_seen"]
    return kept, decoded


def timed(fn, *args) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clips", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=60, help="length of each clip")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2 clips of 24 s (under 3 minutes on 2 cores)")
    args = parser.parse_args()
    if args.quick:
        args.clips, args.seconds = 2, 24
    rng = random.Random(0)
    art = sample_art()
    with tempfile.TemporaryDirectory() as tmp:
        clips = [Path(tmp) / f"episode{i}.mp4" for i in range(args.clips)]
        for clip in clips:
            write_clip(clip, args.seconds, rng, art)
        ws = Workspace(str(Path(tmp) / "ws"))
        default, sparse = FrameRules(), FrameRules(scene_threshold=0, max_fps=0.2)
        linear = FrameRules(scene_threshold=0, max_fps=0.2, seek_seconds=0)
        sides = {"floor": (decode_floor, clips), "select": (select, clips, ws, default),
                 "linear": (select, clips, ws, linear), "seek": (select, clips, ws, sparse)}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        outputs: dict[str, object] = {}
        for _ in range(args.repeats):
            for name, (fn, *fn_args) in sides.items():
                wall, cpu, outputs[name] = timed(fn, *fn_args)
                times[name].append((wall, cpu))
    report(args, times, outputs)


def report(args: argparse.Namespace, times: dict[str, list[tuple[float, float]]], outputs: dict) -> None:
    wall = {name: statistics.median(t[0] for t in ts) for name, ts in times.items()}
    cpu = {name: statistics.median(t[1] for t in ts) for name, ts in times.items()}
    seconds = args.clips * args.seconds
    print(f"{args.clips} clips x {args.seconds} s, {SIZE[0]}x{SIZE[1]} H.264 {FPS} fps; median of {args.repeats}")
    print(f"decode floor: {outputs['floor']} frames in {wall['floor']:.2f} s wall, {cpu['floor']:.2f} s CPU "
          f"({seconds / wall['floor']:.1f} clip-seconds/s)")
    kept, decoded = outputs["select"]
    print(f"select (defaults): {kept} frames kept of {decoded} decoded in {wall['select']:.2f} s wall, "
          f"{cpu['select']:.2f} s CPU ({kept / wall['select']:.1f} kept frames/s, "
          f"{seconds / wall['select']:.1f} clip-seconds/s)")
    for name in ("linear", "seek"):
        kept, decoded = outputs[name]
        print(f"one frame / 5 s, {name}: {kept} kept of {decoded} decoded in {wall[name]:.2f} s wall, "
              f"{cpu[name]:.2f} s CPU")
    ratio = wall["floor"] / wall["select"]
    print(f"select vs floor per CPU second: {cpu['floor'] / cpu['select']:.2f}")
    print(f"RESULT frames_select_vs_decode_floor ratio={ratio:.2f} goal={SELECT_GOAL} "
          f"met={'yes' if ratio >= SELECT_GOAL else 'no'}")
    speedup = wall["linear"] / wall["seek"]
    print(f"RESULT frames_seek_speedup ratio={speedup:.2f} goal={SEEK_GOAL} "
          f"met={'yes' if speedup >= SEEK_GOAL else 'no'}")


if __name__ == "__main__":
    main()
