"""Captions back to tags (KeyBERT-style ranking with the real MiniLM) and PMI related-tag suggestions."""

from __future__ import annotations

import copy
from pathlib import Path

from jobs import caption, curate
from jobs.config import merge
from jobs.ray_env import run_in_worker
from udfs.caption.caption_tags import OWNER, candidates, phrase_of


def tag_rows(key, tags):
    return [{"key": key, "tag": t, "category": "general", "score": 1.0, "rank": i} for i, t in enumerate(tags)]


def test_candidates_read_prompt_syntax():
    phrases = {phrase_of(t): (t, "general") for t in ["blue_hair", "hair", "school_uniform", "smile", "red_dress"]}
    found = candidates("1girl, (blue hair:1.2), school_uniform, smiling, smile", phrases)
    assert [t for t, _ in found] == ["blue_hair", "school_uniform", "hair", "smile"]


def test_tags_from_text_writes_ranked_source_tags(ray_local, workspace, config):
    workspace.add_part("tags", "u", tag_rows("a/1", ["1girl", "blue_hair", "school_uniform", "smile"])
                         + tag_rows("a/2", ["red_dress", "cat_ears", "masterpiece"]))
    workspace.add_part("source_text", "u", [
        {"key": "p/1", "kind": "sd_prompt", "text": "masterpiece, 1girl, (blue hair:1.2), school_uniform, smile"},
        {"key": "a/1", "kind": "caption", "text": "a girl in a red dress"},  # has tags: left alone
    ])
    merge(config, {"caption": {"text_tags_min_similarity": 0.0, "text_tags_top_k": 3}})
    assert caption.tags_from_text(config, workspace) == 3
    rows = workspace.read_table("source_tags").to_pylist()
    assert {r["key"] for r in rows} == {"p/1"} and {r["origin"] for r in rows} == {"caption"}
    assert [r["position"] for r in rows] == [0, 1, 2]
    assert set(r["tag"] for r in rows) <= {"1girl", "blue_hair", "school_uniform", "smile", "masterpiece"}
    assert "red_dress" not in {r["tag"] for r in rows}
    # a second run sees the image as untagged still (its tags came from its text); the same texts
    # and vocabulary keep the parts: new ones had curate and every caption unit read them again
    owned = workspace.published()["owned"][OWNER]
    assert caption.tags_from_text(config, workspace) == 3
    assert len(workspace.read_table("source_tags")) == 3
    assert workspace.published()["owned"][OWNER] == owned
    assert not (Path(workspace.base) / caption.TEXTS).exists()  # the staged texts are gone
    # curate makes them the image's curated tags: still its text's, and found again (they were
    # dropped, and the next curate left the image untagged, its caption scored against them)
    workspace.add_part("tags", "curated", tag_rows("p/1", [r["tag"] for r in rows]))
    assert caption.tags_from_text(config, workspace) == 3
    # another text: built again
    workspace.add_part("source_text", "more", [{"key": "p/2", "kind": "caption", "text": "a smile"}])
    assert caption.tags_from_text(config, workspace) == 4
    assert {r["key"] for r in workspace.read_table("source_tags").to_pylist()} == {"p/1", "p/2"}


def test_an_own_caption_is_never_scored_against_the_tags_taken_from_it(ray_local, workspace, config):
    """An untagged image's own caption was scored against the tags caption.tags_from_text took
    from that same caption: tag_inclusion 1.0, accepted, no captioner asked. It has no evidence
    (the template captions it from those tags); where the tagger ran, the tagger's is its evidence."""
    own = "A girl with blue hair in a school uniform smiles."
    workspace.add_part("images", "u", [
        {"key": k, "source": "s.tar", "member": k.split("/")[1] + ".png", "width": 64, "height": 64, "format": "PNG",
         "mode": "RGB", "n_frames": 1, "bytes": 1, "sha256": "x", "phash": 0} for k in ("a/1", "p/1", "p/2")])
    workspace.add_part("tags", "u", tag_rows("a/1", ["1girl", "blue_hair", "school_uniform", "smile"]))
    workspace.add_part("source_text", "u", [{"key": k, "kind": "caption", "text": own} for k in ("p/1", "p/2")])
    workspace.add_part("tag_scores", "u", [  # the tagger ran on p/2 alone
        {"key": "p/2", "crop": -1, "tag": t, "category": "general", "score": 0.9, "model": "wd"}
        for t in ("1girl", "blue_hair", "serafuku", "smile")])
    merge(config, {"caption": {"unit_size": 2, "concurrency": 1, "tags_from_text": True, "target": 0.6,
                               "text_tags_min_similarity": 0.0, "related_tags": False}})
    caption.run(config, workspace)
    assert {r["key"] for r in workspace.read_table("source_tags").to_pylist()} == {"p/1", "p/2"}
    rows = {(r["key"], r["attempt"]): r for r in workspace.read_table("captions").to_pylist()}
    untagged = rows[("p/1", -1)]
    assert untagged["accuracy"] is None and untagged["not_scored"] == "no_evidence" and not untagged["accepted"]
    assert rows[("p/1", 0)]["accepted"] and rows[("p/1", 0)]["backend"] == "template:english"
    assert rows[("p/2", -1)]["scored_against"] == "tagger"


