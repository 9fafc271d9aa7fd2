"""curate, steps 2 and 5: image_meta, groups and balance (anime_screenshot_pipeline's multiply scheme)."""

from __future__ import annotations

import duckdb
import pyarrow as pa
import pytest
from curate_data import curate_config, face_row, image_rows, score_rows, source_rows

from jobs import balance, curate


def curate_three_copies_and_alice(workspace) -> None:
    """Three copies of one scenery image (one exported) and one picture of alice, curated into
    groups by n_characters."""
    rows = image_rows(["copy1", "copy2", "copy3", "alice"])
    for row in rows[:3]:
        row["sha256"] = "same bytes"
    workspace.add_part("images", "p", rows)
    copies = [r for k in ("copy1", "copy2", "copy3") for r in source_rows(k, ["scenery"])]
    workspace.add_part("source_tags", "p",
                       [*source_rows("alice", ["1girl"]), *source_rows("alice", ["alice"], "character"), *copies])
    curate.run(curate_config(workspace, group_format="n_characters"), workspace)


def test_issue_example_exactly(tmp_path):
    """The scheme's own example: probabilities 0.3, 0.45, 0.2, 0.05 -> multiplies 24, 18, 32, 1."""
    weights = tmp_path / "weights.csv"
    weights.write_text("1_character,3\nclass1,4\n*class2,6\n", encoding="utf-8")
    counts = pa.table({"path": ["1_character/class1", "1_character/class2", "others/class1", "others/class3"],
                       "n_images": [10, 20, 5, 40]})
    got = {r["path"]: r for r in balance.balance_folders(counts, balance.balance_weights(str(weights))).to_pylist()}
    assert {p: round(r["probability"], 12) for p, r in got.items()} == {
        "1_character/class1": 0.3, "1_character/class2": 0.45, "others/class1": 0.2, "others/class3": 0.05}
    assert {p: r["multiply"] for p, r in got.items()} == {
        "1_character/class1": 24.0, "1_character/class2": 18.0, "others/class1": 32.0, "others/class3": 1.0}


def test_issue_example_from_a_folder_tree(tmp_path, capsys):
    root = tmp_path / "dataset"
    sizes = {"1_character/class1": 10, "1_character/class2": 20, "others/class1": 5, "others/class3": 40}
    for folder, n in sizes.items():
        (root / folder).mkdir(parents=True)
        for i in range(n):
            (root / folder / f"{i}.png").write_bytes(b"")
        (root / folder / "0.txt").write_text("not an image", encoding="utf-8")
    weights = tmp_path / "weights.csv"
    weights.write_text("1_character,3\nclass1,4\n*class2,6\n", encoding="utf-8")
    assert balance.main([str(root), "--weights", str(weights), "--write"]) == 0
    assert (root / "others/class1/multiply.txt").read_text() == "32.0"
    assert (root / "others/class3/multiply.txt").read_text() == "1.0"
    assert "multiply 24" in capsys.readouterr().out


@pytest.mark.parametrize("args", [["missing"], ["dataset", "--min-multiply", "0"],
                                  ["dataset", "--max-multiply", "-3"], ["dataset", "--min-multiply", "0.004"]])
def test_the_folder_tool_refuses_a_missing_folder_and_bounds_not_above_zero(tmp_path, capsys, args):
    """A mistyped folder printed nothing and exited 0; bounds of 0 or below gave every folder a
    multiply of 0 or -3 (and --write wrote them), which curate refuses for the same options."""
    (tmp_path / "dataset" / "a").mkdir(parents=True)
    (tmp_path / "dataset" / "a" / "1.png").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        balance.main([str(tmp_path / args[0]), *args[1:], "--write"])
    assert exit_info.value.code == 2
    assert ("not a folder" if args[0] == "missing" else "at least 0.01") in capsys.readouterr().err
    assert not (tmp_path / "dataset" / "a" / "multiply.txt").exists()


