"""Everything the image page shows about one image, from the workspace's views."""

from __future__ import annotations

import json

from jobs.config import REPO
from jobs.export import workspace_gone_inputs
from review.selection import ReviewIndex
from udfs.caption.tags_digest import tags_digest
from udfs.export.export_plan import sample_plan
from udfs.export.export_shard import empty_text_layouts
from udfs.export.safe_names import safe_name

# Other members of a duplicate group or a character cluster shown beside the image.
NEIGHBOURS = 12
CANDIDATES = 2000  # cluster members compared for "nearest" (sql/review_cluster_neighbours.sql)
NEIGHBOURS_SQL = (REPO / "sql" / "review_cluster_neighbours.sql").read_text(encoding="utf-8")
# The image's duplicate group as the export keeps it (sql/export_duplicates.sql over that group
# alone): a representative the export leaves out (excluded since curate, its file or input gone)
# has the next copy kept in its place, which curate's is_representative does not say.
GROUP_SQL = (REPO / "sql" / "export_duplicates.sql").read_text(encoding="utf-8").replace(
    "    from duplicates\n",
    "    from duplicates\n    where dup_group = (select any_value(dup_group) from duplicates where key = $key)\n", 1)
assert "where dup_group = " in GROUP_SQL  # export_duplicates.sql reads `duplicates` once, in `members`
DUPLICATES_SQL = (f"select d.key, d.reason, d.is_representative, r.sha256 from ({GROUP_SQL}) as d "
                  "join review_rows r using (key) order by d.is_representative desc, d.key limit $n")


def image_details(index: ReviewIndex, key: str, export_options: dict, cluster_model: str = "") -> dict | None:
    row = index.row(key)
    if row is None:
        return None
    params = {"key": key}
    captions = index.query("select attempt, backend, caption, accuracy, tag_inclusion, english_similarity, "
                           "subject_consistency, scored_against, not_scored, lint, quality_tags, flagged, "
                           "accepted, tags_digest from captions where key = $key order by attempt", params)
    edits = index.query("select field, old, new, time, batch from edits where key = $key "
                        "order by time desc, batch desc, seq desc limit 50", params)
    return {
        "row": row,
        "caption_older_than_tags": caption_older_than_tags(row, captions, edits),
        "tags": tag_table(index, row),
        "detections": index.query("select label, model, score, x0, y0, x1, y1 from detections where key = $key "
                                  "order by label, score desc", params),
        "captions": captions,
        "duplicates": index.query(DUPLICATES_SQL, {**params, "n": NEIGHBOURS, "drop_excluded": True,
                                                   "drop_flagged": bool(export_options["drop_flagged"]),
                                                   "gone_inputs": workspace_gone_inputs(index.ws)}),
        "clusters": cluster_members(index, key, cluster_model),
        "errors": index.query("select stage, kind, message, dropped from errors where key = $key order by stage, kind",
                              params),
        "edits": edits,
        "export": export_preview(row, export_options),
    }


def caption_older_than_tags(row: dict, captions: list[dict], edits: list[dict]) -> bool:
    """Whether the image's generated caption was written from other tags than it has now (a tag
    edit, or a curate since): `booruset caption` would write it again. An own caption was not
    written from the tags. Captions from before captions.tags_digest: whether a tag was edited."""
    accepted = [c for c in captions if c["accepted"] and c["backend"] != "own"]
    if row.get("caption_edited") or not accepted:
        return False
    if accepted[0]["tags_digest"] is None:
        return any(e["field"] == "tags" for e in edits)
    return accepted[0]["tags_digest"] != tags_digest(row["tags"])


def tag_table(index: ReviewIndex, row: dict) -> list[dict]:
    """One row per tag the image has or had anywhere: category, whether it is in the final list
    (its place there), where it came from (source origins, tagger score, a person's edit)."""
    final = {t: i for i, t in enumerate(row["tags"] or [])}
    by_tag: dict[str, dict] = {}

    def entry(tag: str, category: str | None) -> dict:
        return by_tag.setdefault(tag, {"tag": tag, "category": category or "general", "position": final.get(tag),
                                       "source": [], "tagger": None, "edit": None})

    for tag, category in zip(row["tags"] or [], row["categories"] or [], strict=False):
        entry(tag, category)
    for r in index.query("select tag, category, origin from source_tags where key = $key", {"key": row["key"]}):
        entry(r["tag"], r["category"])["source"].append(r["origin"] or "source")
    for r in index.query("select tag, category, max(score) as score from tag_scores "
                         "where key = $key and coalesce(crop, -1) = -1 group by tag, category "
                         "order by score desc limit 100", {"key": row["key"]}):
        entry(r["tag"], r["category"])["tagger"] = float(r["score"])
    for r in index.query("select subject, new from edit_state where key = $key and field = 'tags'",
                         {"key": row["key"]}):
        entry(r["subject"], None)["edit"] = "added" if r["new"] is not None else "removed"
    order = {"rating": 0, "character": 1, "copyright": 2, "artist": 3, "general": 4, "meta": 5}
    return sorted(by_tag.values(), key=lambda t: (t["position"] is None, t["position"] or 0,
                                                  order.get(t["category"], 9), t["tag"]))


def cluster_members(index: ReviewIndex, key: str, model: str) -> list[dict]:
    """The image's character clusters, each with its nearest other members (noise, -1, has none)."""
    clusters = index.query("select distinct cluster, character from clusters where key = $key and cluster >= 0 "
                           "order by cluster", {"key": key})
    for c in clusters:
        c["members"] = index.query(NEIGHBOURS_SQL, {"key": key, "cluster": c["cluster"], "model": model,
                                                    "candidates": CANDIDATES, "n": NEIGHBOURS})
    return clusters


def export_preview(row: dict, export_options: dict) -> dict:
    """The KEY.txt and KEY.json export would write for this image (udfs/export/export_plan.py),
    and, for an image with no text, what the export does with it (`left_out`; None otherwise)."""
    plan = sample_plan(row, export_options)
    return {"name": safe_name(row["key"]), "txt": plan["txt"],
            "json": json.dumps(json.loads(plan["json"]), ensure_ascii=False, indent=1, sort_keys=True),
            "ext": plan["ext"], "left_out": None if plan["txt"] else empty_text_note(export_options["formats"])}


def empty_text_note(formats: list[str]) -> str:
    """What the export does with an image that has no text (UnitExport.written_anywhere)."""
    folders, elsewhere = empty_text_layouts(formats)
    if not folders:
        return "no text: the export writes it with an empty KEY.txt (caption dropout)"
    names = " and ".join(folders)
    if not elsewhere:
        return (f"no text: left out of the export ({names} folders; an empty_text errors row): kohya refuses an "
                "empty caption file, EveryDream would caption the image with its file name")
    others = " and ".join(f for f in formats if f not in folders)
    return (f"no text: left out of the {names} folders (an empty_text errors row); the {others} output keeps "
            "it with an empty KEY.txt (caption dropout)")
