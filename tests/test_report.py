"""The report on the bundled sample (ingest, curate, caption, export), checked the way a person
would: rendered in headless Chromium, every picture loaded, a screenshot that is not blank."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter

import pytest

from tests.export_data import base_config, prepared_workspace

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Appended to a copy of the page: after load, each <img> records whether it decoded.
CHECK_SCRIPT = """<script>window.addEventListener('load', () => {
  for (const img of document.images) img.setAttribute('data-loaded', String(img.complete && img.naturalWidth > 0));
  document.body.setAttribute('data-checked', 'yes');
});</script>"""


@pytest.fixture(scope="module")
def report(tmp_path_factory, ray_local):
    from jobs import export, report
    from store.workspace import Workspace

    path = prepared_workspace(tmp_path_factory)
    cfg, ws = base_config(path), Workspace(str(path))
    export.run(cfg, ws)
    summary = report.run(cfg, ws)
    return ws, summary, path / "report"


def test_report_has_every_section_and_its_pictures(report):
    ws, summary, out = report
    page = (out / "index.html").read_text()
    for title in ("Images per stage", "Errors by kind", "Tag frequencies", "Characters", "People per image",
                  "Balance before and after multiply", "Caption accuracy", "Examples"):
        assert f"<h2>{title}" in page
    sources = re.findall(r'<img src="([^"]+)"', page)
    for plot in ("stages.png", "tags.png", "characters.png", "people.png", "balance.png"):
        assert plot in sources and (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the sample's template captions are built from its tags: the report says so; the captions
    # some images came with (.caption sidecars) are scored, and those at the target accepted
    captioned, own = ws.connect().execute("select count(*), count(*) filter (where backend = 'own') "
                                          "from captions where accepted").fetchone()
    assert own > 0
    assert (f"{captioned} captions: {own} scored, {own} against curated_tags; {captioned - own} not scored "
            "(built_from_tags)") in page
    assert "accuracy.png" in sources
    examples = [s for s in sources if s.startswith("examples/")]
    exported = ws.connect().execute("select count(distinct key) from export_manifest").fetchone()[0]
    assert len(examples) == min(12, exported) and all((out / s).is_file() for s in examples)
    assert summary.rows_out["examples"] == len(examples)
    # the sample's own characters and an exported caption are on the page
    assert "sylvie_(the_question)" in page and "eileen_(ren&#x27;py)" in page
    caption = ws.connect().execute("""select c.caption from captions c join export_manifest m using (key)
                                      where c.accepted order by hash(key), key limit 1""").fetchone()[0]
    assert caption.replace("'", "&#x27;") in page


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get update && apt-get install -y chromium)")
def test_report_renders_in_chromium_with_all_images_loaded(report, tmp_path):
    from PIL import Image

    _, _, out = report
    check = out / "check.html"
    check.write_text((out / "index.html").read_text().replace("</body>", CHECK_SCRIPT + "</body>"))
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, *profile, "--virtual-time-budget=10000", "--dump-dom",
                          check.as_uri()], capture_output=True, text=True, timeout=600, check=True).stdout
    check.unlink()
    assert 'data-checked="yes"' in dom
    loaded = re.findall(r'<img [^>]*data-loaded="(true|false)"', dom)
    assert len(loaded) >= 7 and set(loaded) == {"true"}, loaded
    shot = tmp_path / "report.png"
    subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, *profile, f"--screenshot={shot}", "--window-size=1200,3000",
                    (out / "index.html").as_uri()], capture_output=True, timeout=600, check=True)
    with Image.open(shot) as image:
        assert image.size == (1200, 3000)
        colours = image.convert("RGB").resize((300, 750)).getcolors(maxcolors=1 << 20)
    assert len(colours) > 50  # plots and photos, not a blank or error page


def test_accuracy_plot_says_what_each_score_was_computed_against(tmp_path):
    """The plot gets counts from SQL (one row per backend, bin and reason), never a row per caption."""
    import duckdb

    from jobs.report import accuracy_plot, sql_text

    captions = [("k0", 0.9, "tagger", None), ("k1", 0.3, "tagger", None), ("k2", 0.7, "curated_tags", None),
                ("k3", 0.31, "tagger", None), ("k4", 1.0, "tagger", None), ("k9", None, None, "built_from_tags")]
    con = duckdb.connect()
    con.execute("""create table captions as select key, 'openai:joy' as backend, accuracy, accuracy < 0.4 as flagged,
                   scored_against, not_scored, true as accepted
                   from (values """ + ", ".join("(?, ?::double, ?, ?)" for _ in captions) + """)
                   t(key, accuracy, scored_against, not_scored)""", [v for row in captions for v in row])
    con.execute("create table edit_state (key varchar, field varchar, new varchar)")  # no person's caption
    con.execute("create table images as select key from captions")
    result = con.execute(sql_text("report_caption_accuracy"))
    rows = [dict(zip([d[0] for d in result.description], row, strict=True)) for row in result.fetchall()]
    assert len(rows) == 5  # the two captions of 0.3 and 0.31 are one row of 2
    assert {r["bin"] for r in rows} == {6, 14, 18, 19, None}
    html = accuracy_plot(tmp_path, rows)
    assert "6 captions: 5 scored, 1 against curated_tags, 4 against tagger; 1 not scored (built_from_tags); " \
           "2 flagged for review." in html
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_annotated_images_come_from_annotates_markers(tmp_path):
    """An image annotate ran on with no detection and no score leaves no row: the count is the
    markers', of the units ingest has now. The marker of a unit ingest retired since (its images
    left the input) once counted too, and "annotated" exceeded "ingested"."""
    from jobs.report import annotated_images
    from store.workspace import Workspace

    ws = Workspace(str(tmp_path / "ws"))
    for unit, n in (("a", 10), ("b", 5)):
        ws.write_part("images", f"{unit}-b00000", [{"key": f"{unit}/{i}"} for i in range(n)])
        ws.commit_unit("ingest", unit, {"images": n, "samples": n}, parts={"images": [f"{unit}-b00000"]})
    ws.write_part("errors", "removed-gone", [{"key": "gone/0", "kind": "removed_from_input"}])
    ws.commit_unit("ingest", "gone", {"retired": True}, parts={"errors": ["removed-gone"]})
    ws.publish()
    ws.commit_unit("annotate", "a", {"images": 10, "dropped": 2}, parts={})
    ws.commit_unit("annotate", "b", {"images": 5, "dropped": 0}, parts={"detections": ["annotate-b-face-x"]})
    ws.commit_unit("annotate", "gone", {"images": 7, "dropped": 0}, parts={})
    assert annotated_images(ws) == 13


# ---- workspaces written by hand: a few images with real bytes, the rows a case needs ----------
def hand_workspace(tmp_path, source: dict[str, list[str]], curated: dict[str, list[str]] | None = None,
                   *overrides: str):
    """Images `in/<name>` (PNG files in tmp_path/in, their input) with their source tags
    ("character:name" for a character tag), and, with `curated`, what curate made of the images
    it has seen: their tags (an empty list: all removed) and an image_meta row without characters."""
    from store.workspace import Workspace
    from tests.hostile_data import encode, picture

    folder, ws = tmp_path / "in", Workspace(str(tmp_path / "ws"))
    folder.mkdir()
    for i, name in enumerate(source):
        (folder / f"{name}.png").write_bytes(encode(picture(seed=i), "PNG"))
    ws.add_part("images", "hand", [{"key": f"in/{n}", "source": str(folder), "member": f"{n}.png", "width": 96,
                                    "height": 64, "format": "PNG", "mode": "RGB", "n_frames": 1} for n in source])
    ws.add_part("source_tags", "hand", [{"key": f"in/{n}", "tag": t.rpartition(":")[2],
                                         "category": t.rpartition(":")[0] or "general", "origin": "txt", "position": i}
                                        for n, tags in source.items() for i, t in enumerate(tags)])
    if curated is not None:
        ws.add_part("tags", "hand", [{"key": f"in/{n}", "tag": t, "category": "general", "score": 1.0, "rank": i}
                                     for n, tags in curated.items() for i, t in enumerate(tags)])
        ws.add_part("image_meta", "hand", [{"key": f"in/{n}", "characters": []} for n in curated])
    return base_config(tmp_path / "ws", *overrides), ws


def test_labels_with_dollars_are_drawn_as_typed(tmp_path):
    """A tag like `$_$` once crashed the report (matplotlib's mathtext); `$x^2$` was drawn as x²."""
    import matplotlib
    from PIL import Image

    from jobs.report import balance_plot, bar_plot

    def width(name: str, label: str) -> int:
        bar_plot(tmp_path, name, [label], [1], "images")
        with Image.open(tmp_path / f"{name}.png") as image:
            return image.width

    # as math, `$x^2$` is an x with a small 2, narrower than the three characters x^2; as typed, wider
    assert width("typed", "dollar $x^2$ math") > width("plain", "dollar x^2 math")
    assert width("smiley", "$_$") > width("underscore", "_")
    balance_plot(tmp_path, [{"path": "$_$/dollar $x^2$ math", "images": 1, "samples": 1.0, "share_before": 1.0,
                             "share_after": 1.0}])
    assert (tmp_path / "balance.png").is_file()
    assert matplotlib.rcParams["text.parse_math"]  # only the report's plots draw text as typed


def test_tags_curate_removed_are_never_shown(tmp_path):
    """`bad` was removed by curate from both images it saw (b kept none); c, not curated yet,
    shows its source tags: the rule of the image_tag_lists view that export reads."""
    from jobs import report

    cfg, ws = hand_workspace(tmp_path, {"a": ["smile", "bad"], "b": ["bad"], "c": ["cat"]},
                             curated={"a": ["smile"], "b": []})
    data = report.report_data(cfg, ws)
    assert {r["tag"]: r["images"] for r in data["tags"]} == {"smile": 1, "cat": 1}
    assert {r["key"]: r["tags"] for r in data["examples"]} == {"in/a": ["smile"], "in/b": [], "in/c": ["cat"]}
    report.run(cfg, ws)
    assert "bad" not in (tmp_path / "ws" / "report" / "index.html").read_text()


def test_samples_seen_is_ingests_accounting(tmp_path, ray_local):
    """A clip is one sample however many frames it keeps, and each dropped member is one sample,
    also three of the same name: the report says what ingest's own summary line says (its count
    of images and distinct dropped keys was 6 here: 2 frames for one clip, 3 drops as 1)."""
    from jobs import ingest, report
    from store.workspace import Workspace
    from tests.clip_data import three_scenes, write_gif
    from tests.hostile_data import encode, picture, write_tar

    gif = write_gif(tmp_path / "anim.gif", three_scenes(seconds=1.0, fps=4)).read_bytes()
    dup = encode(picture(seed=2), "PNG")
    # a name met again after other members is a sample of its own, dropped (duplicate_key)
    write_tar(tmp_path / "s.tar", [("dup.png", dup), ("still.png", encode(picture(seed=1), "PNG")), ("dup.png", dup),
                                   ("anim.gif", gif), ("dup.png", dup), ("ok.png", dup), ("dup.png", dup)])
    cfg = base_config(tmp_path / "ws", f'ingest.inputs=["{tmp_path / "s.tar"}"]')
    ws = Workspace(str(tmp_path / "ws"))
    summary = ingest.run(cfg, ws)
    frames = summary.rows_out["frames"]
    assert frames >= 2 and f"+ 1 clips ({frames} frames) + 3 dropped samples = 7 samples seen" in summary.render()
    stages = {r["stage"]: r["images"] for r in report.report_data(cfg, ws)["stages"]}
    assert stages["samples seen"] == summary.rows_in == 7
    assert stages["ingested"] == 3 + frames  # still.png, ok.png, the first dup.png and the frames


def test_examples_are_the_exported_images_of_any_layout(tmp_path):
    """An export without the webdataset layout (kohya only, here of one image of three) once left
    the examples to all the images, exported or not."""
    from jobs import report

    cfg, ws = hand_workspace(tmp_path, {"a": ["smile"], "b": ["smile"], "c": ["smile"]})
    ws.add_part("export_manifest", "hand", [{"key": "in/b", "sample_key": "in__b", "layout": "kohya",
                                             "path": "kohya/1_smile", "image": "in__b.png"}])
    assert [r["key"] for r in report.report_data(cfg, ws)["examples"]] == ["in/b"]
    report.run(cfg, ws)
    page = (tmp_path / "ws" / "report" / "index.html").read_text()
    assert re.findall(r'<img src="(examples/[^"]+)"', page) == ["examples/in__b.jpg"]


def test_examples_fall_back_to_the_inputs_when_the_export_is_elsewhere(tmp_path):
    """The shards are not where this config says the export is (export.out elsewhere, the folder
    moved or removed): the cards show the images from their inputs, not "image not found"."""
    from jobs import report

    cfg, ws = hand_workspace(tmp_path, {"a": ["smile"], "b": ["smile"]}, None,
                             f'export.out="{tmp_path / "moved"}"')
    ws.add_part("export_manifest", "hand", [
        {"key": f"in/{n}", "sample_key": f"in__{n}", "layout": "webdataset", "path": "webdataset/shard-000000.tar",
         "image": f"in__{n}.png"} for n in "ab"])
    report.run(cfg, ws)
    out = tmp_path / "ws" / "report"
    page = (out / "index.html").read_text()
    assert "image not found" not in page
    assert re.findall(r'<img src="(examples/[^"]+)"', page) == ["examples/in__a.jpg", "examples/in__b.jpg"]
    assert all((out / "examples" / f"in__{n}.jpg").read_bytes()[:2] == b"\xff\xd8" for n in "ab")


def test_a_report_leaves_only_its_own_files(tmp_path):
    """Plots and thumbnails of an earlier report that this one does not write (no captions or
    balance now, fewer examples) once stayed beside the page, and the summary counted every PNG
    of the folder. Files that are not the report's stay."""
    from jobs import report

    cfg, ws = hand_workspace(tmp_path, {"a": ["smile"], "b": ["smile"], "c": ["cat"]})
    out = tmp_path / "ws" / "report"
    (out / "examples").mkdir(parents=True)
    for old in ("accuracy.png", "balance.png", "examples/in__gone.jpg"):
        (out / old).write_bytes(b"written by an earlier report")
    (out / "notes.txt").write_text("a person's notes")
    report.run(cfg, ws)
    cfg["report"]["examples"] = 1
    summary = report.run(cfg, ws)
    shown = set(re.findall(r'<img src="([^"]+)"', (out / "index.html").read_text()))
    assert {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()} == shown | {"index.html",
                                                                                            "notes.txt"}
    plots = {s for s in shown if not s.startswith("examples/")}
    assert "stages.png" in plots and len(shown - plots) == 1
    assert summary.rows_out == {"plots": len(plots), "examples": 1}


def test_a_report_of_the_same_inputs_is_kept_and_any_change_writes_it_again(tmp_path):
    """A second report with nothing new (a `booruset run` again) queried every table and drew
    every plot again: ~50 s at a million images. Now kept; a new row, another option or a file of
    the page gone writes it again."""
    from jobs import report

    cfg, ws = hand_workspace(tmp_path, {"a": ["smile"], "b": ["cat"]})
    page = tmp_path / "ws" / "report" / "index.html"
    first = report.run(cfg, ws)
    assert first.units_done == 1
    written = page.read_text()
    again = report.run(cfg, ws)
    assert (again.units_done, again.units_skipped) == (0, 1) and page.read_text() == written
    # the kept page's counts, as the run that wrote it said them (they were rows in 0, rows out none)
    assert (again.rows_in, again.rows_out) == (first.rows_in, first.rows_out) == (2, first.rows_out)
    assert first.rows_out["plots"] > 0
    assert any("nothing the report shows changed" in note for note in again.notes)

    ws.add_part("source_tags", "more", [{"key": "in/b", "tag": "dog", "category": "general", "origin": "txt",
                                         "position": 1}])
    assert report.run(cfg, ws).units_done == 1 and "dog" in page.read_text()
    cfg["report"]["top_n"] = 1
    assert report.run(cfg, ws).units_done == 1
    (page.parent / "tags.png").unlink()
    assert report.run(cfg, ws).units_done == 1 and (page.parent / "tags.png").is_file()
    assert report.run(cfg, ws).units_done == 0


def test_a_report_folder_of_other_files_is_refused_and_left_as_it_was(tmp_path, capsys):
    """report.out set to a folder of a person's files: the report overwrote its index.html and
    stages.png and deleted every examples/*.jpg it did not show (their holiday photos), exit 0.
    Now refused before any job; a new or empty folder, or one holding a report, is written."""
    from jobs import cli

    hand_workspace(tmp_path, {"a": ["smile"]})
    mine = tmp_path / "mine"
    (mine / "examples").mkdir(parents=True)
    files = {"examples/holiday.jpg": b"a photo", "stages.png": b"my plot", "index.html": b"<p>my page</p>"}
    for name, data in files.items():
        (mine / name).write_bytes(data)
    capsys.readouterr()
    assert cli.main(["report", "-w", str(tmp_path / "ws"), "--set", f'report.out="{mine}"']) == 2
    assert capsys.readouterr().err == (f"booruset: configuration error: report.out {str(mine)!r} holds files that "
                                       "are not a booruset report: give a new or empty folder\n")
    assert {p.relative_to(mine).as_posix(): p.read_bytes() for p in mine.rglob("*") if p.is_file()} == files
    for out in (tmp_path / "new", tmp_path / "new"):  # new, then holding the report written the first time
        assert cli.main(["report", "-w", str(tmp_path / "ws"), "--set", f'report.out="{out}"']) == 0
        assert "stages.png" in (out / "index.html").read_text()
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", "-w", str(tmp_path / "ws"), "--set", f'report.out="{tmp_path / "empty"}"']) == 0


@pytest.mark.parametrize("option", ["report.top_n=0", "report.top_n=1001", "report.top_n=99999999999999999999",
                                    "report.examples=1001", "report.thumb_size=0",
                                    "report.thumb_size=15", "report.thumb_size=99999999999999999999"])
def test_odd_report_options_are_one_line_configuration_errors(tmp_path, capsys, option):
    """top_n=0 said "No tags in this workspace", thumb_size=0 made broken cards, a top_n past
    DuckDB's BIGINT ended in a ConversionException (exit 1)."""
    from jobs import cli
    from store.workspace import Workspace

    Workspace(str(tmp_path / "ws"))
    assert cli.main(["report", "-w", str(tmp_path / "ws"), "--set", option]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"booruset: configuration error: {option.split('=')[0]} ") and err.count("\n") == 1
    assert not (tmp_path / "ws" / "report").exists()


def test_a_run_refuses_odd_report_options_before_its_first_job(tmp_path, capsys):
    """The report is the last job of `booruset run`: its options are checked before ingest starts."""
    from jobs import cli
    from tests.hostile_data import encode, picture

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.png").write_bytes(encode(picture(), "PNG"))
    assert cli.main(["run", "-i", str(tmp_path / "in"), "-w", str(tmp_path / "ws"), "--set", "report.top_n=0"]) == 2
    assert capsys.readouterr().err.startswith("booruset: configuration error: report.top_n ")
    assert not (tmp_path / "ws").exists()


def test_no_examples_is_said_as_such(tmp_path):
    """report.examples=0 said "No images in this workspace." under Examples."""
    from jobs import report

    cfg, ws = hand_workspace(tmp_path, {"a": ["smile"]}, None, "report.examples=0")
    summary = report.run(cfg, ws)
    page = (tmp_path / "ws" / "report" / "index.html").read_text()
    assert "No example images: report.examples is 0." in page and "No images" not in page
    assert not (tmp_path / "ws" / "report" / "examples").exists() and summary.rows_out["examples"] == 0


def test_characters_of_images_curate_has_not_seen_come_from_their_source_tags(tmp_path):
    """Before curate ran, the section said "No characters in this workspace." though the sidecars
    named them. An image curate has seen has curate's characters (here none), whatever its sidecar says."""
    from jobs import report

    source = {"a": ["character:hatsune_miku", "smile"], "b": ["smile"], "c": ["character:hatsune_miku"]}
    for case, curated, expected in (("before", None, {"hatsune_miku": 2, "(none)": 1}),
                                    ("after", {"a": ["smile"]}, {"hatsune_miku": 1, "(none)": 2})):
        (tmp_path / case).mkdir()
        cfg, ws = hand_workspace(tmp_path / case, source, curated)
        assert {r["character"]: r["images"] for r in report.report_data(cfg, ws)["characters"]} == expected, case


@pytest.mark.parametrize(("drop_duplicates", "expected"), [
    ("true", {"g1": (1, 2.0), "g2": (2, 2.0)}),
    ("false", {"g1": (2, 4.0), "g2": (2, 2.0)}),
])
def test_balance_counts_the_images_the_export_keeps(tmp_path, drop_duplicates, expected):
    """The balance gives a group's multiply to the images the export keeps (near duplicates that
    are not their group's representative are left out, export.drop_duplicates): the report summed
    multiply over every image, so on the sample a group of 12 images, 8 of them such duplicates,
    showed 12 training samples where the export wrote 4."""
    from jobs import report

    cfg, ws = hand_workspace(tmp_path, {"a": [], "b": [], "c": [], "d": []}, None,
                             f"export.drop_duplicates={drop_duplicates}")
    ws.add_part("balance", "hand", [{"key": f"in/{k}", "path": path, "weight": 1.0, "probability": 0.5,
                                     "multiply": multiply, "repeats": int(multiply)}
                                    for k, path, multiply in (("a", "g1", 2.0), ("b", "g1", 2.0),
                                                              ("c", "g2", 1.0), ("d", "g2", 1.0))])
    ws.add_part("duplicates", "hand", [{"key": "in/a", "dup_group": "in/a", "is_representative": True,
                                        "reason": "phash"},
                                       {"key": "in/b", "dup_group": "in/a", "is_representative": False,
                                        "reason": "phash"}])
    rows = report.report_data(cfg, ws)["balance"]
    assert {r["path"]: (r["images"], r["samples"]) for r in rows} == expected
    total = sum(samples for _, samples in expected.values())
    assert {r["path"]: r["share_after"] for r in rows} == {p: s / total for p, (_, s) in expected.items()}


def test_people_counts_each_image_of_the_images_table_once(tmp_path):
    """People per image read image_meta alone: images ingested since curate ran were not in it (26
    images, bars adding up to 24), and an image gone from the inputs still counted until curate ran."""
    from jobs import report

    cfg, ws = hand_workspace(tmp_path, {"a": [], "b": [], "c": []})
    ws.add_part("image_meta", "hand", [{"key": "in/a", "n_people": 1, "characters": []},
                                       {"key": "in/gone", "n_people": 2, "characters": []}])
    people = report.report_data(cfg, ws)["people"]
    assert [(r["n_people"], r["images"]) for r in people] == [("1", 1), ("unknown", 2)]


def test_a_caption_a_person_wrote_in_review_is_the_one_shown_and_not_scored(tmp_path):
    """The export writes a person's caption (`booruset review`) in place of the generated one, not
    scored (`edited_by_person`): the report's card showed the generated caption with its accuracy,
    and the accuracy section counted that replaced caption's score."""
    from datetime import UTC, datetime

    from jobs import report

    cfg, ws = hand_workspace(tmp_path, {"a": ["smile"], "b": ["smile"]})
    ws.add_part("captions", "hand", [{"key": f"in/{n}", "attempt": 0, "backend": "openai:joy", "caption": f"Made {n}.",
                                      "accuracy": 0.75, "scored_against": "tagger", "flagged": False, "accepted": True}
                                     for n in "ab"])
    ws.add_part("edits", "hand", [{"key": "in/a", "field": "caption", "old": "Made a.", "new": "A person <wrote> this.",
                                   "time": datetime.now(UTC), "seq": 0, "batch": "b1"}])
    data = report.report_data(cfg, ws)
    assert {r["key"]: (r["caption"], r["accuracy"]) for r in data["examples"]} == {
        "in/a": ("A person <wrote> this.", None), "in/b": ("Made b.", 0.75)}
    assert {(r["bin"], r["not_scored"], r["n"]) for r in data["accuracy"]} == {(15, None, 1),
                                                                              (None, "edited_by_person", 1)}
    report.run(cfg, ws)
    page = (tmp_path / "ws" / "report" / "index.html").read_text()
    assert "A person &lt;wrote&gt; this." in page and "Made a." not in page
    assert "2 captions: 1 scored, 1 against tagger; 1 not scored (edited_by_person)" in page


def test_a_character_a_person_set_in_review_is_counted_as_the_export_writes_it(tmp_path):
    """The export writes a person's character (`booruset review`) at once; the report counted the
    image under its curated character until curate ran again. "" clears it, as in the export."""
    from datetime import UTC, datetime

    from jobs import report

    cfg, ws = hand_workspace(tmp_path, {"a": ["character:hatsune_miku"], "b": ["character:hatsune_miku"],
                                        "c": ["character:hatsune_miku"]})
    now = datetime.now(UTC)
    ws.add_part("edits", "hand", [{"key": "in/a", "field": "character", "old": "hatsune_miku", "new": "eileen_(renpy)",
                                   "time": now, "seq": 0, "batch": "b1"},
                                  {"key": "in/b", "field": "character", "old": "hatsune_miku", "new": "",
                                   "time": now, "seq": 1, "batch": "b1"}])
    assert {r["character"]: r["images"] for r in report.report_data(cfg, ws)["characters"]} == {
        "eileen_(renpy)": 1, "hatsune_miku": 1, "(none)": 1}


def test_an_image_gone_from_the_inputs_counts_in_no_stage_nor_group(tmp_path):
    """Ingest run again after a picture left the input: until curate and caption ran again, the
    report said 2 ingested but 3 tagged and 3 captioned, and its balance group still held it (the
    export, which starts from the images table, leaves it out)."""
    from jobs import report

    cfg, ws = hand_workspace(tmp_path, {"a": [], "b": []})
    keys = ["in/a", "in/b", "in/gone"]
    ws.add_part("tags", "hand", [{"key": k, "tag": "smile", "category": "general", "score": 1.0, "rank": 0}
                                 for k in keys])
    ws.add_part("captions", "hand", [{"key": k, "attempt": 0, "backend": "template", "caption": "A smile.",
                                      "accepted": True} for k in keys])
    ws.add_part("balance", "hand", [{"key": k, "path": "g1", "weight": 1.0, "probability": 1.0, "multiply": 1.0,
                                     "repeats": 1} for k in keys])
    ws.add_part("duplicates", "hand", [{"key": k, "dup_group": "in/a", "is_representative": k == "in/a",
                                        "reason": "phash"} for k in ("in/a", "in/gone")])
    data = report.report_data(cfg, ws)
    stages = {r["stage"]: r["images"] for r in data["stages"]}
    assert stages["ingested"] == stages["tagged (curated tags)"] == stages["captioned"] == 2
    assert stages["after duplicates"] == 2  # the gone duplicate is no image left out
    assert [(r["path"], r["images"], r["samples"]) for r in data["balance"]] == [("g1", 2, 2.0)]
    assert sum(r["n"] for r in data["accuracy"]) == 2


def test_an_example_rewritten_since_ingest_is_not_shown_as_the_one_ingest_saw(tmp_path):
    """A file replaced in the input folder after ingest: its card showed the new picture beside the
    caption and tags of the old one (the export refuses it: not of the size ingest saw)."""
    from jobs import report
    from store.workspace import Workspace
    from tests.hostile_data import encode, picture

    folder, ws = tmp_path / "in", Workspace(str(tmp_path / "ws"))
    folder.mkdir()
    kept, replaced = encode(picture(seed=1), "PNG"), encode(picture(seed=2), "PNG")
    (folder / "kept.png").write_bytes(kept)
    (folder / "replaced.png").write_bytes(replaced)
    ws.add_part("images", "hand", [{"key": f"in/{n}", "source": str(folder), "member": f"{n}.png", "width": 96,
                                    "height": 64, "format": "PNG", "mode": "RGB", "n_frames": 1, "bytes": len(data)}
                                   for n, data in (("kept", kept), ("replaced", replaced))])
    (folder / "replaced.png").write_bytes(encode(picture(200, 150, seed=3), "PNG"))
    report.run(base_config(tmp_path / "ws"), ws)
    page = (tmp_path / "ws" / "report" / "index.html").read_text()
    assert re.findall(r'<img src="(examples/[^"]+)"', page) == ["examples/in__kept.jpg"]
    assert page.count("image not found") == 1


def test_an_image_excluded_in_review_is_not_in_its_balance_group(tmp_path):
    """The export leaves an image excluded in review out at once; the balance section counted it
    (images and samples) until curate ran again. Included again, it counts again."""
    from datetime import UTC, datetime, timedelta

    from jobs import report

    cfg, ws = hand_workspace(tmp_path, {"a": [], "b": [], "c": []})
    ws.add_part("balance", "hand", [{"key": f"in/{k}", "path": "g1", "weight": 1.0, "probability": 1.0,
                                     "multiply": 2.0, "repeats": 2} for k in "abc"])
    now = datetime.now(UTC)
    ws.add_part("edits", "hand", [{"key": "in/a", "field": "exclude", "old": "false", "new": "true", "time": now,
                                   "seq": 0, "batch": "b1"},
                                  {"key": "in/b", "field": "exclude", "old": "false", "new": "true", "time": now,
                                   "seq": 1, "batch": "b1"},
                                  {"key": "in/b", "field": "exclude", "old": "true", "new": "false",
                                   "time": now + timedelta(seconds=1), "seq": 0, "batch": "b2"}])
    rows = report.report_data(cfg, ws)["balance"]
    assert [(r["path"], r["images"], r["samples"]) for r in rows] == [("g1", 2, 4.0)]


def test_examples_whose_object_storage_is_down_are_left_out_not_the_report(monkeypatch):
    """The report needs read access to the workspace alone: an input whose endpoint is down (here,
    a port nothing listens on) loses its examples, as a missing file does, and the report is still
    written; the shards and folders that answer give theirs."""
    from jobs import report
    from tests.s3_server import AWS, free_port

    for name, value in AWS.items():
        monkeypatch.setenv(name, value)
    down = f"s3://ws-bucket/in/?endpoint_override=127.0.0.1:{free_port()}&scheme=http&region=us-east-1"
    rows = [{"key": "in/a", "source": down, "member": "a.png", "member_offset": None, "bytes": 10}]
    assert report.input_bytes(rows) == {}


def test_balance_counts_what_the_export_selects_when_inputs_go_and_representatives_are_left_out(tmp_path):
    """The balance section counts the images the export selects: the report left in a group the
    images of an input whose folder is gone (moved), which the export leaves out ("gone with their
    input"), and an image whose accepted caption is flagged (export.drop_flagged); and it took
    curate's representative of a near-duplicate group, so a representative excluded in review took
    its whole group out of the section while the export writes the next copy in its place."""
    from datetime import UTC, datetime

    from jobs import export, report
    from store.workspace import INPUT_REGISTRY

    cfg, ws = hand_workspace(tmp_path, {"a": [], "b": [], "c": [], "d": [], "e": []})
    ws.add_part("images", "gone", [{"key": f"moved/{n}", "source": str(tmp_path / "moved"), "member": f"{n}.png",
                                    "width": 96, "height": 64, "format": "PNG", "mode": "RGB", "n_frames": 1}
                                   for n in ("x", "y")])
    ws.write_json(INPUT_REGISTRY, {str(tmp_path / "in"): "in", str(tmp_path / "moved"): "moved"})
    groups = {"in/a": "g1", "in/b": "g1", "in/c": "g2", "in/d": "g2", "in/e": "g2", "moved/x": "g2", "moved/y": "g3"}
    ws.add_part("balance", "hand", [{"key": k, "path": g, "weight": 1.0, "probability": 0.5, "multiply": 2.0,
                                     "repeats": 2} for k, g in groups.items()])
    ws.add_part("duplicates", "hand", [{"key": k, "dup_group": "in/a", "is_representative": k == "in/a",
                                        "reason": "phash"} for k in ("in/a", "in/b")])
    ws.add_part("captions", "hand", [{"key": "in/c", "attempt": 0, "backend": "template", "caption": "A smile.",
                                      "accuracy": 0.1, "flagged": True, "accepted": True}])
    ws.add_part("edits", "hand", [{"key": "in/a", "field": "exclude", "old": "false", "new": "true",
                                   "time": datetime.now(UTC), "seq": 0, "batch": "b1"}])
    _, _, units, left_out = export.stage_selection(ws, cfg["export"], 100, 100)
    assert left_out == {"gone with their input": 2, "excluded in review": 1, "flagged captions": 1}
    staged = sorted({f for u in units for f in u["files"]})
    selected = ws.connect().execute("select key from read_parquet($files)", {"files": staged}).fetchall()
    exported = Counter(groups[k] for (k,) in selected)
    assert exported == {"g1": 1, "g2": 2}  # in/b in place of in/a; in/d and in/e
    rows = report.report_data(cfg, ws)["balance"]
    assert {r["path"]: (r["images"], r["samples"]) for r in rows} == {g: (n, 2.0 * n) for g, n in exported.items()}


def test_after_duplicates_keeps_the_copy_the_export_keeps_in_place_of_a_representative_it_leaves_out(tmp_path):
    """A group's representative whose file an ingest removed since curate (or one excluded in review):
    the export keeps the group's next copy, but the stages counted that copy among the near
    duplicates left out, one image fewer "after duplicates" than the export keeps per such group."""
    from datetime import UTC, datetime

    from jobs import report

    cfg, ws = hand_workspace(tmp_path, {"b": [], "c": [], "d": [], "e": []})
    ws.add_part("duplicates", "hand", [
        {"key": k, "dup_group": group, "is_representative": rep, "reason": "phash"}
        for k, group, rep in (("in/removed", "g1", True), ("in/b", "g1", False),
                              ("in/c", "g2", True), ("in/d", "g2", False), ("in/e", "g2", False))])
    ws.add_part("edits", "hand", [{"key": "in/c", "field": "exclude", "old": "false", "new": "true",
                                   "time": datetime.now(UTC), "seq": 0, "batch": "b1"}])
    stages = {r["stage"]: r["images"] for r in report.report_data(cfg, ws)["stages"]}
    # in/b stands in for the removed picture, in/d for the excluded in/c; in/c and in/e are left out
    assert stages["ingested"] == 4 and stages["after duplicates"] == 2


def test_images_the_export_writes_without_a_balance_group_are_counted(tmp_path):
    """Images ingested since curate ran (or included again in review after curate left them out of
    the balance) are exported with no group, once each (kohya's `1_all`); the balance section
    left them out, so its shares were not those of the export (2 images of 3 in g1: 100%)."""
    from jobs import export, report

    cfg, ws = hand_workspace(tmp_path, {"a": [], "b": [], "c": []})
    ws.add_part("balance", "hand", [{"key": f"in/{k}", "path": "g1", "weight": 1.0, "probability": 0.5,
                                     "multiply": 2.0, "repeats": 2} for k in "ab"])
    _, _, units, _ = export.stage_selection(ws, cfg["export"], 100, 100)
    staged = sorted({f for u in units for f in u["files"]})
    exported = dict(ws.connect().execute('select "group", sum(repeats) from read_parquet($files) group by 1',
                                         {"files": staged}).fetchall())
    assert exported == {"g1": 4, "": 1}
    rows = report.report_data(cfg, ws)["balance"]
    assert [(r["path"], r["images"], r["samples"]) for r in rows] == [("g1", 2, 4.0), (report.NO_GROUP, 1, 1.0)]
    assert [r["share_before"] for r in rows] == [2 / 3, 1 / 3]


def test_examples_before_an_export_are_not_picked_from_an_input_that_is_gone(tmp_path):
    """Before any export, the examples are picked over the images table: those of an input whose
    folder is gone (moved, and ingested again at its new path) took places as "image not found"
    cards, where the images that are there were not shown."""
    from jobs import report
    from store.workspace import INPUT_REGISTRY

    cfg, ws = hand_workspace(tmp_path, {"a": ["smile"], "b": ["smile"]}, None, "report.examples=2")
    ws.add_part("images", "gone", [{"key": f"moved/{n}", "source": str(tmp_path / "moved"), "member": f"{n}.png",
                                    "width": 96, "height": 64, "format": "PNG", "mode": "RGB", "n_frames": 1}
                                   for n in "abcdefgh"])
    ws.write_json(INPUT_REGISTRY, {str(tmp_path / "in"): "in", str(tmp_path / "moved"): "moved"})
    assert [r["key"] for r in report.report_data(cfg, ws)["examples"]] == ["in/a", "in/b"]
    report.run(cfg, ws)
    assert "image not found" not in (tmp_path / "ws" / "report" / "index.html").read_text()


def test_after_duplicates_leaves_none_out_when_the_export_keeps_duplicates(tmp_path):
    """With export.drop_duplicates off the export writes every copy, as the balance section counts
    them; the stages still took the near duplicates out "after duplicates"."""
    from jobs import report

    cfg, ws = hand_workspace(tmp_path, {"a": [], "b": [], "c": []}, None, "export.drop_duplicates=false")
    ws.add_part("duplicates", "hand", [{"key": k, "dup_group": "in/a", "is_representative": k == "in/a",
                                        "reason": "phash"} for k in ("in/a", "in/b")])
    stages = {r["stage"]: r["images"] for r in report.report_data(cfg, ws)["stages"]}
    assert stages["ingested"] == stages["after duplicates"] == 3