def test_the_folder_tool_leaves_hidden_folders_and_files_out(tmp_path):
    for rel in ("a/1.png", "a/.2.png", ".ipynb_checkpoints/1.png", "b/.thumbnails/1.jpg", "b/1.jpg"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
    counts = balance.folder_counts(str(tmp_path)).to_pylist()
    assert sorted((r["path"], r["n_images"]) for r in counts) == [("a", 1), ("b", 1)]


def test_own_images_count_as_a_child_min_max_multiply_and_rounding(tmp_path):
    counts = pa.table({"path": ["a", "a/b", "c"], "n_images": [3, 3, 1]})
    got = {r["path"]: r for r in balance.balance_folders(counts, balance.balance_weights(""), 2.0, 5.0).to_pylist()}
    # root: a (0.5), c (0.5); a: own images (0.25) and b (0.25)
    assert got["a"]["probability"] == pytest.approx(0.25) and got["a/b"]["probability"] == pytest.approx(0.25)
    assert got["a"]["multiply"] == 2.0  # the smallest per-image weight times min_multiply
    assert got["c"]["multiply"] == 5.0  # 0.5 / (0.25 / 3) * 2 = 12, clipped at max_multiply
    counts = pa.table({"path": ["x", "y"], "n_images": [3, 1]})
    got = {r["path"]: r["multiply"] for r in balance.balance_folders(counts, balance.balance_weights("")).to_pylist()}
    assert got == {"x": 1.0, "y": 3.0}
    counts = pa.table({"path": ["x", "y"], "n_images": [7, 3]})
    got = {r["path"]: r["multiply"] for r in balance.balance_folders(counts, balance.balance_weights("")).to_pylist()}
    assert got["y"] == 2.33  # 7/3 rounded to 2 decimals


def test_weights_with_hostile_names(tmp_path):
    weights = tmp_path / "weights.csv"
    weights.write_text("\"it's;a,b\",2\n日本語,3\n", encoding="utf-8")
    counts = pa.table({"path": ["it's;a,b", "日本語", "plain"], "n_images": [1, 1, 1]})
    result = balance.balance_folders(counts, balance.balance_weights(str(weights)))
    got = {r["path"]: r["probability"] for r in result.to_pylist()}
    assert got == pytest.approx({"it's;a,b": 2 / 6, "日本語": 3 / 6, "plain": 1 / 6})


def test_a_weights_file_saved_with_a_byte_order_mark_weighs_its_first_folder(tmp_path):
    """A CSV saved as "CSV UTF-8" by Excel starts with a byte order mark: its first pattern was
    `\ufeffalice`, which no folder matches, and that folder kept weight 1 without a word."""
    weights = tmp_path / "weights.csv"
    weights.write_text("\ufeffalice,3\n", encoding="utf-8")
    assert balance.balance_weights(str(weights))["pattern"].to_pylist() == ["alice"]


@pytest.mark.parametrize("row", ["a,0", "*,0", "a,-1", "a,nan", "a,inf", "a,heavy"])
def test_a_weight_that_is_not_a_number_above_zero_is_refused(workspace, tmp_path, row):
    """A weight of 0 gave its folder a NaN multiply, clipped to max_multiply: the most repeats for
    the folder meant to have none (`*,0`: max_multiply everywhere); a negative one, negative multiplies."""
    from jobs.config import ConfigError

    weights = tmp_path / "weights.csv"
    weights.write_text(f"b,2\n{row}\n", encoding="utf-8")
    with pytest.raises(ValueError, match="must be a number > 0|is not a number"):
        balance.balance_weights(str(weights))
    workspace.add_part("images", "p", image_rows(["a"]))
    with pytest.raises(ConfigError, match="weights.csv"):
        curate.run(curate_config(workspace, weights=str(weights), group_format="n_people"), workspace)


@pytest.mark.parametrize("option", ["min_multiply", "max_multiply"])
@pytest.mark.parametrize("value", ["0.0", "0.004"])
def test_a_multiply_bound_that_rounds_to_zero_is_refused(option, value):
    """multiply is relative to the smallest weight times min_multiply, rounded to 2 decimals: 0
    made every image's 0, and 0.004 made the smallest group's 0.0 (EveryDream's multiply.txt then
    never trains its images, while kohya's folder gave them 1 repeat)."""
    from jobs.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"curate.{option} = {value} \\(float\\): expected a number >= 0.01"):
        load_config(None, [f"curate.{option}={value}"])


