"""`booruset report`: one HTML page with PNG plots of a run, from the workspace tables.

Sections: images per stage, errors by kind, tag frequencies, characters, people per image,
balance before and after multiply, caption accuracy, and example images (thumbnails of the
exported samples, else of the inputs) with their caption and tags. The numbers come from the
sql/report_*.sql queries; the plots are matplotlib (Agg) PNG files beside the page:

    <out>/index.html, <out>/*.png, <out>/examples/*.jpg    (out: [report] out or <workspace>/report)
"""

from __future__ import annotations

import html
import io
import re
import tarfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import duckdb
import matplotlib

matplotlib.use("Agg")  # headless: no display on clusters and in CI
import matplotlib.pyplot as plt  # noqa: E402

import schemas  # noqa: E402
from jobs.config import REPO, Config, ConfigError, out_folder  # noqa: E402
from jobs.summary import JobSummary  # noqa: E402
from store.stamps import code_digest, file_stamps, fingerprint  # noqa: E402
from store.uris import StoreError  # noqa: E402
from store.workspace import INPUT_REGISTRY, Workspace  # noqa: E402
from udfs.export.export_shard import atomic_write  # noqa: E402
from udfs.export.safe_names import safe_name  # noqa: E402
from udfs.source_members import source_members  # noqa: E402
from udfs.thumbnails import thumbnail_jpeg  # noqa: E402

JOB = "report"
EXPORT_OPTIONS = ("drop_duplicates", "drop_flagged", "out")
CODE = [REPO / "jobs" / "report.py", REPO / "udfs" / "thumbnails.py", REPO / "udfs" / "source_members.py",
        REPO / "sql" / "export_duplicates.sql", *sorted((REPO / "sql").glob("report_*.sql"))]
# Labels are tags, keys and group paths as typed: matplotlib reads the text between two `$` as
# math (mathtext), which drew `$x^2$` as x squared and failed on a tag such as `$_$`. Set for
# each plot (a decorator), not globally: a program that imports the report keeps its setting.
LITERAL_TEXT = {"text.parse_math": False}
# The plots a report can write (<out>/<name>.png), beside <out>/examples/*.jpg.
PLOTS = ("stages", "errors", "tags", "characters", "people", "balance", "accuracy")
# The balance section's row of the images the export writes with no group (once each, kohya's
# `1_all`): curate has not balanced them yet.
NO_GROUP = "(no group: not balanced by curate yet)"


def sql_text(name: str) -> str:
    return (REPO / "sql" / f"{name}.sql").read_text(encoding="utf-8")


# In the head of every report's index.html (render_page): how a folder is known to hold one.
PAGE_MARK = "<title>booruset report</title>"
INPUTS_MARK = '<meta name="booruset-inputs" content="{}">'  # what the page was made of (report_inputs)
IMAGES_MARK = '<meta name="booruset-images" content="{}">'  # the images it counted: a kept page's rows in


def report_dir(cfg: Config, ws: Workspace) -> Path:
    return out_folder(JOB, cfg, ws.local, ws.base)


def check_out(folder: Path) -> None:
    """report.out, when set, must be new, empty or hold a report: a report replaces index.html and
    its plots and removes the examples/*.jpg it does not show, which in a folder of other files
    were a person's own (their page and photos, gone without a word)."""
    if folder.is_dir() and any(folder.iterdir()) and not holds_report(folder):
        raise ConfigError(f"report.out {str(folder)!r} holds files that are not a booruset report: "
                          "give a new or empty folder")


def holds_report(folder: Path) -> bool:
    try:
        with open(folder / "index.html", encoding="utf-8", errors="replace") as page:
            return PAGE_MARK in page.read(1000)
    except OSError:
        return False


