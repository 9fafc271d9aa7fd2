"""Videos and animations: their kept frames become images rows keyed `<clip>/f<index>`."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from itertools import combinations
from pathlib import Path

import av
import numpy as np
import pyarrow.parquet as pq
import pytest
from clip_data import scene_picture, slow_pan, three_scenes, write_gif, write_video
from hostile_data import write_tar
from kill_mid_run import booruset, kill_when
from PIL import Image

from jobs import ingest
from jobs.config import load_config
from store.workspace import Workspace
from udfs.ingest.clips import ClipResult, ingest_clip
from udfs.ingest.frame_selection import FrameRules
from udfs.ingest.frame_store import FrameStore


def select(tmp_path: Path, clip: Path, animated: bool = False, max_pixels: int = 10**9, **rules) -> ClipResult:
    ws = Workspace(str(tmp_path / "ws"))
    store = FrameStore(ws, "unit")
    result = ingest_clip("in/clip", str(clip), animated, FrameRules(**rules), max_pixels, store)
    store.close()
    return result


def distance(a: dict, b: dict) -> int:
    return (a["phash"] ^ b["phash"]).bit_count()


# ---- frame selection on real encoded clips ----------------------------------------------------
def test_three_scenes_give_one_frame_each_and_no_near_identical_frames(tmp_path):
    clip = write_video(tmp_path / "scenes.mp4", three_scenes(seconds=3.0, fps=12))
    result = select(tmp_path, clip)
    assert result.problems == []
    assert result.clip["slices"] == 3
    per_slice = [sum(f["slice"] == s for f in result.frames) for s in range(3)]
    assert all(1 <= n <= 2 for n in per_slice), per_slice
    # each scene starts at its cut: frames 0, 36 and 72 of a 12 fps clip with 3 s scenes
    assert [f["key"] for f in result.frames][::1][:1] == ["in/clip/f000000"]
    assert {f["frame"] for f in result.frames} >= {0, 36, 72}
    assert all(distance(a, b) > 10 for a, b in combinations(result.frames, 2))
    assert result.clip["frames_seen"] == 108 and result.clip["frames_kept"] == len(result.frames)


def test_kept_frames_are_stored_once_with_their_hash(tmp_path):
    clip = write_video(tmp_path / "scenes.webm", three_scenes(seconds=1.0, fps=12), codec="libvpx-vp9")
    result = select(tmp_path, clip)
    with tarfile.open(result.frames[0]["source"]) as tar:
        stored = {m.name: tar.extractfile(m).read() for m in tar}
        headers = {m.name: m.offset for m in tar}
    assert sorted(stored) == sorted(f["member"] for f in result.frames)
    assert {f["member"]: f["member_offset"] for f in result.frames} == headers  # where later jobs seek
    for frame in result.frames:
        data = stored[frame["member"]]
        assert hashlib.sha256(data).hexdigest() == frame["sha256"] and len(data) == frame["bytes"]
        assert Image.open(io.BytesIO(data)).size == (frame["width"], frame["height"]) == (320, 240)


def test_the_similarity_threshold_decides_on_a_slow_pan(tmp_path):
    clip = write_video(tmp_path / "pan.mp4", slow_pan(seconds=6.0))
    kept = {d: select(tmp_path, clip, similarity_distance=d).frames for d in (4, 10, 20)}
    assert len(kept[4]) > len(kept[10]) > len(kept[20]) >= 1
    assert {select(tmp_path, clip).clip["slices"]} == {1}  # a pan is no scene cut
    # selection compares its quick OpenCV hash (clip_frames.quick_hash); each frame's stored pHash
    # (Pillow's reduction and Lanczos) is within 4 bits of it, so two kept frames more than 10
    # apart by the first are more than 10 - 2 * 4 apart by the second: never near-identical
    for a, b in zip(kept[10], kept[10][1:], strict=False):
        assert distance(a, b) > 10 - 2 * 4


def test_a_gif_with_repeated_frames_keeps_each_picture_once_in_a_row(tmp_path):
    a, b = scene_picture(1), scene_picture(2)
    nudged = [a.copy() for _ in range(2)] + [b.copy()]
    for i, picture in enumerate(nudged):
        picture[i, i] = 255 - picture[i, i]  # one pixel: Pillow writes the frame, pHash cannot see it
    gif = write_gif(tmp_path / "repeats.gif", [a, nudged[0], nudged[1], b, nudged[2], a])
    result = select(tmp_path, gif, animated=True, max_fps=0, scene_threshold=0)
    assert result.clip["frames_seen"] == 6
    assert [f["frame"] for f in result.frames] == [0, 3, 5]
    assert [round(f["frame_time"], 2) for f in result.frames] == [0.0, 0.3, 0.5]


def test_seeking_to_key_frames_keeps_the_same_frames_with_less_decoding(tmp_path):
    clip = write_video(tmp_path / "scenes.mp4", three_scenes(seconds=4.0, fps=12))
    sparse = {"scene_threshold": 0, "max_fps": 0.25}
    linear = select(tmp_path, clip, seek_seconds=0, **sparse)
    sought = select(tmp_path, clip, seek_seconds=1.0, **sparse)
    assert [f["key"] for f in sought.frames] == [f["key"] for f in linear.frames]
    assert [f["key"] for f in linear.frames] == ["in/clip/f000000", "in/clip/f000048", "in/clip/f000096"]
    assert sought.clip["frames_seen"] < linear.clip["frames_seen"] == 144


def test_seeking_gives_the_frames_of_a_full_decode_when_they_fall_between_key_frames(tmp_path):
    """Wanted times off the key frames, in a pan whose B-frames the reader skips far from each
    wanted frame: the frames it hands out near one are the ones a full decode gives."""
    clip = write_video(tmp_path / "pan.mp4", slow_pan(seconds=12.0, fps=24), fps=24)
    for rate in (0.3, 0.45, 0.7):
        sparse = {"scene_threshold": 0, "max_fps": rate, "similarity_distance": 0}
        linear = select(tmp_path, clip, seek_seconds=0, **sparse)
        sought = select(tmp_path, clip, seek_seconds=0.5, **sparse)
        assert [f["key"] for f in sought.frames] == [f["key"] for f in linear.frames], rate
        assert [f["phash"] for f in sought.frames] == [f["phash"] for f in linear.frames], rate
        assert sought.clip["frames_seen"] < linear.clip["frames_seen"], rate
        assert len(linear.frames) >= int(12 * rate), rate


def test_forced_slices_cut_a_clip_without_scene_changes(tmp_path):
    clip = write_video(tmp_path / "pan.mp4", slow_pan(seconds=6.0))
    result = select(tmp_path, clip, slice_seconds=2.0, similarity_distance=64)
    assert result.clip["slices"] == 3
    assert [f["slice"] for f in result.frames] == [0, 1, 2]  # min_frames_per_slice keeps one each


def test_frame_bounds(tmp_path):
    clip = write_video(tmp_path / "pan.mp4", slow_pan(seconds=6.0))
    capped = select(tmp_path, clip, max_frames_per_clip=2, similarity_distance=0)
    assert len(capped.frames) == 2 and [k for k, _ in capped.problems] == ["too_many_frames"]
    small = select(tmp_path, clip, min_side=300)
    assert small.frames == [] and [k for k, _ in small.problems] == ["frames_too_small"]
    resized = select(tmp_path, clip, max_side=160)
    assert {(f["width"], f["height"]) for f in resized.frames} == {(160, 120)}
    huge = select(tmp_path, clip, max_pixels=320 * 240 - 1)
    assert huge.frames == [] and [k for k, _ in huge.problems] == ["frame_too_large"]
    assert huge.clip["frames_seen"] == 0  # refused before decoding


def test_a_zero_byte_video_says_so(tmp_path):
    """It was a corrupt_clip "no container FFmpeg can read: Invalid data found when processing
    input", as a video of random bytes is; an image of no bytes is an empty_file."""
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    on_disk = select(tmp_path, empty)
    in_memory = ingest_clip("in/clip", b"", False, FrameRules(), 10**9, FrameStore(Workspace(str(tmp_path / "w")), "u"))
    for result in (on_disk, in_memory):
        assert result.problems == [("empty_file", "zero-byte video")] and result.frames == []
        assert result.clip["frames_seen"] == 0