def test_related_tags_suggest_what_usually_comes_along(ray_local, workspace, config, monkeypatch):
    rows = []
    for i in range(6):
        rows += tag_rows(f"k/{i}", ["cat_ears", "cat_tail", "1girl"])
    for i in range(6):
        rows += tag_rows(f"d/{i}", ["dog", "outdoors", "1girl"])
    rows += tag_rows("k/lacking", ["cat_ears", "1girl"])
    workspace.add_part("tags", "u", rows)
    merge(config, {"caption": {"related_min_support": 3, "related_min_pmi": 0.3, "related_top_k": 5}})
    written = caption.related_tags(config, workspace)
    suggestions = workspace.read_table("tag_suggestions").to_pylist()
    assert written == len(suggestions) > 0
    lacking = [s for s in suggestions if s["key"] == "k/lacking"]
    assert [(s["tag"], s["because"], s["support"]) for s in lacking] == [("cat_tail", "cat_ears", 6)]
    assert lacking[0]["score"] > 0.3 and lacking[0]["origin"] == "pmi"
    assert not any(s["key"].startswith("k/") and s["tag"] in ("dog", "outdoors") for s in suggestions)
    # nothing they are made of changed: kept (a rerun with nothing new rebuilt them every time)
    owned = workspace.published()["owned"]["caption:related_tags"]
    assert caption.related_tags(config, workspace) == written
    assert workspace.published()["owned"]["caption:related_tags"] == owned
    # the same rows when the images are cut into units of 4 (one task each; built again, its record
    # gone), and nothing staged is left
    monkeypatch.setattr(caption, "RELATED_UNIT_IMAGES", 4)
    (Path(workspace.base) / caption.RELATED_STATE).unlink()
    assert caption.related_tags(config, workspace) == written
    by_key = sorted(workspace.read_table("tag_suggestions").to_pylist(), key=lambda s: (s["key"], s["tag"]))
    assert by_key == sorted(suggestions, key=lambda s: (s["key"], s["tag"]))
    assert len(workspace.published()["owned"]["caption:related_tags"]["tag_suggestions"]) == 4  # 13 images: 4+4+4+1
    assert not (Path(workspace.base) / caption.RELATED).exists()
    workspace.add_part("tags", "more", tag_rows("k/new", ["cat_ears", "1girl"]))  # a change: built again
    caption.related_tags(config, workspace)
    assert ("k/new", "cat_tail") in {(s["key"], s["tag"]) for s in workspace.read_table("tag_suggestions").to_pylist()}