def run(cfg: Config, ws: Workspace) -> JobSummary:
    started = time.perf_counter()
    opts = cfg[JOB]  # its bounds are checked with the config (jobs/config.DOMAINS)
    out = report_dir(cfg, ws)
    out.mkdir(parents=True, exist_ok=True)
    stamp = report_inputs(cfg, ws, out)
    if (page := report_current(out, stamp)) is not None:
        summary = JobSummary(JOB, units_skipped=1, rows_in=page_images(page), rows_out=shown_counts(page_files(page)))
        summary.notes += ["nothing the report shows changed since it was written (tables, markers, export, "
                          "options, code): kept", f"report: {out / 'index.html'}"]
        return summary
    if not (out / "index.html").exists():  # the folder holds a report from now on, if killed too (check_out)
        atomic_write(str(out / "index.html"), render_page(ws.root, ["<p>The report is being written.</p>"]).encode())
    data = report_data(cfg, ws)
    images = next((r["images"] for r in data["stages"] if r["stage"] == "ingested"), 0)
    page = render_page(ws.root, page_sections(out, data, opts, export_folder(cfg, ws),
                                              bool(cfg["export"]["drop_duplicates"])), stamp, images)
    atomic_write(str(out / "index.html"), page.encode())
    shown = page_files(page)
    remove_stale(out, shown)
    summary = JobSummary(JOB, rows_in=images, units_done=1, rows_out=shown_counts(shown))
    summary.seconds = time.perf_counter() - started
    summary.notes.append(f"report: {out / 'index.html'}")
    return summary


def report_inputs(cfg: Config, ws: Workspace, out: Path) -> str:
    """A digest of what the page is made of: the published tables, the ingest and annotate
    markers (samples seen, images annotated), the input registry (inputs gone), the export's
    manifest file (its shards hold the examples), the options and the code."""
    markers = {job: sorted((unit, info.get("samples"), info.get("images"), info.get("dropped"), info.get("retired"))
                           for unit, info in ws.done_units(job).items()) for job in ("ingest", "annotate")}
    export = export_folder(cfg, ws)
    return fingerprint(ws, schemas.TABLES, markers=markers, registry=ws.read_json(INPUT_REGISTRY),
                       export=[export, file_stamps(f"{export}/manifest.parquet") if export else []],
                       options={"report": cfg[JOB], "export": {k: cfg["export"][k] for k in EXPORT_OPTIONS}},
                       out=str(out), code=code_digest(CODE))


def report_current(out: Path, stamp: str) -> str | None:
    """Whether `out` holds the report of these inputs (report_inputs, in its page's head) with
    every file it shows: a rerun with nothing new (a `booruset run` again) rebuilt it, ~50 s at a
    million images. Kept in the page, not the workspace: the report only reads the workspace."""
    try:
        page = (out / "index.html").read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None
    current = INPUTS_MARK.format(stamp) in page[:1000] and all((out / name).is_file() for name in page_files(page))
    return page if current else None


def page_images(page: str) -> int:
    """The images a page counted (IMAGES_MARK; 0 in a page written before it was kept there)."""
    found = re.search(IMAGES_MARK.format(r"(\d+)"), page[:1000])
    return int(found.group(1)) if found else 0


def shown_counts(shown: set[str]) -> dict[str, int]:
    """The summary's rows out: the plots and the example thumbnails a page shows."""
    examples = sum(1 for f in shown if f.startswith("examples/"))
    return {"plots": len(shown) - examples, "examples": examples}


def page_sections(out: Path, data: dict[str, list[dict]], opts: dict, export: str,
                  drop_duplicates: bool = True) -> list[str]:
    """The sections of the page; their plots and thumbnails are written into `out`."""
    return [
        section("Images per stage", bar_plot(out, "stages", [r["stage"] for r in data["stages"]],
                                             [r["images"] for r in data["stages"]], "images")),
        section("Errors by kind", bar_plot(out, "errors", [f"{r['stage']}: {r['kind']}" for r in data["errors"]],
                                           [r["n"] for r in data["errors"]], "errors"), error_table(data["errors"])),
        section(f"Tag frequencies (top {int(opts['top_n'])} general tags)",
                bar_plot(out, "tags", [r["tag"] for r in data["tags"]], [r["images"] for r in data["tags"]], "images")),
        section("Characters", bar_plot(out, "characters", [r["character"] for r in data["characters"]],
                                       [r["images"] for r in data["characters"]], "images")),
        section("People per image", bar_plot(out, "people", [r["n_people"] for r in data["people"]],
                                             [r["images"] for r in data["people"]], "images", horizontal=False)),
        section("Balance before and after multiply", balance_plot(out, data["balance"]),
                "<p>Over the images the export keeps: near duplicates that are not their group's representative "
                "are left out (export.drop_duplicates).</p>" if data["balance"] and drop_duplicates else "",
                "<p>The images of inputs whose folder or shard is gone, those excluded in review and, with "
                "export.drop_flagged, those with a flagged caption are left out, as the export leaves them out "
                "(export.where is not applied).</p>"
                if data["balance"] else ""),
        section("Caption accuracy", accuracy_plot(out, data["accuracy"])),
        section("Examples", examples_html(out, data["examples"], int(opts["thumb_size"]), export,
                                            int(opts["examples"]))),
    ]