def test_the_smallest_multiply_allowed_does_not_round_to_zero():
    counts = pa.table({"path": ["many", "one"], "n_images": pa.array([1000, 1], pa.int64())})
    got = {r["path"]: r["multiply"] for r in balance.balance_folders(counts, balance.balance_weights(""), 0.01,
                                                                      100.0).to_pylist()}
    assert got == {"many": 0.01, "one": 10.0}


def test_a_min_multiply_above_max_multiply_is_refused():
    """Every multiply is clipped at max_multiply: with the smallest above it, all images got the same."""
    from jobs import curate
    from jobs.config import ConfigError, load_config

    opts = load_config(None, ["curate.min_multiply=5.0", "curate.max_multiply=2.0"])["curate"]
    with pytest.raises(ConfigError, match="curate.min_multiply 5.0 is above curate.max_multiply 2.0"):
        curate.check_options(opts)
    curate.check_options(load_config(None, ["curate.min_multiply=2.0", "curate.max_multiply=2.0"])["curate"])


def _people_workspace(ws):
    ws.add_part("images", "p", image_rows(["solo", "pair", "crowd", "none"], width=1000, height=500))
    ws.add_part("source_tags", "p",
                  source_rows("solo", ["1girl", "solo"]) + source_rows("solo", ["alice"], "character")
                  + source_rows("pair", ["1girl", "1boy"]) + source_rows("pair", ["alice", "bob"], "character")
                  + source_rows("crowd", ["6+girls", "multiple_boys"]) + source_rows("none", ["scenery"]))
    ws.add_part("tag_scores", "p", score_rows("solo", {"sensitive": 0.8, "general": 0.1}, "rating"))
    ws.add_part("detections", "p", [
        face_row("solo", 0.4, 0.1, 0.5, 0.3),  # 100 x 100 px: height ratio 0.2
        face_row("solo", 0.1, 0.1, 0.12, 0.9),  # 20 x 400 px: aspect 20, ignored
        face_row("solo", 0.7, 0.7, 0.72, 0.74, score=0.1),  # below the face threshold
        face_row("pair", 0.1, 0.0, 0.2, 0.2), face_row("pair", 0.6, 0.5, 0.9, 1.0),
        face_row("none", 0.0, 0.0, 0.5, 0.5, label="person"), face_row("none", 0.5, 0.0, 1.0, 0.5, label="person"),
        face_row("none", 1.0, 0.2, 1.0, 0.6, label="person"),  # clipped to nothing at the edge: no person
    ])


def test_a_face_both_face_detectors_find_is_one_face(workspace):
    """The default models run two face detectors (annotate.models: cascade_face and face), both
    labelling "face": a picture of one girl had n_faces 2, two facepos and n_people 2 (no count
    tag, no person box), and went to a 2_people group. Each image's faces are one detector's: the
    first model by name that found one, as the embedding steps choose a model, the cascade only
    where no other found one."""
    workspace.add_part("images", "p", image_rows(["one", "cascade_only", "own_yolo"]))
    workspace.add_part("detections", "p", [
        {**face_row("one", 0.4, 0.2, 0.6, 0.4, score=1.0), "model": "lbpcascade_animeface"},
        {**face_row("one", 0.41, 0.21, 0.6, 0.41, score=0.8), "model": "face_detect_v1.4_s"},
        {**face_row("cascade_only", 0.1, 0.1, 0.3, 0.3, score=1.0), "model": "lbpcascade_animeface"},
        {**face_row("cascade_only", 0.5, 0.1, 0.7, 0.3, score=1.0), "model": "lbpcascade_animeface"},
        # a YOLO face model of one's own whose name sorts after the cascade's
        {**face_row("own_yolo", 0.1, 0.1, 0.3, 0.3, score=1.0), "model": "lbpcascade_animeface"},
        {**face_row("own_yolo", 0.5, 0.1, 0.7, 0.3, score=1.0), "model": "lbpcascade_animeface"},
        {**face_row("own_yolo", 0.5, 0.5, 0.7, 0.7, score=0.9), "model": "yolov8_anime_face"},
    ])
    curate.run(curate_config(workspace, group_format="n_people"), workspace)
    meta = {r["key"]: r for r in workspace.read_table("image_meta").to_pylist()}
    assert (meta["one"]["n_faces"], meta["one"]["facepos"], meta["one"]["n_people"]) == (1, ["fvp 31 fhp 50"], 1)
    assert meta["one"]["fh_ratio"] == pytest.approx(0.2)
    assert (meta["cascade_only"]["n_faces"], meta["cascade_only"]["n_people"]) == (2, 2)
    assert (meta["own_yolo"]["n_faces"], meta["own_yolo"]["facepos"]) == (1, ["fvp 60 fhp 60"])  # not the cascade's


