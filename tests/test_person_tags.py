"""curate's person_tags: each person's own tags from the tagger's crop scores, with position words."""

from __future__ import annotations

import numpy as np
from curate_data import curate_config, embedding_row, face_row, image_rows, source_rows, unit_vector

from jobs import curate

WHOLE = {"2girls": 0.95, "red_hair": 0.9, "black_hair": 0.9, "short_hair": 0.6, "glasses": 0.8, "smile": 0.7,
         "outdoors": 0.8, "hat": 0.2}
CROPS = {0: {"red_hair": 0.9, "short_hair": 0.7, "smile": 0.7, "eileen_(ren'py)": 0.6, "outdoors": 0.1},
         1: {"black_hair": 0.92, "glasses": 0.85, "smile": 0.5, "eileen_(ren'py)": 0.3, "hat": 0.9}}


def tag_row(key: str, tag: str, score: float, crop: int = -1, category: str = "general") -> dict:
    return {"key": key, "crop": crop, "tag": tag, "category": category, "score": score, "model": "wd"}


def person(key: str, index: int, x0: float, y0: float, x1: float, y1: float, score: float = 0.9) -> dict:
    return {**face_row(key, x0, y0, x1, y1, score=score, label="person"), "index": index}


def write_duo(ws) -> None:
    ws.add_part("images", "p", image_rows(["duo", "alone"]))
    rows = [tag_row("duo", t, s) for t, s in WHOLE.items()] + [tag_row("duo", "eileen_(ren'py)", 0.9, -1, "character")]
    rows += [tag_row("duo", t, s, crop, "character" if t.startswith("eileen") else "general")
             for crop, scores in CROPS.items() for t, s in scores.items()]
    rows += [tag_row("alone", "1girl", 0.9)]  # no crops tagged: no person rows
    ws.add_part("tag_scores", "p", rows)
    # the detector's order is not left to right: index 1 is the person on the left
    ws.add_part("detections", "p", [person("duo", 0, 0.55, 0.1, 0.95, 0.95), person("duo", 1, 0.05, 0.1, 0.45, 0.9),
                                    person("duo", 2, 0.4, 0.0, 0.6, 0.2, score=0.1),
                                    person("alone", 0, 0.1, 0.1, 0.9, 0.9)])


def test_each_person_gets_the_image_tags_their_crop_scores(workspace):
    write_duo(workspace)
    curate.run(curate_config(workspace), workspace)
    rows = workspace.read_table("person_tags").to_pylist()
    assert [(r["key"], r["person"], r["position"], r["quadrant"]) for r in rows] == [
        ("duo", 1, "left", "bottom left"), ("duo", 0, "right", "bottom right")]
    left, right = rows
    # hat: the crop scores it but the image does not keep it; outdoors: no crop has it (the scene)
    assert sorted(left["tags"]) == ["black_hair", "glasses", "smile"]
    assert sorted(right["tags"]) == ["eileen_(ren'py)", "red_hair", "short_hair", "smile"]
    assert dict(zip(right["tags"], right["categories"], strict=True))["eileen_(ren'py)"] == "character"
    assert abs(left["x0"] - 0.05) < 1e-6 and abs(left["x1"] - 0.45) < 1e-6


def test_a_character_both_crops_score_alike_goes_to_the_first_person(workspace):
    """Ties are broken by the data, not by the order rows arrive in: a rerun gives the same rows."""
    workspace.add_part("images", "p", image_rows(["tie"]))
    rows = [tag_row("tie", "2girls", 0.9), tag_row("tie", "lucy_(ren'py)", 0.9, -1, "character")]
    rows += [tag_row("tie", "lucy_(ren'py)", 0.6, crop, "character") for crop in (1, 0)]  # person 1's row first
    workspace.add_part("tag_scores", "p", rows)
    workspace.add_part("detections", "p", [person("tie", 0, 0.55, 0.1, 0.95, 0.95),
                                           person("tie", 1, 0.05, 0.1, 0.45, 0.9)])
    curate.run(curate_config(workspace), workspace)
    owners = [r["person"] for r in workspace.read_table("person_tags").to_pylist() if "lucy_(ren'py)" in r["tags"]]
    assert owners == [0]


def test_a_character_clustered_on_two_crops_goes_to_one_person(workspace):
    """Images tagged with one character, each with an untagged companion: every real cluster of
    the block is named after the character (sql/072_clusters.sql), the companion's too, and both
    people got the character ("On the left, Alice; on the right, Alice"). The crop that scores
    the tag highest takes it."""
    rng = np.random.default_rng(1)
    alice, companion = unit_vector(rng), unit_vector(rng)
    keys = [f"img{i}" for i in range(4)]
    workspace.add_part("images", "p", image_rows(keys))
    workspace.add_part("source_tags", "p", [r for k in keys for r in source_rows(k, ["alice"], "character")])
    workspace.add_part("embeddings", "p", [embedding_row(k, unit_vector(rng, v, 0.01), crop)
                                           for k in keys for crop, v in ((0, companion), (1, alice))])
    workspace.add_part("detections", "p", [row for k in keys for row in (person(k, 0, 0.05, 0.1, 0.45, 0.9),
                                                                         person(k, 1, 0.55, 0.1, 0.95, 0.9))])
    workspace.add_part("tag_scores", "p", [tag_row(k, "alice", score, crop, "character")
                                           for k in keys for crop, score in ((0, 0.2), (1, 0.7))])
    curate.run(curate_config(workspace, cluster_method="dbscan"), workspace)
    clusters = workspace.read_table("clusters").to_pylist()
    assert {r["character"] for r in clusters} == {"alice"} and len({r["cluster"] for r in clusters}) == 2
    rows = workspace.read_table("person_tags").to_pylist()
    assert sorted((r["key"], r["person"], r["tags"]) for r in rows) == [
        (k, p, ["alice"] if p == 1 else []) for k in keys for p in (0, 1)]