def page_files(page: str) -> set[str]:
    """The plots and thumbnails the page shows, relative to its folder: each one this run wrote."""
    return {html.unescape(src) for src in re.findall(r'<img src="([^"]+)"', page)}


def remove_stale(out: Path, shown: set[str]) -> None:
    """Remove the plots and thumbnails of an earlier report that this one did not write (a section
    with no data now, fewer or other examples): a reader of the folder, and the summary's count,
    see this report's files only. Other files of the folder are left alone."""
    written = [out / f"{name}.png" for name in PLOTS] + list((out / "examples").glob("*.jpg"))
    for path in written:
        if path.relative_to(out).as_posix() not in shown:
            path.unlink(missing_ok=True)
    if (out / "examples").is_dir() and not any((out / "examples").iterdir()):
        (out / "examples").rmdir()


def query(con: duckdb.DuckDBPyConnection, name: str, **params) -> list[dict]:
    """The rows of sql/<name>.sql as dicts, with its $parameters bound."""
    result = con.execute(sql_text(name), params or None)
    cols = [d[0] for d in result.description]
    return [dict(zip(cols, row, strict=True)) for row in result.fetchall()]


def report_data(cfg: Config, ws: Workspace) -> dict[str, list[dict]]:
    """The rows of every section, from the workspace tables (sql/report_*.sql)."""
    from jobs.export import export_duplicates

    opts = cfg[JOB]
    top = int(opts["top_n"])
    con = ws.connect()
    try:
        selection = export_conditions(cfg, ws)
        export_duplicates(con, selection)  # the representatives the export keeps, for the balance
        return {
            "stages": query(con, "report_stages", samples_seen=samples_seen(ws), annotated=annotated_images(ws),
                            drop_duplicates=bool(cfg["export"]["drop_duplicates"])),
            "errors": query(con, "report_errors"),
            "tags": query(con, "report_tag_frequency", top_n=top),
            "characters": query(con, "report_characters", top_n=top),
            "people": query(con, "report_people"),
            "balance": query(con, "report_balance", drop_duplicates=bool(cfg["export"]["drop_duplicates"]),
                             drop_flagged=selection["drop_flagged"], gone_inputs=selection["gone_inputs"],
                             no_group=NO_GROUP),
            "accuracy": query(con, "report_caption_accuracy"),
            "examples": query(con, "report_examples", n=int(opts["examples"]), gone_inputs=selection["gone_inputs"]),
        }
    finally:
        con.close()


def export_conditions(cfg: Config, ws: Workspace) -> dict:
    """What the export's selection leaves out but near duplicates (sql/export_duplicates.sql's
    parameters): the balance counts the images the export selects."""
    from jobs.export import workspace_gone_inputs

    return {"drop_flagged": bool(cfg["export"]["drop_flagged"]), "drop_excluded": True,
            "gone_inputs": workspace_gone_inputs(ws)}


def samples_seen(ws: Workspace) -> int:
    """The input samples of the current ingest units, as ingest's summary counts them (its markers:
    a clip is one sample whatever its frames, each dropped member one, also a repeated name)."""
    return sum(info.get("samples", 0) for info in ws.done_units("ingest").values() if not info.get("retired"))


def annotated_images(ws: Workspace) -> int:
    """The images annotate processed and kept, from its unit markers (no table row tells an image
    that got no detection and no score from one never annotated), of the units annotate plans
    now: the marker of a unit whose images left the input counts images that are gone."""
    from jobs.annotate import units_of

    current = {u["unit"] for u in units_of(ws)}
    return sum(info.get("images", 0) - info.get("dropped", 0)
               for unit, info in ws.done_units("annotate").items() if unit in current)


# ---- plots -------------------------------------------------------------------------------
def save(fig, out: Path, name: str) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    plt.close(fig)
    atomic_write(str(out / f"{name}.png"), buf.getvalue())
    return f'<img src="{name}.png" alt="{html.escape(name)}">'


def no_data(what: str) -> str:
    return f'<p class="empty">No {html.escape(what)} in this workspace.</p>'