def test_image_meta_facts(workspace):
    _people_workspace(workspace)
    curate.run(curate_config(workspace), workspace)
    meta = {r["key"]: r for r in workspace.read_table("image_meta").to_pylist()}
    assert meta["solo"]["n_faces"] == 1 and meta["solo"]["fh_ratio"] == pytest.approx(0.2)
    assert meta["solo"]["facepos"] == ["fvp 20 fhp 45"]
    assert meta["solo"]["n_people"] == 1 and meta["solo"]["rating"] == "sensitive"
    assert meta["pair"]["n_faces"] == 2 and meta["pair"]["fh_ratio"] == pytest.approx(0.5)
    assert meta["pair"]["facepos"] == ["fvp 75 fhp 75", "fvp 10 fhp 15"]
    assert meta["pair"]["n_people"] == 2 and meta["pair"]["characters"] == ["alice", "bob"]
    assert meta["crowd"]["n_people"] == 8 and meta["crowd"]["n_people_tags"] == 8
    assert meta["none"]["n_people"] == 2 and meta["none"]["n_people_tags"] is None
    assert meta["none"]["n_people_detected"] == 2 and meta["none"]["fh_ratio"] is None


@pytest.mark.parametrize("edges", [[0.1, 0.5, 1.0], [0.0, 0.1, 0.5]])
def test_fh_ratio_bins_that_leave_faces_out_are_refused(edges):
    """A face's height ratio is from 0 to 1, and an image with no bin for it was grouped as no_face:
    with [0.1, 0.5, 1.0] the small faces of crowd scenes, with [0.0, 0.1, 0.5] every close-up, were
    balanced (and exported to a folder) as pictures without a face."""
    from jobs.config import ConfigError, load_config

    with pytest.raises(ValueError, match="from 0 to 1"):
        curate.fh_ratio_bins(edges)
    with pytest.raises(ConfigError, match="from 0 to 1"):
        curate.check_options({**load_config()["curate"], "fh_ratio_bins": edges})
    assert curate.fh_ratio_bins([0.0, 1.0]).num_rows == 1


def test_groups_format_and_character_others(workspace):
    _people_workspace(workspace)
    curate.run(curate_config(workspace, min_images_per_combination=1), workspace)
    groups = {r["key"]: r["path"] for r in workspace.read_table("groups").to_pylist()}
    assert groups == {"solo": "1_character/alice/fh_ratio_0.2-0.35", "pair": "2_characters/alice+bob/fh_ratio_0.5-1",
                      "crowd": "0_characters/character_others/no_face", "none": "0_characters/character_others/no_face"}
    curate.run(curate_config(workspace, min_images_per_combination=2, group_format="character/n_people/rating/width"),
               workspace)
    groups = {r["key"]: r["path"] for r in workspace.read_table("groups").to_pylist()}
    assert groups["solo"] == "character_others/1_person/sensitive/width_1000"
    assert groups["crowd"] == "character_others/8_people/unrated/width_1000"


