"""The caption job on hand-written tables: scores and quality tags, loop-back, fallback, resume."""

from __future__ import annotations

import pytest

from jobs import caption
from jobs.config import merge

IMAGES = ["a/girl", "a/pair", "a/scene", "a/untagged", "b/from_source"]


def write_inputs(ws):
    ws.add_part("images", "u", [
        {"key": k, "source": "nowhere.tar", "member": k.split("/")[1] + ".png", "width": 64, "height": 64,
         "format": "PNG", "mode": "RGB", "n_frames": 1, "bytes": 1, "sha256": "x", "phash": 0} for k in IMAGES])
    curated = {
        "a/girl": [("1girl", "general"), ("eileen_(ren'py)", "character"), ("ren'py", "copyright"),
                   ("red_hair", "general"), ("short_hair", "general"), ("blue_eyes", "general"),
                   ("white_shirt", "general"), ("blue_skirt", "general"), ("smile", "general"),
                   ("standing", "general"), ("transparent_background", "general")],
        "a/pair": [("2girls", "general"), ("black_hair", "general"), ("school_uniform", "general"),
                   ("outdoors", "general"), ("sky", "general")],
        "a/scene": [("no_humans", "general"), ("scenery", "general"), ("tree", "general"), ("night", "general")],
    }
    ws.add_part("tags", "u", [
        {"key": k, "tag": t, "category": c, "score": 1.0, "rank": r}
        for k, tags in curated.items() for r, (t, c) in enumerate(tags)])
    ws.add_part("image_meta", "u", [
        {"key": "a/girl", "n_people": 1, "n_characters": 1, "characters": ["eileen_(ren'py)"], "rating": "general"},
        {"key": "a/pair", "n_people": 2, "n_characters": 0, "characters": [], "rating": "general"},
        {"key": "a/scene", "n_people": 0, "n_characters": 0, "characters": [], "rating": "general"},
    ])
    ws.add_part("source_tags", "u", [
        {"key": "b/from_source", "tag": t, "category": "general", "origin": "txt", "position": i}
        for i, t in enumerate(["1boy", "green_hair", "jacket"])])


def configure(config, **options):
    merge(config, {"caption": {"unit_size": 2, "concurrency": 1, "tags_from_text": False, **options}})
    return config


def test_caption_job_loop_back_resume_and_rebuild(ray_local, workspace, config):
    write_inputs(workspace)
    # an unreachable target: every image is captioned max_attempts times, the best attempt is kept
    summary = caption.run(configure(config, max_attempts=3, target=1.01), workspace)
    rows = workspace.read_table("captions").to_pylist()
    captioned = ["a/girl", "a/pair", "a/scene", "b/from_source"]
    assert sorted({r["key"] for r in rows}) == captioned
    for key in captioned:
        mine = [r for r in rows if r["key"] == key]
        assert sorted(r["attempt"] for r in mine) == [0, 1, 2]  # loop-back stops at N
        accepted = [r for r in mine if r["accepted"]]
        assert len(accepted) == 1 and accepted[0]["accuracy"] == max(r["accuracy"] for r in mine)
        assert len({r["seed"] for r in mine}) == 3
        for r in mine:
            assert r["accuracy"] == pytest.approx(
                (r["tag_inclusion"] + r["english_similarity"] + r["subject_consistency"]) / 3, abs=1e-6)
            assert r["quality_tags"][0].startswith("auto_") and r["flagged"] == (r["accuracy"] < 0.4)
    girl = next(r for r in rows if r["key"] == "a/girl" and r["attempt"] == 0)
    assert girl["caption"].startswith("Eileen from Ren'py with short red hair and blue eyes")
    assert girl["accuracy"] == 1.0 and girl["quality_tags"] == ["auto_best_caption", "accuracy_90"]
    source = next(r for r in rows if r["key"] == "b/from_source" and r["accepted"])
    assert "green hair" in source["caption"]  # no curated tags: source tags are used
    errors = workspace.read_table("errors").to_pylist()
    assert [(e["key"], e["kind"], e["dropped"]) for e in errors] == [("a/untagged", "no_tags", True)]
    assert summary.rows_in == 5 and summary.rows_out["captions"] == 12 and summary.dropped == 1
    assert summary.units_done == 3

    # resume: nothing to do, same rows
    again = caption.run(config, workspace)
    assert again.units_done == 0 and again.units_skipped == 3
    assert sorted(map(str, workspace.read_table("captions").to_pylist())) == sorted(map(str, rows))

    # another target: new units, the old ones' rows are gone, one attempt suffices
    configure(config, target=0.6)
    caption.run(config, workspace)
    rows = workspace.read_table("captions").to_pylist()
    assert sorted(r["key"] for r in rows) == captioned and all(r["accepted"] for r in rows)
    assert len(workspace.read_table("errors")) == 1