@matplotlib.rc_context(LITERAL_TEXT)
def bar_plot(out: Path, name: str, labels: list, values: list, unit: str, horizontal: bool = True) -> str:
    if not labels:
        return no_data(name)
    labels = [str(label) for label in labels]
    if horizontal:
        fig, ax = plt.subplots(figsize=(8, 0.6 + 0.28 * len(labels)))
        bars = ax.barh(labels[::-1], values[::-1], color="#4c72b0")
        ax.set_xlabel(unit)
    else:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        bars = ax.bar(labels, values, color="#4c72b0")
        ax.set_ylabel(unit)
    ax.bar_label(bars, padding=2, fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return save(fig, out, name)


@matplotlib.rc_context(LITERAL_TEXT)
def balance_plot(out: Path, rows: list[dict]) -> str:
    if not rows:
        return no_data("balance groups")
    paths = [r["path"] for r in rows][::-1]
    fig, ax = plt.subplots(figsize=(9, 0.8 + 0.45 * len(paths)))
    positions = range(len(paths))
    ax.barh([p + 0.2 for p in positions], [r["share_before"] for r in rows][::-1], height=0.4,
            label="images (before multiply)", color="#999999")
    ax.barh([p - 0.2 for p in positions], [r["share_after"] for r in rows][::-1], height=0.4,
            label="training samples (after multiply)", color="#dd8452")
    ax.set_yticks(list(positions), paths, fontsize=8)
    ax.set_xlabel("share of the dataset")
    ax.legend(loc="lower right", fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    table = "".join(f"<tr><td>{html.escape(r['path'])}</td><td>{r['images']}</td><td>{r['samples']:.1f}</td></tr>"
                    for r in rows)
    return save(fig, out, "balance") + (f"<table><tr><th>group</th><th>images</th><th>samples (sum of multiply)</th>"
                                        f"</tr>{table}</table>")


@matplotlib.rc_context(LITERAL_TEXT)
def accuracy_plot(out: Path, rows: list[dict]) -> str:
    """A histogram of the scored captions by backend, and what the scores were computed against
    (`rows`: counts per backend and accuracy bin, sql/report_caption_accuracy.sql)."""
    if not rows:
        return no_data("captions")
    scored = [r for r in rows if r["bin"] is not None]
    against: Counter[str] = Counter()
    not_scored: Counter[str] = Counter()
    for r in rows:  # unknown: scored (or not) before the reason was recorded
        if r["bin"] is None:
            not_scored[r["not_scored"] or "unknown"] += r["n"]
        else:
            against[r["scored_against"] or "unknown"] += r["n"]
    summary = (f"<p>{sum(r['n'] for r in rows)} captions: {sum(r['n'] for r in scored)} scored"
               + "".join(f", {n} against {html.escape(what)}" for what, n in sorted(against.items()))
               + "".join(f"; {n} not scored ({html.escape(why)})" for why, n in sorted(not_scored.items()))
               + f"; {sum(r['flagged'] for r in scored)} flagged for review.</p>")
    if not scored:
        return summary
    by_backend: dict[str, list[int]] = defaultdict(lambda: [0] * 20)
    for r in scored:
        by_backend[r["backend"]][r["bin"]] += r["n"]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    bottom = [0] * 20
    for backend, counts in sorted(by_backend.items()):
        ax.bar([i / 20 for i in range(20)], counts, width=0.05, align="edge", bottom=bottom, label=backend)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    ax.set_xlabel("accuracy of the accepted caption")
    ax.set_ylabel("images")
    ax.legend(fontsize=8)
    ax.spines[["top", "right"]].set_visible(False)
    return save(fig, out, "accuracy") + summary


def error_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    body = "".join(f"<tr><td>{html.escape(r['stage'])}</td><td>{html.escape(r['kind'])}</td><td>{r['n']}</td>"
                   f"<td>{r['dropped']}</td></tr>" for r in rows)
    return f"<table><tr><th>stage</th><th>kind</th><th>errors</th><th>images dropped</th></tr>{body}</table>"


# ---- examples ----------------------------------------------------------------------------
def example_bytes(rows: list[dict], export: str) -> dict[str, bytes]:
    """Image bytes of the examples: from the export's shards when exported, else (not exported, or
    the shards are not in `export`: export.out changed, the folder moved or removed) the inputs."""
    found = shard_bytes([r for r in rows if r["shard"]], export)
    return found | input_bytes([r for r in rows if r["key"] not in found])


def shard_bytes(rows: list[dict], export: str) -> dict[str, bytes]:
    by_shard: dict[str, dict[str, str]] = defaultdict(dict)
    for r in rows:
        by_shard[r["shard"]][r["shard_member"]] = r["key"]
    found: dict[str, bytes] = {}
    for shard, wanted in by_shard.items():
        path = Path(export) / shard
        if export and path.is_file():
            with tarfile.open(path) as tar:
                for member in tar:
                    if member.name in wanted:
                        found[wanted[member.name]] = tar.extractfile(member).read()
    return found


def input_bytes(rows: list[dict]) -> dict[str, bytes]:
    """The examples' bytes from their inputs; a member no longer of the size ingest saw (images.bytes:
    rewritten since) is another picture, not found, as the export has it."""
    by_source: dict[str, dict[str, tuple]] = defaultdict(dict)
    for r in rows:
        by_source[r["source"]][r["member"]] = (r["key"], r.get("member_offset"), r.get("bytes"))
    found: dict[str, bytes] = {}
    for source, wanted in by_source.items():
        offsets = {member: offset for member, (_, offset, _) in wanted.items()}
        sizes = {member: size for member, (_, _, size) in wanted.items() if size is not None}
        try:
            for name, data in source_members(source, offsets, 1 << 30, sizes):
                found[wanted[name][0]] = data
        except StoreError as exc:  # the report needs only the workspace: these examples are left out
            print(f"report: examples not shown: {exc}", flush=True)
    return found


def export_folder(cfg: Config, ws: Workspace) -> str:
    from jobs.export import out_dir

    try:
        return out_dir(cfg, ws)
    except ConfigError:
        return ""


def examples_html(out: Path, rows: list[dict], size: int, export: str, wanted: int) -> str:
    if not wanted:
        return '<p class="empty">No example images: report.examples is 0.</p>'
    if not rows:
        return no_data("images")
    images = example_bytes(rows, export)
    (out / "examples").mkdir(exist_ok=True)
    cards = []
    for r in rows:
        picture = '<div class="missing">image not found</div>'
        if r["key"] in images:
            try:
                name = f"examples/{safe_name(r['key'])}.jpg"
                atomic_write(str(out / name), thumbnail_jpeg(images[r["key"]], size))
                picture = f'<img src="{html.escape(name)}" alt="{html.escape(r["key"])}">'
            except Exception:  # any decoder failure: the card says so, the report goes on
                picture = '<div class="missing">image not decodable</div>'
        caption = html.escape(r["caption"]) if r["caption"] else "<em>no caption</em>"
        accuracy = f" (accuracy {r['accuracy']:.2f})" if r["accuracy"] is not None else ""
        tags = html.escape(", ".join(r["tags"]))
        cards.append(f'<div class="card">{picture}<p class="key">{html.escape(r["key"])}</p>'
                     f'<p>{caption}{accuracy}</p><p class="tags">{tags}</p></div>')
    return f'<div class="cards">{"".join(cards)}</div>'


# ---- the page ----------------------------------------------------------------------------
def section(title: str, *parts: str) -> str:
    return f"<section><h2>{html.escape(title)}</h2>{''.join(parts)}</section>"


STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
section { margin-bottom: 2.5em; } h2 { border-bottom: 1px solid #ccc; }
section > img { max-width: 100%; }
table { border-collapse: collapse; margin-top: .5em; font-size: 90%; }
td, th { border: 1px solid #ddd; padding: 2px 8px; text-align: left; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; }
.card { width: 260px; border: 1px solid #ddd; padding: 6px; font-size: 85%; }
.card img { max-width: 256px; max-height: 256px; display: block; margin: auto; }
.key { font-family: monospace; } .tags { color: #666; } .empty, .missing { color: #999; }
"""


def render_page(workspace: str, sections: list[str], inputs: str = "", images: int = 0) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{PAGE_MARK}'
            f"{INPUTS_MARK.format(inputs) + IMAGES_MARK.format(images) if inputs else ''}"
            f"<style>{STYLE}</style></head><body><h1>booruset report</h1>"
            f"<p>Workspace: <code>{html.escape(workspace)}</code>, {time.strftime('%Y-%m-%d %H:%M')}</p>"
            f"{''.join(sections)}</body></html>\n")