def test_a_combination_of_copies_of_one_picture_is_one_image_for_min_images_per_combination(workspace):
    """min_images_per_combination counts the pictures the export writes: three copies of one
    picture of alice (one exported) are one image, not three, and go to character_others; bob's
    two pictures keep their group. Counted whole, alice's one picture got a group (and its share
    of the balance) of its own. A copy of bob's picture tagged carol (no picture of its own) still
    has a group."""
    rows = image_rows(["alice1", "alice2", "alice3", "bob1", "bob2", "carol1"])
    for row in rows[:3]:
        row["sha256"] = "same bytes"
    rows[5]["sha256"] = "bob1"
    workspace.add_part("images", "p", rows)
    workspace.add_part("source_tags", "p", [r for k in ("alice1", "alice2", "alice3") for r in
                                            source_rows(k, ["alice"], "character")]
                       + [r for k in ("bob1", "bob2") for r in source_rows(k, ["bob"], "character")]
                       + source_rows("carol1", ["carol"], "character"))
    curate.run(curate_config(workspace, group_format="character", min_images_per_combination=2), workspace)
    groups = {r["key"]: r["path"] for r in workspace.read_table("groups").to_pylist()}
    assert groups == {"alice1": "character_others", "alice2": "character_others", "alice3": "character_others",
                      "bob1": "bob", "bob2": "bob", "carol1": "character_others"}


def test_images_of_an_input_that_is_gone_are_out_of_the_balance(workspace, tmp_path):
    """A collection moved to a new path is a new input; the old one's rows stay, and the export
    leaves them out (their files cannot be read) and keeps the copies that are there. Curate
    counted them: a picture alone in the gone input kept a group and its share (bob), and a copy
    in the gone input (whose key sorts first) stayed its group's representative, so the balance
    gave the image the export writes no extra repeat (the group's repeats came out short)."""
    from store.workspace import INPUT_REGISTRY

    (tmp_path / "new").mkdir()
    workspace.write_json(INPUT_REGISTRY, {str(tmp_path / "old"): "col", str(tmp_path / "new"): "col_v2"})
    rows = image_rows(["col/a1", "col_v2/a1", "col/b1", "col_v2/c1", "col_v2/c2", "col_v2/c3"])
    rows[1]["sha256"] = "col/a1"  # the same picture in both inputs
    workspace.add_part("images", "p", rows)
    characters = {"col/a1": "alice", "col_v2/a1": "alice", "col/b1": "bob", "col_v2/c1": "carol", "col_v2/c2": "carol",
                  "col_v2/c3": "carol"}
    workspace.add_part("source_tags", "p", [r for k, c in characters.items() for r in source_rows(k, [c], "character")])
    cfg = curate_config(workspace, group_format="character")
    curate.run(cfg, workspace)
    groups = {r["key"]: r["path"] for r in workspace.read_table("groups").to_pylist()}
    assert groups == {"col_v2/a1": "alice", "col_v2/c1": "carol", "col_v2/c2": "carol", "col_v2/c3": "carol"}
    duplicates = {r["key"]: r["is_representative"] for r in workspace.read_table("duplicates").to_pylist()}
    assert duplicates == {"col/a1": False, "col_v2/a1": True}
    balance_rows = {r["key"]: r for r in workspace.read_table("balance").to_pylist()}
    assert (balance_rows["col_v2/a1"]["multiply"], balance_rows["col_v2/a1"]["repeats"]) == (3.0, 3)
    # the new input goes too: curate builds again (nothing it reads changed but the inputs there)
    (tmp_path / "new").rmdir()
    (tmp_path / "old").mkdir()
    assert curate.run(cfg, workspace).units_done == 1
    assert {r["key"] for r in workspace.read_table("groups").to_pylist()} == {"col/a1", "col/b1"}


def test_balance_table_from_groups(workspace, tmp_path):
    _people_workspace(workspace)
    weights = tmp_path / "w.csv"
    weights.write_text("2_characters,3\n", encoding="utf-8")
    curate.run(curate_config(workspace, group_format="n_characters", weights=str(weights)), workspace)
    rows = {r["key"]: r for r in workspace.read_table("balance").to_pylist()}
    # root children: 0_characters (2 images, w 1), 1_character (1, w 1), 2_characters (1, w 3)
    assert rows["pair"]["probability"] == pytest.approx(0.6) and rows["solo"]["probability"] == pytest.approx(0.2)
    assert {k: r["multiply"] for k, r in rows.items()} == {"crowd": 1.0, "none": 1.0, "solo": 2.0, "pair": 6.0}
    assert rows["crowd"]["weight"] == pytest.approx(0.1)