def damaged(clip: Path, at: float, offset: int, value: bytes, name: str) -> Path:
    """`clip` with `value` written `offset` bytes into the first key frame packet at or after `at`
    seconds (in an MKV a packet starts with its block header: track, time, flags, 4 bytes; then
    the H.264 NAL length). At the packet's place in the file: the same damage whatever x264 wrote."""
    with av.open(str(clip)) as container:
        packet = next(p for p in container.demux(container.streams.video[0])
                      if p.pts is not None and p.pts * p.time_base >= at and p.is_keyframe)
        where = packet.pos + offset
    data = bytearray(clip.read_bytes())
    data[where:where + len(value)] = value
    out = clip.with_name(name)
    out.write_bytes(bytes(data))
    return out


def test_a_damaged_stretch_in_the_middle_of_a_video_is_reported(tmp_path):
    """A 10 s MKV (a key frame every 2 s) whose key frame at 4 s has a zeroed block header: FFmpeg
    skips the frames up to the next key frame (2 s) and decodes on, with no error; the frames
    before and after stay, and the loss is a frames_missing row. The whole clip has none."""
    clip = write_video(tmp_path / "pan.mkv", slow_pan(seconds=10.0, fps=12))
    assert select(tmp_path, clip).problems == []
    gap = select(tmp_path, damaged(clip, 4.0, 0, bytes(4), "gap.mkv"))
    assert [kind for kind, _ in gap.problems] == ["frames_missing"] and "stretches without frames" in gap.problems[0][1]
    assert gap.clip["frames_seen"] < 110 and gap.clip["errors"] == 1
    assert max(f["frame_time"] for f in gap.frames) > 8.0  # the frames after the hole are there
    # 0xFF as the NAL length's first byte of the key frame at 6 s: a NAL longer than its packet,
    # which the decoder refuses. Decoding stopped there (corrupt_clip) and lost the last 4 s.
    refused = select(tmp_path, damaged(clip, 6.0, 4, b"\xff", "refused.mkv"))
    assert [kind for kind, _ in refused.problems] == ["frames_missing"]
    assert "1 damaged packets skipped" in refused.problems[0][1]
    assert max(f["frame_time"] for f in refused.frames) > 8.0


