"""Captions an earlier version accepted, looked at again under this version's reply checks
(udfs/caption/reply_recheck.py, jobs/caption.recheck_captions), with the loopback server of
test_caption_openai standing in for the model."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_caption_openai import fake, vlm_captioned  # noqa: F401 (fake: the server fixture)

from udfs.caption.caption_unit import REPLY_CHECKS, REPLY_CHECKS_KEY
from udfs.caption.reply_cache import REPLIES
from udfs.caption.reply_recheck import refused_now

REFUSED = "I'm sorry, but I can't help with describing this image."


@pytest.mark.parametrize(("caption", "why"), [
    ("A girl with red hair smiles at the viewer.", None),
    ("A girl who cannot swim sits by the pool, sorry to be left out.", None),
    ('"Hello," she says, "welcome."', None),
    (REFUSED, "refusal"),
    ("A girl smiles, " * 30, "repetition"),
    ("```\nA girl smiles.\n```", "chat text around the caption"),
    ("... !!! ???", "no word"),
])
def test_refused_now_names_what_the_checks_refuse(caption, why):
    assert refused_now(caption) == why


def as_an_earlier_version_left(ws, unit: str, marker: dict) -> None:
    """The unit as a version with weaker checks committed it: its kept replies and accepted
    captions are REFUSED, and its marker names no reply checks."""
    folder = f"{ws.base}/{REPLIES}/{unit}"
    for info in ws.fs.get_file_info(pa.fs.FileSelector(folder)):
        if info.base_name.endswith(".parquet"):
            table = pq.read_table(info.path)
            pq.write_table(table.set_column(1, "reply", pa.array([REFUSED] * table.num_rows)), info.path)
    for part in marker["parts"]["captions"]:
        rows = ws.read_part("captions", part, ws.read_table("captions").column_names)
        ws.write_part("captions", part, [{**r, "caption": REFUSED if r["accepted"] else r["caption"]} for r in rows])


def test_a_refusal_an_earlier_version_accepted_is_no_caption_after_the_upgrade(fake, ray_local, tmp_path):  # noqa: F811
    """A refusal kept as a caption by a version whose checks let it through (and its kept reply)
    is refused by the next run: its unit runs again from its kept replies (no request: one attempt
    allowed), the image has a `refusal` errors row and no caption; the other unit is only read and
    marked, and a second run looks at nothing."""
    from jobs import caption

    _, _, server, cfg, ws = vlm_captioned(fake, tmp_path, unit_size=2)
    markers = ws.done_units("caption")
    assert all(m[REPLY_CHECKS_KEY] == REPLY_CHECKS for m in markers.values())
    for unit, marker in markers.items():  # both as an earlier version's, one with a refusal
        ws.commit_unit("caption", unit, {k: v for k, v in marker.items() if k not in ("parts", REPLY_CHECKS_KEY)},
                       parts=marker["parts"])
    refused_unit = min(markers)
    as_an_earlier_version_left(ws, refused_unit, markers[refused_unit])
    ws.publish()
    keys = {r["key"] for part in markers[refused_unit]["parts"]["captions"]
            for r in ws.read_part("captions", part, ["key"])}
    kept = [r for r in ws.read_table("captions").to_pylist() if r["key"] not in keys]

    upgraded = caption.run(cfg, ws)
    assert upgraded.units_done == 1 and len(server.received) == 3
    assert any("reply checks" in note and "refused now" in note for note in upgraded.notes)
    captions = ws.read_table("captions").to_pylist()
    assert not any(r["caption"] == REFUSED for r in captions)
    assert [r for r in captions if r["key"] not in keys] == kept
    refusals = {r["key"] for r in ws.read_table("errors").to_pylist() if r["kind"] == "refusal"}
    assert refusals == keys
    assert all(m[REPLY_CHECKS_KEY] == REPLY_CHECKS for m in ws.done_units("caption").values())

    again = caption.run(cfg, ws)
    assert again.units_done == 0 and len(server.received) == 3
    assert not any("reply checks" in note for note in again.notes)


@pytest.mark.parametrize(("reply", "caption"), [
    ('"A girl smiles at the viewer."', "A girl smiles at the viewer."),
    ('"Hello," she says, "welcome."', '"Hello," she says, "welcome."'),
    ("'Tis a girl in a 'sailor' collar, 'cute'", "'Tis a girl in a 'sailor' collar, 'cute'"),
    # an apostrophe inside a word is no quote: the reply is still wrapped in quotes
    ("'A girl's red hat, the cat's bell.'", "A girl's red hat, the cat's bell."),
    ('"A girl\'s hat."', "A girl's hat."),
])
def test_clean_reply_drops_the_quotes_around_a_reply_not_those_of_its_caption(reply, caption):
    from udfs.caption.caption_prompts import clean_reply

    assert clean_reply(reply) == caption


def test_the_vllm_stream_runs_a_rechecked_unit_from_its_own_kept_replies(ray_local, tmp_path):
    """The vllm backend's stream (no engine here: its server transport against the loopback
    server): a unit holding a refusal an earlier version accepted runs again from the replies it
    kept, with no request; the refusal is gone and the other units are not run."""
    from test_caption_openai import Script, serve
    from test_caption_stream import stream_options, write_inputs, write_shard

    from jobs import caption
    from jobs.config import load_config, merge
    from store.workspace import Workspace

    script = Script([])
    server, url = serve(script)
    try:
        config = load_config(None, [f'workspace.path="{tmp_path / "ws"}"', "ray.num_cpus=2"])
        merge(config, {"caption": {**stream_options(url), "rewrite": "", "max_attempts": 1}})
        ws = Workspace(str(tmp_path / "ws"))
        write_inputs(ws, write_shard(tmp_path / "s.tar"))
        assert caption.run(config, ws).units_done == 4
        asked, markers = len(script.received), ws.done_units("caption")
        for unit, marker in markers.items():
            ws.commit_unit("caption", unit, {k: v for k, v in marker.items() if k not in ("parts", REPLY_CHECKS_KEY)},
                           parts=marker["parts"])
        refused_unit = min(markers)
        as_an_earlier_version_left(ws, refused_unit, markers[refused_unit])
        ws.publish()

        upgraded = caption.run(config, ws)
        assert upgraded.units_done == 1 and len(script.received) == asked
        assert not any(r["caption"] == REFUSED for r in ws.read_table("captions").to_pylist())
        assert caption.run(config, ws).units_done == 0 and len(script.received) == asked
    finally:
        script.stop.set()
        server.shutdown()
        server.server_close()


def test_a_vllm_caption_an_earlier_cleaner_left_chat_text_in_is_cleaned_when_its_unit_runs_again(
        ray_local, workspace, config):
    """The vllm stream keeps a unit's replies as its cleaner left them (the caption text). A unit
    whose caption holds chat text an earlier cleaner let through ("Sure, ...") is run again by the
    recheck, answered by that kept reply: the kept reply replayed as it was, and the unit was
    committed again with the same caption, marked as checked. The replay is cleaned as a reply is
    now, and no request reaches the server."""
    from test_caption_job import write_inputs
    from test_caption_openai import Script, serve

    from jobs import caption
    from jobs.config import merge

    script = Script([])
    server, url = serve(script)
    try:
        write_inputs(workspace)
        merge(config, {"caption": {
            "backend": "vllm", "vllm_url": url, "vllm_model": "joy", "api_key_env": "", "send_images": False,
            "max_attempts": 1, "unit_size": 2, "concurrency": 1, "vllm_batch_size": 4, "vllm_concurrency": 1,
            "tags_from_text": False, "related_tags": False}})
        caption.run(config, workspace)
        asked = len(script.received)
        markers = workspace.done_units("caption")
        unit = min(markers)
        chatty = "Sure, caption by joy."  # what an earlier cleaner let through, kept and accepted
        folder = f"{workspace.base}/{REPLIES}/{unit}"
        for info in workspace.fs.get_file_info(pa.fs.FileSelector(folder)):
            if info.base_name.endswith(".parquet"):
                table = pq.read_table(info.path)
                pq.write_table(table.set_column(1, "reply", pa.array([chatty] * table.num_rows)), info.path)
        for part in markers[unit]["parts"]["captions"]:
            rows = workspace.read_part("captions", part, workspace.read_table("captions").column_names)
            workspace.write_part("captions", part, [{**r, "caption": chatty} for r in rows])
        workspace.commit_unit("caption", unit, {k: v for k, v in markers[unit].items()
                                                if k not in ("parts", REPLY_CHECKS_KEY)}, parts=markers[unit]["parts"])
        workspace.publish()

        again = caption.run(config, workspace)
        assert again.units_done == 1 and len(script.received) == asked
        texts = [r["caption"] for r in workspace.read_table("captions").to_pylist()]
        assert chatty not in texts and "Caption by joy." in texts
    finally:
        script.stop.set()
        server.shutdown()
        server.server_close()


def test_a_refusal_an_earlier_version_kept_as_a_region_caption_runs_its_unit_again(ray_local, workspace, config):
    """caption.regions: a VLM's caption of a region passes the same reply checks as the whole
    picture's (a refused one keeps its template caption). The recheck read only the `captions`
    parts of a unit, so a refusal an earlier version kept as a region's caption stayed, its unit
    marked as checked; it is run again now, as for a refused caption of the whole picture."""
    from jobs import caption
    from jobs.summary import JobSummary
    from udfs.caption.reply_cache import ReplyCache

    fine = {"key": "a/1", "attempt": 0, "backend": "openai:joy", "caption": "A girl smiles.", "accepted": True}
    workspace.write_part("captions", "u-1", [fine])
    workspace.write_part("caption_regions", "u-1", [
        {"key": "a/1", "region": "top left", "backend": "openai:joy", "tags": ["red_hair"], "caption": REFUSED},
        {"key": "a/1", "region": "top right", "backend": "template:english", "tags": [], "caption": ""}])
    parts = {"captions": ["u-1"], "caption_regions": ["u-1"]}
    workspace.commit_unit("caption", "u", {"images": 1}, parts=parts)  # no reply checks: an earlier version's
    ReplyCache(workspace, "u").add({"request": REFUSED})  # its kept replies
    done = {"u": {"images": 1, "parts": parts}}

    flagged = caption.recheck_captions(config, workspace, done)
    assert set(flagged) == {"u"} and flagged["u"]["again"] and "u" not in done
    summary = JobSummary("caption")
    caption.say_rechecked(flagged, {"u"}, summary)
    assert any("refused now" in note for note in summary.notes)


@pytest.mark.parametrize(("reply", "caption"), [
    ('"Caption: A girl smiles."', "A girl smiles."),
    ('"Here is a caption: A girl smiles."', "A girl smiles."),
    ('"Sure, a girl smiles."', "A girl smiles."),
    ("Sure, sure, a girl smiles.", "A girl smiles."),
    ("Caption: 'A girl's red hat.'", "A girl's red hat."),
])
def test_a_caption_this_version_cleaned_is_not_refused_by_its_own_recheck(reply, caption):
    """clean_reply took off the quotes around a reply after its label or opener: '"Caption: A
    girl smiles."' stayed 'Caption: A girl smiles.', a label in the caption, and a second cleaning
    changed it, so the recheck (cleaned again != as committed) ran its unit again for a caption
    the rerun cleaned the same way."""
    from udfs.caption.caption_prompts import clean_reply

    assert clean_reply(reply) == caption
    assert refused_now(clean_reply(reply)) is None