def test_near_duplicates_the_export_leaves_out_do_not_weigh_in_the_balance(workspace):
    """Three copies of one scenery image and one picture of alice: the export keeps one of the
    copies, so the balance shares 0_characters' weight among one image, not three (it gave
    alice a multiply of 3 against 1, and the export then wrote them 3:1 instead of 1:1)."""
    curate_three_copies_and_alice(workspace)
    rows = {r["key"]: r for r in workspace.read_table("balance").to_pylist()}
    assert {k: r["multiply"] for k, r in rows.items()} == {"copy1": 1.0, "copy2": 1.0, "copy3": 1.0, "alice": 1.0}
    assert rows["copy1"]["probability"] == pytest.approx(0.5) and rows["copy1"]["weight"] == pytest.approx(0.5)


def test_unknown_group_segment_is_a_config_error(workspace):
    from jobs.config import ConfigError

    workspace.add_part("images", "p", image_rows(["a"]))
    with pytest.raises(ConfigError):
        curate.run(curate_config(workspace, group_format="n_characters/nonsense"), workspace)


def balance_of(groups: dict[str, int], duplicates: list[tuple[str, int, bool]] = ()) -> dict[str, dict]:
    """sql/084-091 on `groups` (path: its number of images, keys `<path>/<i>`) and duplicate rows
    (key, dup_group, is_representative), with no weights: the balance table by key."""
    con = duckdb.connect()
    try:
        keys = [(f"{path}/{i}", path) for path, n in groups.items() for i in range(n)]
        con.register("groups", pa.table({"key": [k for k, _ in keys], "path": [p for _, p in keys]}))
        con.register("duplicates", pa.table({"key": [d[0] for d in duplicates], "dup_group": [d[1] for d in duplicates],
                                             "is_representative": [d[2] for d in duplicates]},
                                            schema=pa.schema([("key", pa.string()), ("dup_group", pa.int64()),
                                                              ("is_representative", pa.bool_())])))
        con.register("balance_weights", balance.balance_weights(""))
        curate.build_balance(con, {"min_multiply": 1.0, "max_multiply": 100.0})
        return {r["key"]: r for r in con.table("balance").to_arrow_table().to_pylist()}
    finally:
        con.close()


def test_a_groups_whole_repeats_add_up_to_its_multiply():
    """kohya folders and materialised copies need whole repeats: floor(multiply) or one more, given
    out so that a group's repeats are its multiply times its images, however small the group (a
    coin per image gave a group of 5 at 1.6 anything from 5 to 10 repeats)."""
    rows = balance_of({"big": 8, "five": 5, "seven": 7, "three": 3})
    by_group = {}
    for row in rows.values():
        by_group.setdefault(row["path"], []).append(row)
    for members in by_group.values():
        multiply = members[0]["multiply"]
        assert {r["repeats"] for r in members} <= {int(multiply), int(multiply) + 1}
        assert sum(r["repeats"] for r in members) == round(multiply * len(members))
    assert by_group["five"][0]["multiply"] == 1.6 and sum(r["repeats"] for r in by_group["five"]) == 8
    assert by_group["three"][0]["multiply"] == 2.67 and sum(r["repeats"] for r in by_group["three"]) == 8
    # an image keeps its repeats when another group changes
    again = balance_of({"big": 8, "five": 5, "seven": 7, "three": 3, "other": 2})
    assert {k: r["repeats"] for k, r in again.items() if r["path"] == "five"} == \
        {k: r["repeats"] for k, r in rows.items() if r["path"] == "five"}