def test_related_tags_respect_impossible_combinations_and_review_edits(ray_local, workspace, config):
    """No 3girls for a solo / 1girl image (curate's impossible_tags.csv); a tag a person removed
    suggests nothing and is not suggested back; a tag a person added is no suggestion, and
    suggests as the image's own tags do."""
    import datetime

    rows = []
    for i in range(6):
        rows += tag_rows(f"g/{i}", ["3girls", "school_uniform", "classroom"])
        rows += tag_rows(f"d/{i}", ["dog", "outdoors"])
    rows += tag_rows("s/solo", ["1girl", "solo", "school_uniform"])
    rows += tag_rows("e/removed", ["cat_ears", "school_uniform"])
    rows += tag_rows("e/back", ["classroom", "school_uniform"])
    rows += tag_rows("e/added", ["classroom"])
    workspace.add_part("tags", "u", rows)
    now = datetime.datetime.now(datetime.UTC)
    edits = [("e/removed", "school_uniform", None), ("e/back", "school_uniform", None),
             ("e/added", None, "school_uniform")]  # (key, old, new): a removal, a removal, an addition
    workspace.add_part("edits", "u", [{"key": key, "field": "tags", "old": old, "new": new, "time": now, "seq": 0,
                                       "batch": key} for key, old, new in edits])
    merge(config, {"caption": {"related_min_support": 3, "related_min_pmi": 0.3, "related_top_k": 5}})
    caption.related_tags(config, workspace)
    suggested: dict[str, list[tuple[str, str]]] = {}
    for s in workspace.read_table("tag_suggestions").to_pylist():
        suggested.setdefault(s["key"], []).append((s["tag"], s["because"]))
    assert suggested["s/solo"] == [("classroom", "school_uniform")]  # 3girls was suggested here
    assert "e/removed" not in suggested  # school_uniform, removed, suggested 3girls and classroom
    assert [tag for tag, _ in suggested["e/back"]] == ["3girls"]  # not school_uniform again
    assert [tag for tag, _ in suggested["e/added"]] == ["3girls"]  # school_uniform is the image's now


def test_a_second_run_of_curate_and_caption_changes_nothing(ray_local, workspace, config):
    """Curate runs before caption, whose tags_from_text then gives untagged images tags from their
    own prompts: the next curate made those curated tags (other tag ranks, so other captions), so a
    second `booruset run` rewrote tags and captions, and a run killed after tags_from_text ended
    with other rows than an uninterrupted one. The caption job curates again when the tags taken
    from texts are not the ones the last curate read: the first run ends where the second would."""
    from jobs import curate

    prompt = "masterpiece, 1girl, (blue hair:1.2), school_uniform, smile"
    workspace.add_part("images", "u", [
        {"key": k, "source": "s.tar", "member": k.split("/")[1] + ".png", "width": 64, "height": 64, "format": "PNG",
         "mode": "RGB", "n_frames": 1, "bytes": 1, "sha256": k, "phash": i * 0xFFFF}
        for i, k in enumerate(("a/1", "p/1"))])
    workspace.add_part("source_tags", "u", [{"key": "a/1", "tag": t, "category": "general", "origin": "txt",
                                             "position": i} for i, t in enumerate(("1girl", "blue_hair", "smile"))])
    workspace.add_part("source_text", "u", [{"key": "p/1", "kind": "sd_prompt", "text": prompt}])
    merge(config, {"caption": {"tags_from_text": True, "text_tags_min_similarity": 0.0, "related_tags": False}})

    def tables() -> dict[str, list]:
        con = workspace.connect()
        return {t: con.execute(f"select * from {t} order by all").fetchall() for t in ("tags", "captions")}

    curate.run(config, workspace)
    caption.run(config, workspace)
    first = tables()
    assert {row[0] for row in first["tags"]} == {"a/1", "p/1"}  # p/1's tags from its prompt are curated
    curate.run(config, workspace)
    summary = caption.run(config, workspace)
    assert tables() == first
    assert summary.units_done == 0


def test_tags_from_text_stage_no_texts_when_nothing_they_read_changed(ray_local, workspace, config, capsys):
    """Each run staged the untagged images' texts and the dataset's vocabulary (three scans of the
    tag tables and texts) only to find the same tags. With none of the parts they read changed,
    nor the vocabulary file, options or code, nothing is staged; a new text is."""
    workspace.add_part("images", "u", [
        {"key": k, "source": "s.tar", "member": k.split("/")[1] + ".png", "width": 64, "height": 64, "format": "PNG",
         "mode": "RGB", "n_frames": 1, "bytes": 1, "sha256": k, "phash": i}
        for i, k in enumerate(("a/1", "p/1", "p/2"))])
    workspace.add_part("source_tags", "u", [{"key": "a/1", "tag": t, "category": "general", "origin": "txt",
                                             "position": i} for i, t in enumerate(("1girl", "blue_hair", "smile"))])
    workspace.add_part("source_text", "u", [{"key": "p/1", "kind": "sd_prompt", "text": "1girl, smile, blue_hair"}])
    merge(config, {"caption": {"tags_from_text": True, "text_tags_min_similarity": 0.0, "related_tags": False}})
    caption.run(config, workspace)
    tags = sorted(map(str, workspace.read_table("source_tags").to_pylist()))
    capsys.readouterr()
    caption.run(config, workspace)
    assert "texts not staged again" in capsys.readouterr().out
    assert sorted(map(str, workspace.read_table("source_tags").to_pylist())) == tags
    workspace.add_part("source_text", "more", [{"key": "p/2", "kind": "sd_prompt", "text": "1girl, blue_hair"}])
    caption.run(config, workspace)
    assert "texts not staged again" not in capsys.readouterr().out
    assert "p/2" in {r["key"] for r in workspace.read_table("source_tags").to_pylist()}


