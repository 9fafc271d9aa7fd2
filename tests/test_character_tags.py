"""Marking characters in kohya-style tag lists: an explicit `character:` prefix, or the tag list /
tagger label file that knows which tags are characters (README, "Marking characters")."""

from __future__ import annotations

from curate_data import curate_config, image_rows, source_rows

from jobs import curate
from udfs.ingest.sidecars import parse_sidecar

LABELS_HEADER = "tag_id,name,category,count\n"


def test_txt_tags_may_name_their_category():
    tags, _, origin = parse_sidecar("txt", "character:eileen, Copyright: Ren'Py, 1girl, re:zero, :d,  artist:pytom")
    assert origin == "txt"
    assert tags == [("eileen", "character"), ("ren'py", "copyright"), ("1girl", "general"),
                    ("re:zero", "general"), (":d", "general"), ("pytom", "artist")]


def test_booru_tag_string_may_name_categories_too():
    tags, _, _ = parse_sidecar("tags", "character:lucy smile")
    assert tags == [("lucy", "character"), ("smile", "general")]


def test_prefixed_characters_reach_image_meta(workspace):
    workspace.add_part("images", "p", image_rows(["a"]))
    tags, _, _ = parse_sidecar("txt", "character:eileen, character:lucy, 2girls")
    rows = [{"key": "a", "tag": t, "category": c, "origin": "txt", "position": i} for i, (t, c) in enumerate(tags)]
    workspace.add_part("source_tags", "p", rows)
    curate.run(curate_config(workspace), workspace)
    meta = workspace.read_table("image_meta").to_pylist()[0]
    assert sorted(meta["characters"]) == ["eileen", "lucy"]


def test_tagger_label_file_marks_plain_txt_characters(workspace, tmp_path):
    """With no curate.tag_list, the WD tagger's label file (staged in models_dir) says which tags are
    characters: `eileen, lucy` in a plain .txt become characters."""
    cfg = curate_config(workspace)
    tagger = cfg["annotate"]["tagger"]
    labels = tmp_path / "models" / tagger["labels_repo"] / tagger["labels_file"]
    labels.parent.mkdir(parents=True)
    labels.write_text(LABELS_HEADER + "1,eileen,4,10\n2,lucy,4,10\n3,2girls,0,100\n", encoding="utf-8")
    cfg["annotate"]["models_dir"] = str(tmp_path / "models")
    workspace.add_part("images", "p", image_rows(["a"]))
    workspace.add_part("source_tags", "p", source_rows("a", ["eileen", "lucy", "2girls"]))
    curate.run(cfg, workspace)
    assert sorted(workspace.read_table("image_meta").to_pylist()[0]["characters"]) == ["eileen", "lucy"]
    # without the tagger among the models, the label file is not consulted: plain tags stay general
    cfg["annotate"]["models"] = ["cascade_face"]
    curate.run(cfg, workspace)
    assert workspace.read_table("image_meta").to_pylist()[0]["characters"] == []