def test_the_repeats_go_to_the_images_the_export_keeps():
    """A near duplicate the export leaves out gets no extra repeat that its group then lacks: the
    five kept images at 1.6 still add up to 8."""
    duplicates = [("five/0", 1, True), *((f"five/{i}", 1, False) for i in range(5, 9))]
    rows = balance_of({"big": 8, "five": 9}, duplicates)
    kept = [r for k, r in rows.items() if k.startswith("five/") and int(k.split("/")[1]) < 5]
    assert kept[0]["multiply"] == 1.6 and sum(r["repeats"] for r in kept) == 8
    assert all(rows[f"five/{i}"]["repeats"] == 1 for i in range(5, 9))


def test_a_folder_of_left_out_duplicates_alone_weighs_nothing_in_the_balance():
    """A folder whose images are all near duplicates the export leaves out is no folder of the
    export: counted whole, it set the smallest per-image weight (100 copies: every exported
    multiply 10 times too large, a: 10 and c: 100 for 1 and 10) and took a share from the folder
    beside it (one copy alone in x/b: x/a's 20 images at 1 against y's 20 at 2, for 1:1)."""
    copies = [("a/0", 1, True), *((f"b/{i}", 1, False) for i in range(100))]
    rows = balance_of({"a": 10, "b": 100, "c": 1}, copies)
    assert (rows["a/0"]["multiply"], rows["c/0"]["multiply"]) == (1.0, 10.0)
    assert sum(r["repeats"] for k, r in rows.items() if not k.startswith("b/")) == 10 + 10
    assert {(r["multiply"], r["repeats"], r["probability"]) for k, r in rows.items() if k.startswith("b/")} == \
        {(1.0, 1, 0.0)}  # min_multiply, for an export that keeps them
    rows = balance_of({"x/a": 20, "x/b": 1, "y": 20}, [("x/a/0", 1, True), ("x/b/0", 1, False)])
    assert (rows["x/a/0"]["multiply"], rows["y/0"]["multiply"]) == (1.0, 1.0)
    assert rows["x/a/0"]["probability"] == pytest.approx(0.5)


def test_characters_whose_names_differ_never_share_a_group(workspace):
    """A group is one folder of the balance and of the kohya / EveryDream export: two different
    character combinations must never get one path. Dots were dropped and "/" became "_", so
    `a.b` and `ab`, `x/y` and `x_y`, and the one character `p+q` and the pair `p`, `q` were
    each one group, balanced (and exported) as one."""
    names = {"dot": ["a.b"], "nodot": ["ab"], "slash": ["x/y"], "underscore": ["x_y"], "plus": ["p+q"],
             "pair": ["p", "q"], "dots": [".."], "empty": ["."]}
    workspace.add_part("images", "p", image_rows(list(names)))
    workspace.add_part("source_tags", "p", [row for key, characters in names.items()
                                            for row in source_rows(key, characters, "character")])
    curate.run(curate_config(workspace, group_format="character"), workspace)
    groups = {r["key"]: r["path"] for r in workspace.read_table("groups").to_pylist()}
    meta = {r["key"]: r["characters"] for r in workspace.read_table("image_meta").to_pylist()}
    assert meta == names  # the tags themselves are kept as they are
    assert len(set(groups.values())) == len(names), groups
    assert all("/" not in path and path not in ("", ".", "..") for path in groups.values()), groups
    assert groups["nodot"] == "ab" and groups["pair"] == "p+q" and groups["underscore"] == "x_y"
    rows = workspace.read_table("balance").to_pylist()
    assert {r["multiply"] for r in rows} == {1.0} and len({r["path"] for r in rows}) == len(names)


def test_the_reports_balance_counts_the_images_the_export_keeps(workspace):
    """The report's "after multiply" share is what the export trains on: near duplicates it leaves
    out are not counted. Three copies of one scenery and one picture of alice are balanced 1:1
    (one copy exported, multiply 1 each); the report counted the copies and showed 3:1."""
    from jobs.report import report_data

    curate_three_copies_and_alice(workspace)
    report = {r["path"]: r for r in report_data(curate_config(workspace), workspace)["balance"]}
    assert {p: (r["images"], r["samples"]) for p, r in report.items()} == {"0_characters": (1, 1.0),
                                                                           "1_character": (1, 1.0)}
    assert all(r["share_after"] == pytest.approx(0.5) for r in report.values())