def test_tags_from_text_stage_nothing_again_in_a_dataset_without_untagged_texts(ray_local, workspace, config,
                                                                               capsys, monkeypatch):
    """A dataset whose texts all belong to tagged images (or that has none) gets no tags from
    text: its first run found nothing, and every later run staged the texts again to find
    nothing again (a scan of the texts and tags on a Ray worker, at every caption run)."""
    workspace.add_part("images", "u", [
        {"key": "a/1", "source": "s.tar", "member": "1.png", "width": 64, "height": 64, "format": "PNG",
         "mode": "RGB", "n_frames": 1, "bytes": 1, "sha256": "a/1", "phash": 0}])
    workspace.add_part("source_tags", "u", [{"key": "a/1", "tag": "1girl", "category": "general", "origin": "txt",
                                             "position": 0}])
    workspace.add_part("source_text", "u", [{"key": "a/1", "kind": "sd_prompt", "text": "1girl, smile"}])
    merge(config, {"caption": {"tags_from_text": True, "related_tags": False}})
    curate.run(config, workspace)
    caption.run(config, workspace)
    capsys.readouterr()
    scans = []  # a spy: the real function runs, the test counts the worker tasks
    monkeypatch.setattr(caption, "run_in_worker", lambda *a: scans.append(a[2].__name__) or run_in_worker(*a))
    caption.run(config, workspace)
    assert "texts not staged again" in capsys.readouterr().out
    assert scans == []  # nor is the published text tags' digest scanned again (it changed with nothing)
    assert workspace.read_table("source_tags").num_rows == 1


def test_tags_from_text_turned_off_drops_the_tags_an_earlier_run_took(ray_local, workspace, config, tmp_path):
    """caption.tags_from_text on, then off: the tags taken from p/1's prompt stayed its source and
    curated tags, and so its captions and KEY.txt, where a workspace that never had the option on
    has none. They go, and curate runs again: the tables are those of that workspace."""
    from jobs import curate
    from store.workspace import Workspace

    def fill(ws: Workspace) -> None:
        ws.add_part("images", "u", [
            {"key": k, "source": "s.tar", "member": k.split("/")[1] + ".png", "width": 64, "height": 64,
             "format": "PNG", "mode": "RGB", "n_frames": 1, "bytes": 1, "sha256": k, "phash": i * 0xFFFF}
            for i, k in enumerate(("a/1", "p/1"))])
        ws.add_part("source_tags", "u", [{"key": "a/1", "tag": t, "category": "general", "origin": "txt",
                                          "position": i} for i, t in enumerate(("1girl", "blue_hair", "smile"))])
        ws.add_part("source_text", "u", [{"key": "p/1", "kind": "sd_prompt", "text": "1girl, blue hair, smile"}])

    def tables(ws: Workspace) -> dict[str, list]:
        con = ws.connect()
        captions = "select key, caption, backend, attempt, accepted from captions order by all"
        return {t: con.execute(f"select * from {t} order by all").fetchall() for t in ("source_tags", "tags")} | {
            "captions": con.execute(captions).fetchall()}

    def run(ws: Workspace, on: bool) -> None:
        cfg = copy.deepcopy(config)
        merge(cfg, {"caption": {"tags_from_text": on, "text_tags_min_similarity": 0.0, "related_tags": False}})
        curate.run(cfg, ws)
        caption.run(cfg, ws)

    fill(workspace)
    run(workspace, True)
    assert "p/1" in {row[0] for row in tables(workspace)["tags"]}  # its tags from its prompt
    run(workspace, False)
    fresh = Workspace(str(tmp_path / "fresh"))
    fill(fresh)
    run(fresh, False)
    assert tables(workspace) == tables(fresh)
    assert "p/1" not in {row[0] for row in tables(workspace)["tags"]}


