"""The vllm backend's stream (udfs/caption/caption_stream.py) end to end against a real server on loopback.

No GPU here, so no vLLM engine: the stream runs with its server transport (`caption.vllm_url`,
udfs/caption/vllm_captioner.ChatRequests) against `transformers serve` (tests/served_models.py)
and a misbehaving loopback server (tests/test_caption_openai.py's), the tiny LLaVA taking
the images and SmolLM2 the rewrites. Everything else is what runs with an engine: the request
rows, the image reads, the replies written per unit, the settling actors and the per-unit
commits. The engine processor's config is checked in test_caption_vllm.py.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from kill_mid_run import booruset, kill_after_commits
from PIL import Image

from jobs import caption
from jobs.config import merge

IMAGES = 8  # unit_size 2: 4 units
COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (200, 200, 30), (30, 200, 200), (200, 30, 200),
           (90, 90, 90), (250, 250, 250)]
MISSING = "k/7"  # its member is not in the shard: an unreadable_image error, not a lost unit


def write_shard(path: Path) -> Path:
    with tarfile.open(path, "w") as tar:
        for i, colour in enumerate(COLOURS[:-1]):
            png = io.BytesIO()
            Image.new("RGB", (64 + 8 * i, 48), colour).save(png, format="PNG")
            info = tarfile.TarInfo(f"{i}.png")
            info.size = len(png.getvalue())
            tar.addfile(info, io.BytesIO(png.getvalue()))
    return path


def write_inputs(ws, shard: Path) -> None:
    keys = [f"k/{i}" for i in range(IMAGES)]
    with tarfile.open(shard) as tar:  # images.bytes: the size ingest saw
        sizes = {info.name: info.size for info in tar}
    ws.add_part("images", "u", [
        {"key": k, "source": str(shard), "member": f"{i}.png", "width": 64, "height": 48, "format": "PNG",
         "mode": "RGB", "n_frames": 1, "bytes": sizes.get(f"{i}.png", 1), "sha256": k, "phash": i}
        for i, k in enumerate(keys)])
    ws.add_part("tags", "u", [
        {"key": k, "tag": t, "category": "general", "score": 1.0, "rank": r}
        for k in keys for r, t in enumerate(["1girl", "solo", "red_hair", "smile"])])
    ws.add_part("image_meta", "u", [
        {"key": k, "n_people": 1, "n_characters": 0, "characters": [], "rating": "general"} for k in keys])


def stream_options(url: str) -> dict:
    # target 1.0 (never reached by these short replies): every image takes both attempts, then the
    # rewrite pass: three rounds of the stream.
    return {"backend": "vllm", "vllm_url": url, "vllm_model": "tinyvlm", "api_key_env": "", "max_tokens": 6,
            "temperature": 0.0, "max_attempts": 2, "target": 1.0, "rewrite": "vllm", "rewrite_base_url": url,
            "rewrite_model": "smollm2", "rewrite_api_key_env": "", "rewrite_max_tokens": 6, "unit_size": 2,
            "concurrency": 1, "vllm_batch_size": 4, "vllm_concurrency": 1, "max_retries": 1,
            "tags_from_text": False, "related_tags": False}


def caption_rows(ws) -> list[tuple]:
    rows = ws.read_table("captions").to_pylist()
    return sorted((r["key"], r["attempt"], r["backend"], r["seed"], r["caption"],
                   None if r["accuracy"] is None else round(r["accuracy"], 6), r["accepted"]) for r in rows)


def caption_texts(ws) -> list[tuple]:
    return sorted((r["key"], r["attempt"], r["backend"], r["caption"]) for r in ws.read_table("captions").to_pylist())


def stream_folder(ws) -> list[str]:
    selector = pafs.FileSelector(f"{ws.base}/state/caption-stream", recursive=True, allow_not_found=True)
    return [i.path for i in ws.fs.get_file_info(selector) if i.is_file]


@pytest.fixture(scope="module")
def shard(tmp_path_factory) -> Path:
    return write_shard(tmp_path_factory.mktemp("stream-shard") / "s.tar")


@pytest.fixture(scope="module")
def uninterrupted(transformers_server, ray_local, tmp_path_factory, shard):
    """A whole run of the stream: its workspace and summary."""
    from jobs.config import load_config
    from store.workspace import Workspace

    root = tmp_path_factory.mktemp("stream-ws") / "ws"
    config = load_config(None, [f'workspace.path="{root}"', "ray.num_cpus=2"])
    merge(config, {"caption": stream_options(transformers_server)})
    ws = Workspace(str(root))
    write_inputs(ws, shard)
    return ws, caption.run(config, ws)


def test_stream_captions_loops_back_rewrites_and_commits_every_unit(uninterrupted):
    ws, summary = uninterrupted
    rows = ws.read_table("captions").to_pylist()
    readable = {f"k/{i}" for i in range(IMAGES)} - {MISSING}
    assert {r["key"] for r in rows} == readable
    for key in readable:
        mine = sorted((r for r in rows if r["key"] == key), key=lambda r: r["attempt"])
        assert [(r["attempt"], r["backend"]) for r in mine] == [
            (0, "vllm:tinyvlm"), (1, "vllm:tinyvlm"), (2, "rewrite:smollm2")]
        assert sum(r["accepted"] for r in mine) == 1
        assert all(r["caption"] and 0.0 <= r["accuracy"] <= 1.0 for r in mine)
    errors = [e for e in ws.read_table("errors").to_pylist() if e["key"] == MISSING]
    assert {e["kind"] for e in errors} == {"unreadable_image", "no_caption"}
    assert summary.units_done == IMAGES // 2 and len(ws.done_units("caption")) == IMAGES // 2
    assert stream_folder(ws) == []  # a committed unit's requests and replies are gone


def test_sigkill_mid_stream_loses_only_what_was_in_flight(uninterrupted, transformers_server, tmp_path, shard):
    from store.workspace import Workspace

    reference, _ = uninterrupted
    ws = Workspace(str(tmp_path / "ws"))
    write_inputs(ws, shard)
    sets = [arg for key, value in stream_options(transformers_server).items()
            for arg in ("--set", f"caption.{key}={json.dumps(value)}")]
    # The settling actor SIGKILLs its process group right after its first commit (fault_point):
    # an outside poll cannot stop the job in time, since the units' last replies arrive together
    # and a killed driver's actor goes on settling the units it was handed.
    victim = booruset("caption", "-w", ws.root, *sets, BOORUSET_KILL_AFTER_COMMITS="1")
    output, _ = victim.communicate(timeout=600)
    committed = len(ws.done_units("caption"))
    assert victim.returncode != 0 and 1 <= committed < IMAGES // 2, output
    before = {u: Path(ws.table_dir("captions"), f"{m['parts']['captions'][0]}.parquet").stat().st_mtime_ns
              for u, m in ws.done_units("caption").items()}
    assert stream_folder(ws), "the units in flight kept the replies they had"

    again = booruset("caption", "-w", ws.root, *sets)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    # a settling actor may commit one more unit in the instant the kill takes to reach it
    done_before = int(re.search(r"(\d+) done before", out).group(1))
    assert committed <= done_before < IMAGES // 2, out
    for unit, mtime in before.items():  # the units committed before the kill were not redone
        part = ws.done_units("caption")[unit]["parts"]["captions"][0]
        assert Path(ws.table_dir("captions"), f"{part}.parquet").stat().st_mtime_ns == mtime
    assert caption_rows(ws) == caption_rows(reference)
    assert stream_folder(ws) == []


def openai_options(url: str) -> dict:
    # the openai backend on the same server: text only (SmolLM2), both attempts and the rewrite
    return {"backend": "openai", "base_url": url, "model": "smollm2", "api_key_env": "", "send_images": False,
            "max_tokens": 6, "temperature": 0.0, "max_attempts": 2, "target": 1.0, "max_concurrency": 2,
            "timeout_s": 120.0, "rewrite": "openai", "rewrite_base_url": url, "rewrite_model": "smollm2",
            "rewrite_api_key_env": "", "rewrite_max_tokens": 6, "unit_size": 2, "concurrency": 1,
            "tags_from_text": False, "related_tags": False}


def test_sigkill_of_the_openai_backend_loses_only_the_unit_in_flight(transformers_server, tmp_path, shard):
    """The openai backend commits unit by unit in its actor, one unit after another here (one
    actor): the job's whole session is SIGKILLed from outside once a unit is committed, and the
    rerun captions only the other units and ends with the rows of an uninterrupted run. (With the
    fault point inside this backend's actor instead, the job did not end: it ran into the timeout.)"""
    from store.workspace import Workspace

    sets = [arg for key, value in openai_options(transformers_server).items()
            for arg in ("--set", f"caption.{key}={json.dumps(value)}")]
    reference = Workspace(str(tmp_path / "reference"))
    write_inputs(reference, shard)
    whole = booruset("caption", "-w", reference.root, *sets)
    out, _ = whole.communicate(timeout=600)
    assert whole.returncode == 0 and len(reference.done_units("caption")) == IMAGES // 2, out

    ws = Workspace(str(tmp_path / "ws"))
    write_inputs(ws, shard)
    victim = booruset("caption", "-w", ws.root, *sets)
    committed = kill_after_commits(victim, Path(ws.base) / "state" / "caption", at_least=1, poll_s=0.05)
    assert 1 <= committed < IMAGES // 2
    before = {u: Path(ws.table_dir("captions"), f"{m['parts']['captions'][0]}.parquet").stat().st_mtime_ns
              for u, m in ws.done_units("caption").items()}

    again = booruset("caption", "-w", ws.root, *sets)
    out, _ = again.communicate(timeout=600)
    assert again.returncode == 0, out
    # the actors are in process groups of their own: one may commit a unit in the second after the kill
    done_before = int(re.search(r"(\d+) done before", out).group(1))
    assert committed <= done_before < IMAGES // 2, out
    for unit, mtime in before.items():
        part = ws.done_units("caption")[unit]["parts"]["captions"][0]
        assert Path(ws.table_dir("captions"), f"{part}.parquet").stat().st_mtime_ns == mtime
    assert caption_rows(ws) == caption_rows(reference)
    assert {r[2] for r in caption_rows(ws)} == {"openai:smollm2", "rewrite:smollm2"}


def test_a_server_failing_some_requests_ends_no_run_and_the_next_asks_only_those(ray_local, tmp_path, shard):
    """A 503 outlasting its retries on one of the stream's requests: ray.data.llm's HTTP stage
    ended the job on it (and on a reply that is not JSON). Here it is a passing failure
    (server_error: its image is not looped back with fewer tags, its unit is done again by the
    next run, which asks only for it)."""
    from test_caption_openai import Script, serve

    from jobs.config import load_config
    from store.workspace import Workspace

    script = Script([503, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200, 200])
    server, url = serve(script)
    try:
        config = load_config(None, [f'workspace.path="{tmp_path / "ws"}"', "ray.num_cpus=2"])
        merge(config, {"caption": {**stream_options(url), "rewrite": "", "max_retries": 0,
                                   "vllm_batch_size": 1}})
        ws = Workspace(str(tmp_path / "ws"))
        write_inputs(ws, shard)
        first = caption.run(config, ws)
        assert first.errors_by_kind["server_error"] == 1 and "1 images failed for a passing reason" in first.render()
        failed = [e["key"] for e in ws.read_table("errors").to_pylist() if e["kind"] == "server_error"]
        attempts = {}
        for row in ws.read_table("captions").to_pylist():
            attempts.setdefault(row["key"], []).append(row["attempt"])
        assert failed[0] not in attempts  # not looped back to attempt 1 with fewer tags
        assert all(sorted(a) == [0, 1] for a in attempts.values()) and len(attempts) == IMAGES - 2
        asked = len(script.received)
        second = caption.run(config, ws)
        assert second.units_done == 1 and "server_error" not in second.errors_by_kind
        assert len(script.received) == asked + 2  # the failed image's attempts 0 and 1, nothing else
        # its unit's other image was answered by the replies the first run kept (the summary said
        # "0 answered by replies kept": the stream counted only what a replaced unit kept). The 503
        # goes to whichever request reaches the server first: where that is k/6's, its unit's
        # other image is MISSING, which sent no request and keeps no reply
        number = int(failed[0].split("/")[1])
        partner = f"k/{number ^ 1}"  # units of 2 in key order: k/0 with k/1, ..., k/6 with k/7
        kept = 0 if partner == MISSING else 2
        assert f"requests: 2 sent, {kept} answered by replies kept from an earlier run" in second.render()
        attempts = {}
        for row in ws.read_table("captions").to_pylist():
            attempts.setdefault(row["key"], []).append(row["attempt"])
        assert len(attempts) == IMAGES - 1 and all(sorted(a) == [0, 1] for a in attempts.values())
        assert stream_folder(ws) == []
    finally:
        script.stop.set()
        server.shutdown()
        server.server_close()


def test_the_stream_does_not_show_a_member_rewritten_since_ingest(shard, tmp_path):
    """A request row whose member is not of the size ingest saw (images.bytes: the shard was
    rewritten since) gets an unreadable_image error saying so, not the new picture in its messages."""
    import pyarrow as pa

    from jobs.config import load_config
    from udfs.caption.caption_stream import REQUEST_SCHEMA, request_messages

    with tarfile.open(shard) as tar:
        sizes = {info.name: info.size for info in tar}
    rows = [{"unit": "u", "stage": "a0", "key": key, "source": str(shard), "member": member, "member_offset": None,
             "bytes": seen, "seed": 0, "text": "A girl.", "tags": ["1girl"], "categories": ["general"]}
            for key, member, seen in (("k/0", "0.png", sizes["0.png"]), ("k/1", "1.png", sizes["1.png"] + 1))]
    options = {**load_config(None, [])["caption"], "send_images": True, "region_overlap": 0.0}
    out = request_messages(pa.Table.from_pylist(rows, REQUEST_SCHEMA), options).to_pylist()
    assert out[0]["error"] == "" and "data:image/jpeg;base64," in out[0]["messages"]
    assert out[1]["messages"] == "" and out[1]["error"].startswith("unreadable_image: ")
    assert "size ingest saw" in out[1]["error"]


def test_a_request_row_carries_its_digest_and_the_reply_a_replaced_unit_kept_of_it(shard, tmp_path):
    """A request row's digest is of the request as it is sent: the picture in it (its data URL),
    the model and the sampling; an option that changes no request leaves it. The reply a replaced
    unit kept of the same request answers the row, for the unit that replaces it alone."""
    import pyarrow as pa

    from jobs.config import load_config
    from store.workspace import Workspace
    from udfs.caption.caption_stream import REQUEST_SCHEMA, request_messages
    from udfs.caption.reply_cache import ReplyCache

    with tarfile.open(shard) as tar:
        sizes = {info.name: info.size for info in tar}
    rows = [{"unit": "u", "stage": "a0", "key": key, "source": str(shard), "member": member, "member_offset": None,
             "bytes": sizes[member], "seed": 0, "text": "A girl.", "tags": ["1girl"], "categories": ["general"]}
            for key, member in (("k/0", "0.png"), ("k/1", "1.png"))]
    table = pa.Table.from_pylist(rows, REQUEST_SCHEMA)
    options = {**load_config(None, [])["caption"], "send_images": True, "region_overlap": 0.0}
    first, other_picture = request_messages(table, options)["request"].to_pylist()
    assert first and other_picture and first != other_picture  # the same question of another picture
    assert request_messages(table, options)["request"].to_pylist() == [first, other_picture]
    for changed in ({"vllm_model": "other/vlm"}, {"temperature": 0.1}, {"max_tokens": 7}, {"image_max_side": 32},
                    {"prompt": "Describe {tag_block}"}):
        assert request_messages(table, {**options, **changed})["request"][0].as_py() != first, changed
    assert request_messages(table, {**options, "target": 0.5})["request"][0].as_py() == first

    ws = Workspace(str(tmp_path / "ws"))
    ReplyCache(ws, "replaced").add({first: "A girl, kept."})
    out = request_messages(table, options, ws.root, {"u": ["replaced"]})
    assert out["kept"].to_pylist() == ["A girl, kept.", None]
    assert out["request"].to_pylist() == [first, other_picture] and out["error"].to_pylist() == ["", ""]
    assert request_messages(table, options, ws.root, {"v": ["replaced"]})["kept"].to_pylist() == [None, None]


@pytest.mark.parametrize("rewrite", ["", "openai"])
def test_an_image_added_inside_a_unit_sends_only_that_image_to_the_engine(ray_local, workspace, config, rewrite):
    """The stream kept a unit's replies by (unit, stage, key), and only until the unit committed:
    an image added inside a unit gave it other rows and another id, and every image of it went
    through the engine again. A committed unit keeps its replies by request now, with its images'
    key range, and the unit that replaces it is answered by them: only the new image reaches the
    engine (the server transport on loopback stands in for it here; the rest is the stream).
    Taken out again, nothing does; nor after an option that changes no request. The `openai`
    rewriter of the stream (the same server here: a request per image more) kept no reply at all,
    and rewrote every image of the unit again."""
    from test_caption_job import added_image
    from test_caption_job import write_inputs as write_job_inputs
    from test_caption_openai import Script, serve

    from udfs.caption.reply_cache import units_with_replies

    script = Script([])
    server, url = serve(script)
    try:
        write_job_inputs(workspace)
        merge(config, {"caption": {
            "backend": "vllm", "vllm_url": url, "vllm_model": "joy", "api_key_env": "", "send_images": False,
            "max_attempts": 1, "unit_size": 2, "concurrency": 1, "vllm_batch_size": 4,
            "vllm_concurrency": 1, "tags_from_text": False, "related_tags": False, "rewrite": rewrite,
            "rewrite_base_url": url, "rewrite_model": "smol", "rewrite_api_key_env": ""}})
        per_image = 2 if rewrite else 1  # requests: the caption, and its rewrite
        first = caption.run(config, workspace)
        assert len(script.received) == 5 * per_image
        assert f"requests: {5 * per_image} sent, 0 answered by replies kept" in first.render()
        assert units_with_replies(workspace) == sorted(workspace.done_units("caption"))
        before = caption_texts(workspace)

        added_image(workspace, "a/h", ["1girl", "cat"])  # inside the unit [a/girl, a/pair]
        added = caption.run(config, workspace)
        assert added.rows_run == 3  # its unit, cut in two
        assert len(script.received) == 6 * per_image and "cat" in json.dumps(script.received[5 * per_image])
        assert f"requests: {per_image} sent, {2 * per_image} answered by replies kept" in added.render()
        captions = caption_texts(workspace)
        assert [r for r in captions if r[0] != "a/h"] == before
        assert [r[2:] for r in captions if r[0] == "a/h"] == [r[2:] for r in before if r[0] == "a/girl"]
        assert len(units_with_replies(workspace)) == len(workspace.done_units("caption"))  # the replaced one's went
        assert stream_folder(workspace) == []

        workspace.add_part("images", "more-a-h", workspace.read_table("images").schema.empty_table())  # a/h gone
        removed = caption.run(config, workspace)
        assert (removed.units_done, removed.rows_run) == (1, 1) and len(script.received) == 6 * per_image
        assert f"requests: 0 sent, {per_image} answered by replies kept" in removed.render()
        assert caption_texts(workspace) == before

        merge(config, {"caption": {"target": 0.5}})  # every unit new, and every request the same
        retargeted = caption.run(config, workspace)
        assert retargeted.units_done == len(workspace.done_units("caption"))
        assert len(script.received) == 6 * per_image
        assert caption_texts(workspace) == before
    finally:
        script.stop.set()
        server.shutdown()
        server.server_close()