def test_an_animation_stopped_early_keeps_the_frame_rate_of_the_frames_it_read(tmp_path):
    """Only its frames say how fast an animation runs; a read stopped at max_decoded_frames, or by
    a file cut short, still gives the rate of the frames it decoded (it was 0), and no length."""
    gif = write_gif(tmp_path / "wave.gif", [scene_picture(i) for i in range(8)], duration_ms=50)
    whole = select(tmp_path, gif, animated=True)
    assert (whole.clip["fps"], whole.clip["duration"], whole.clip["frames_seen"]) == (20.0, 0.4, 8)
    stopped = select(tmp_path, gif, animated=True, max_decoded_frames=3)
    assert [k for k, _ in stopped.problems] == ["too_many_frames"]
    assert (stopped.clip["fps"], stopped.clip["duration"]) == (20.0, 0.0)
    data = gif.read_bytes()
    for share in (0.3, 0.5, 0.7, 0.9):  # cut inside a frame: that frame does not count
        (tmp_path / "cut.gif").write_bytes(data[:int(len(data) * share)])
        cut = select(tmp_path, tmp_path / "cut.gif", animated=True)
        assert [k for k, _ in cut.problems] == ["truncated_clip"] and cut.clip["fps"] == 20.0, share


# ---- the ingest job on a folder of clips ------------------------------------------------------
def audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        samples = np.zeros((1, 1024), np.float32)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(samples, format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def make_clip_folder(folder: Path) -> Path:
    folder.mkdir()
    write_video(folder / "scenes.mp4", three_scenes(seconds=2.0))
    (folder / "scenes.txt").write_text("character:eileen, 1girl, school_uniform")
    (folder / "scenes.caption").write_text("A girl in a school uniform.")
    write_video(folder / "episode.mkv", three_scenes(seconds=1.0))
    a, b = scene_picture(4), scene_picture(5)
    write_gif(folder / "wave.gif", [a, b, a, b], duration_ms=600)  # 4 scenes of 0.6 s
    (folder / "wave.tags").write_text("2girls waving")
    c, d = Image.fromarray(scene_picture(6)), Image.fromarray(scene_picture(7))
    c.save(folder / "blink.png", save_all=True, append_images=[d, c], duration=600)  # APNG
    c.save(folder / "blink.webp", save_all=True, append_images=[d, c], duration=600)  # second picture: extra_image
    c.save(folder / "turn.webp", save_all=True, append_images=[d], duration=[600, 600])
    long = write_video(folder / "long.webm", three_scenes(seconds=3.0), codec="libvpx-vp9").read_bytes()
    (folder / "long.webm").write_bytes(long[: len(long) // 2])  # cut short: the first frames stay
    (folder / "header.webm").write_bytes(long[:600])  # the header and no frame
    (folder / "noise.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
    audio_only(folder / "voice.mp4")
    Image.fromarray(scene_picture(9)).save(folder / "still.png")
    return folder


def run_ingest(folder: Path, ws_path: Path, *extra: str):
    cfg = load_config(None, [f'workspace.path="{ws_path}"', f'ingest.inputs=["{folder}"]', *extra])
    ws = Workspace(cfg["workspace"]["path"])
    return ingest.run(cfg, ws), ws


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, ray_local):
    tmp = tmp_path_factory.mktemp("clips")
    folder = make_clip_folder(tmp / "in")
    summary, ws = run_ingest(folder, tmp / "ws")
    return folder, summary, ws


def rows_by_key(ws: Workspace, table: str) -> dict[str, dict]:
    return {r["key"]: r for r in ws.read_table(table).to_pylist()}


def test_every_clip_is_accounted_for(clip_folder):
    _, summary, ws = clip_folder
    clips = rows_by_key(ws, "clips")
    assert sorted(clips) == ["in/blink", "in/episode", "in/header", "in/long", "in/noise", "in/scenes", "in/turn",
                             "in/voice", "in/wave"]
    images = rows_by_key(ws, "images")
    frames = [r for r in images.values() if r["clip"]]
    assert all(r["key"].startswith(f"{r['clip']}/f") and r["key"].endswith(f"{r['frame']:06d}") for r in frames)
    for key, clip in clips.items():
        assert clip["frames_kept"] == sum(r["clip"] == key for r in frames), key
    assert images["in/still"]["clip"] is None
    errors = {(r["key"], r["kind"]): r["dropped"] for r in ws.read_table("errors").to_pylist()}
    assert errors == {("in/long", "truncated_clip"): False, ("in/noise", "corrupt_clip"): True,
                      ("in/voice", "no_video_stream"): True, ("in/header", "empty_clip"): True,
                      ("in/blink", "extra_image"): False}
    assert clips["in/long"]["frames_kept"] >= 1
    assert clips["in/scenes"]["slices"] == 3 and clips["in/scenes"]["codec"] == "h264"
    assert clips["in/wave"]["format"] == "GIF" and clips["in/wave"]["frames_kept"] == 4
    wave = clips["in/wave"]  # 4 frames of 0.6 s: an animation's rate and length come from its frames
    assert wave["duration"] == pytest.approx(2.4) and wave["fps"] == pytest.approx(1 / 0.6, abs=1e-3)
    assert (clips["in/blink"]["format"], clips["in/blink"]["frames_kept"]) == ("PNG", 3)  # APNG
    assert (clips["in/turn"]["format"], clips["in/turn"]["frames_kept"]) == ("WEBP", 2)
    assert f"1 images + 6 clips ({len(frames)} frames) + 3 dropped samples = 10 samples seen" in summary.render()


def test_the_clips_sidecar_tags_and_texts_reach_every_frame(clip_folder):
    _, _, ws = clip_folder
    frames = [r["key"] for r in ws.read_table("images").to_pylist() if r["clip"] == "in/scenes"]
    assert len(frames) >= 3
    tags = ws.read_table("source_tags").to_pylist()
    for key in frames:
        mine = sorted((t["position"], t["tag"], t["category"], t["origin"]) for t in tags if t["key"] == key)
        assert mine == [(0, "eileen", "character", "clip"), (1, "1girl", "general", "clip"),
                        (2, "school_uniform", "general", "clip")]
    texts = {(r["key"], r["text"]) for r in ws.read_table("source_text").to_pylist()}
    assert {(k, "A girl in a school uniform.") for k in frames} <= texts


def test_adding_a_file_changes_no_frame_key(clip_folder, tmp_path):
    folder, _, ws = clip_folder
    before = rows_by_key(ws, "images")
    Image.fromarray(scene_picture(10)).save(folder / "another.png")
    try:
        _, again = run_ingest(folder, Path(ws.root))
    finally:
        (folder / "another.png").unlink()
    after = rows_by_key(again, "images")
    assert set(after) - set(before) == {"in/another"}
    # the animations share a folder chunk with the new file: that chunk is redone and their
    # frames stored again (a new frame store); a video is a unit of its own and is not touched
    moved = {k for k in before if before[k]["source"] != after[k]["source"]}
    assert moved and all(before[k]["clip"] in ("in/wave", "in/blink", "in/turn") for k in moved)
    assert {k: {**v, "source": ""} for k, v in after.items() if k != "in/another"} == \
        {k: {**v, "source": ""} for k, v in before.items()}
    assert not [r for r in again.read_table("errors").to_pylist() if r["kind"] == "removed_from_input"]
    # the frame store of the replaced chunk goes when a writing job starts after the grace that
    # readers of the previous generation get
    again.retired_grace_s = 0
    again.begin_job()
    named = {Path(r["source"]).name for r in again.read_table("images").to_pylist() if r["clip"]}
    assert {p.name for p in (Path(ws.root) / "frames").glob("*.tar")} == named


def test_a_video_member_of_a_shard_becomes_frames_under_the_shards_keys(tmp_path, ray_local):
    clip = write_video(tmp_path / "op.mp4", three_scenes(seconds=1.0)).read_bytes()
    write_tar(tmp_path / "shard-000.tar", [("anime/op.mp4", clip), ("anime/op.txt", b"1girl, opening"),
                                           ("anime/big.mp4", clip)])
    summary, ws = run_ingest(tmp_path / "shard-000.tar", tmp_path / "ws", "ingest.max_member_bytes=2000")
    assert ws.read_table("clips").num_rows == 0  # both videos are larger than max_member_bytes
    assert {r["kind"] for r in ws.read_table("errors").to_pylist()} == {"too_large"}
    summary, ws = run_ingest(tmp_path / "shard-000.tar", tmp_path / "ws2")
    frames = sorted(r["key"] for r in ws.read_table("images").to_pylist())
    assert frames[:3] == ["shard-000/anime/big/f000000", "shard-000/anime/big/f000012", "shard-000/anime/big/f000024"]
    assert [k for k in frames if k.startswith("shard-000/anime/op/")] == [
        "shard-000/anime/op/f000000", "shard-000/anime/op/f000012", "shard-000/anime/op/f000024"]
    tags = {(r["key"], r["tag"]) for r in ws.read_table("source_tags").to_pylist()}
    assert ("shard-000/anime/op/f000012", "opening") in tags and not any("big" in k for k, _ in tags)


# ---- resume --------------------------------------------------------------------------------
def test_ingest_killed_mid_clip_redoes_only_that_clip(tmp_path, ray_local):
    folder = tmp_path / "in"
    folder.mkdir()
    n_clips = 8  # more than the two units in flight, which may still commit as the kill lands
    for i in range(n_clips):  # 12 s each: long enough to be caught mid-decode
        frames = [picture for s in range(4) for picture in [scene_picture(10 * i + s, (640, 480))] * 72]
        write_video(folder / f"clip{i}.mp4", frames, fps=24)
        (folder / f"clip{i}.txt").write_text(f"tag_{i}, 1girl")

    _, ref = run_ingest(folder, tmp_path / "ref")  # uninterrupted, in this process

    victim = booruset("ingest", "-w", str(tmp_path / "ws"), "-i", str(folder))
    state, frames_dir = tmp_path / "ws" / "state" / "ingest", tmp_path / "ws" / "frames"
    mid_clip = lambda: len(list(state.glob("*.json"))) >= 1 and any(frames_dir.glob(".tmp-*"))  # noqa: E731
    kill_when(victim, mid_clip, poll_s=0.005)
    committed = len(list(state.glob("*.json")))
    assert committed < n_clips

    again = booruset("ingest", "-w", str(tmp_path / "ws"), "-i", str(folder))
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out
    # a Ray worker outlives the killed driver for an instant and may commit the unit it holds
    done_before = int(re.search(rf"{n_clips} units, (\d+) done before", out).group(1))
    assert committed <= done_before < n_clips, out
    ws = Workspace(str(tmp_path / "ws"))
    for name in ("images", "clips", "source_tags", "errors"):
        assert sorted_rows(ws, name) == sorted_rows(ref, name), name
    stored = {p.name: p.read_bytes() for p in frames_dir.glob("*.tar")}
    assert stored == {p.name: p.read_bytes() for p in (tmp_path / "ref" / "frames").glob("*.tar")}
    assert len(stored) == n_clips


def sorted_rows(ws: Workspace, name: str) -> list[dict]:
    """The rows, with frame stores named inside the workspace (the two workspaces differ)."""
    rows = [{**r, **({"source": r["source"].replace(ws.root, "WS")} if "source" in r else {})}
            for r in ws.read_table(name).to_pylist()]
    return sorted(rows, key=lambda r: (r["key"], str(r)))


# ---- end to end ----------------------------------------------------------------------------
def test_run_on_a_folder_of_clips_exports_frames_with_their_clips_tags(tmp_path):
    import webdataset as wds

    folder = tmp_path / "in"
    folder.mkdir()
    write_video(folder / "scenes.mp4", three_scenes(seconds=2.0))
    (folder / "scenes.txt").write_text("character:eileen, 1girl, school_uniform")
    episode = [picture for seed in (21, 22) for picture in [scene_picture(seed)] * 24]
    write_video(folder / "episode.webm", episode, codec="libvpx-vp9")
    (folder / "episode.txt").write_text("character:lucy, 1girl, glasses")
    ws, out = tmp_path / "ws", tmp_path / "out"
    run = booruset("run", "-w", str(ws), "-i", str(folder), "--out", str(out))
    log, _ = run.communicate(timeout=900)
    assert run.returncode == 0, log[-3000:]
    assert "rows out: images 5, clips 2, frames 5" in log, log[-3000:]

    samples = list(wds.WebDataset(sorted(str(p) for p in (out / "webdataset").glob("*.tar")), shardshuffle=False))
    metas = [json.loads(s["json"]) for s in samples]
    assert sorted(m["key"] for m in metas) == ["in/episode/f000000", "in/episode/f000024", "in/scenes/f000000",
                                               "in/scenes/f000024", "in/scenes/f000048"]
    for meta in metas:
        clip = meta["key"].rsplit("/", 1)[0]
        assert meta["clip"] == clip
        assert ("eileen" if clip == "in/scenes" else "lucy") in meta["tags"]
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    assert {(m["key"], m["clip"], m["frame_time"]) for m in manifest} == {
        (m["key"], m["clip"], m["frame_time"]) for m in metas}
    assert {m["frame_time"] for m in manifest} == {0.0, 2.0, 4.0}  # 12 fps: frames 0, 24 and 48

    one_clip = booruset("export", "-w", str(ws), "--out", str(tmp_path / "scenes"), "--where", "clip = 'in/scenes'")
    log, _ = one_clip.communicate(timeout=900)
    assert one_clip.returncode == 0, log[-3000:]
    keys = pq.read_table(tmp_path / "scenes" / "manifest.parquet").column("key").to_pylist()
    assert sorted(keys) == ["in/scenes/f000000", "in/scenes/f000024", "in/scenes/f000048"]


def test_a_batch_that_keeps_no_frames_removes_the_tar_of_a_run_that_did(tmp_path):
    """A batch rewritten with other frame options may keep no frame: its name's old tar, which
    no row names any more, goes (begin_job spares the frame tars of published images parts)."""
    ws = Workspace(str(tmp_path / "ws"))
    store = FrameStore(ws, "u-b00000")
    store.add("in/clip/f000000.jpg", b"jpeg bytes")
    store.close()
    assert Path(store.path).exists()
    FrameStore(ws, "u-b00000").close()
    assert not Path(store.path).exists()


def test_a_clip_folder_on_object_storage_gives_the_clips_of_the_folder_on_disk(tmp_path, ray_local):
    """file:// stands in for object storage, where a video is read whole (on disk it is streamed
    from its file): the same clips, frames and errors."""
    folder = make_clip_folder(tmp_path / "in")
    _, disk = run_ingest(folder, tmp_path / "disk")
    _, uri = run_ingest(folder.as_uri(), tmp_path / "uri")
    for table, columns in (("clips", "key, frames_kept, slices, fps, codec, format"),
                           ("images", "key, sha256, phash, clip, frame"), ("errors", "key, member, kind, dropped")):
        rows = [ws.connect().execute(f"select {columns} from {table} order by all").fetchall() for ws in (disk, uri)]
        assert rows[0] == rows[1] and rows[0], table


def gif_with_a_huge_second_frame() -> bytes:
    """A 64x64 GIF whose second frame's descriptor claims 65535x65535 pixels: Pillow checks
    such a frame only when it seeks to it, after probe has looked at the first."""
    frames = [Image.fromarray(scene_picture(i, (64, 64))).convert("P") for i in range(3)]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:], duration=100)
    data = bytearray(out.getvalue())
    whole_frame = bytes([0x2C, 0, 0, 0, 0, 64, 0, 64, 0])  # an image descriptor: at 0, 0, 64 x 64
    descriptors = [i for i in range(len(data)) if data[i:i + 9] == whole_frame]
    data[descriptors[1] + 5:descriptors[1] + 9] = b"\xff\xff\xff\xff"
    return bytes(data)


def test_a_frame_too_large_met_in_an_animation_keeps_the_frames_before(tmp_path):
    """It raised DecompressionBombError out of ingest and failed the job (Ray retried the unit,
    then gave up)."""
    result = select(tmp_path, write_bytes(tmp_path / "bomb.gif", gif_with_a_huge_second_frame()), animated=True,
                    max_pixels=178956970, similarity_distance=0)
    assert [kind for kind, _ in result.problems] == ["frame_too_large"]
    assert [f["frame"] for f in result.frames] == [0]


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_video_in_a_codec_no_decoder_reads_is_an_unsupported_codec_row(tmp_path):
    """Saying so read the stream's `codec_tag`, which PyAV's streams no longer have: an
    AttributeError that failed the ingest job."""
    clip = write_video(tmp_path / "a.mp4", three_scenes(seconds=1.0))
    unknown = write_bytes(tmp_path / "b.mp4", clip.read_bytes().replace(b"avc1", b"zzzz"))
    result = select(tmp_path, unknown)
    assert [kind for kind, _ in result.problems] == ["unsupported_codec"] and result.frames == []