def test_related_tags_read_the_impossible_combinations_through_the_aliases(ray_local, workspace, config, tmp_path):
    """curate reads impossible_tags.csv through the aliases (a rule `sole_female,3girls` acts on
    1girl, sole_female's tag): the suggestions read it as written, and gave a 1girl image 3girls."""
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "aliases.csv").write_text("alias,tag\nsole_female,1girl\n", encoding="utf-8")
    (rules / "impossible_tags.csv").write_text("tag_a,tag_b,winner\nsole_female,3girls,score\n", encoding="utf-8")
    rows = []
    for i in range(6):
        rows += tag_rows(f"g/{i}", ["3girls", "school_uniform", "classroom"])
        rows += tag_rows(f"d/{i}", ["dog", "outdoors"])
    rows += tag_rows("s/one", ["1girl", "school_uniform"])
    workspace.add_part("tags", "u", rows)
    merge(config, {"curate": {"rules_dir": str(rules)},
                   "caption": {"related_min_support": 3, "related_min_pmi": 0.3, "related_top_k": 5}})
    caption.related_tags(config, workspace)
    suggested = {s["tag"] for s in workspace.read_table("tag_suggestions").to_pylist() if s["key"] == "s/one"}
    assert suggested == {"classroom"}


def test_one_text_added_embeds_its_own_unit_not_every_text(ray_local, workspace, config, tmp_path, monkeypatch):
    """tags_from_text ran every untagged image's text through the embedding model again when one
    text was added (one digest over all units, units cut every TEXT_UNIT_IMAGES texts in key
    order: hours at a million texts on a CPU). Now the units are content-defined and a unit with
    the same texts, candidate tags and options keeps its part: only the added text's unit runs (a
    tag added that no text names, none), and the tags equal those of a workspace that took them
    from every text at once."""
    monkeypatch.setattr(caption, "TEXT_UNIT_IMAGES", 2)
    words = ["blue hair", "smile", "school_uniform", "red dress", "cat ears"]

    def fill(ws, keys: list[int]) -> None:
        ws.add_part("tags", "u", tag_rows("a/1", ["1girl", "blue_hair", "school_uniform", "smile"])
                    + tag_rows("a/2", ["red_dress", "cat_ears"]))
        for k in keys:
            ws.add_part("source_text", f"t{k}", [{"key": f"p/{k:02d}", "kind": "sd_prompt",
                                                  "text": f"1girl, {words[k % 5]}, {words[(k + 2) % 5]}"}])

    def rows(ws) -> list[tuple]:
        return sorted((r["key"], r["tag"], r["position"]) for r in ws.read_table("source_tags").to_pylist())

    merge(config, {"caption": {"text_tags_min_similarity": 0.0, "text_tags_top_k": 2}})
    fill(workspace, list(range(0, 24, 2)))
    caption.tags_from_text(config, workspace)
    before = set(workspace.published()["owned"][OWNER]["source_tags"])
    added = [{"key": "p/11", "kind": "sd_prompt", "text": "1girl, red dress"}]
    workspace.add_part("source_text", "more", added)
    assert caption.tags_from_text(config, workspace) == 2 * 13
    after = set(workspace.published()["owned"][OWNER]["source_tags"])
    new = after - before
    run_again = {r["key"] for part in new for r in workspace.read_part("source_tags", part, ["key"])}
    assert "p/11" in run_again and len(run_again) <= 4 and len(before - after) == 1  # of 13 texts
    # a tag new to the dataset that no text names changes no unit's candidates: nothing runs
    workspace.add_part("tags", "new", tag_rows("a/3", ["bunny"]))
    assert caption.tags_from_text(config, workspace) == 2 * 13
    assert set(workspace.published()["owned"][OWNER]["source_tags"]) == after

    fresh = type(workspace)(str(tmp_path / "fresh"))
    fill(fresh, list(range(0, 24, 2)))
    fresh.add_part("source_text", "more", added)
    caption.tags_from_text(copy.deepcopy(config), fresh)
    assert rows(workspace) == rows(fresh)
