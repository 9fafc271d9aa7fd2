"""The export plan of one unit, made in a CPU task from its key range of the staged selection.

The export's first step stages the selection in Parquet files sorted by source and key, and names
each unit's source, key range and files (jobs/export.py); this task reads the unit's rows and
turns them into its samples (safe name, exported size, txt, json, copies) with shard
numbers that count from 0 inside the unit, writes them as the unit's plan file and returns only
counts and a digest. The driver then gives each unit its first global shard number (the sum of
the shard counts of the units before it), so shard names stay contiguous and deterministic
while no sample passes through the driver.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from store.uris import redacted
from store.workspace import Workspace
from udfs.export.clip_tokens import clip_tokens, fit_caption
from udfs.export.resize import ALPHA_MODES, estimated_bytes, needs_reencode, output_extension, target_size
from udfs.export.safe_names import key_digest, safe_folder, safe_name
from udfs.export.tag_text import TagTextRules
from udfs.ingest.sources import input_location

TAR_OVERHEAD = 3 * 1024  # three tar headers and their padding per sample (at most 3 x 1023 bytes)
# a shard's end: two zero blocks, then zeros to a whole record (tarfile pads to 10 KiB), at most
TAR_END = 2 * tarfile.BLOCKSIZE + tarfile.RECORDSIZE - tarfile.BLOCKSIZE


def one_line(text: str | None) -> str:
    """KEY.txt's text on one line, runs of white space as one space: kohya trains on a caption
    file's first line only, so a caption that came with the image or was typed in review over
    two lines lost its second (KEY.json keeps the text as it was)."""
    return " ".join(text.split()) if text else ""


def sample_plan(row: dict, opts: dict, rules: TagTextRules | None = None) -> dict:
    """One sample's plan; `rules` are the options' tag text rules (made once per unit by the caller)."""
    width, height = int(row["width"] or 0), int(row["height"] or 0)
    size = target_size(width, height, opts) if width and height else (width, height)
    orientation = int(row.get("orientation") or 1)
    background = str(opts.get("alpha_background") or "") if row.get("mode") in ALPHA_MODES else ""
    reencode = needs_reencode(row["format"], width, height, size, turned=orientation != 1 and opts["upright"],
                              mode=row.get("mode")) or bool(background)
    ext = output_extension(row["format"])
    caption, text_from = None, "tags"
    regions, own = one_line(row.get("region_caption")), one_line(row["caption"])
    # a caption a person wrote in review is the image's text: the region captions are generated
    # ones, of what they corrected (as KEY.json's captions then hold theirs alone)
    if opts["text"] == "regions" and regions and not (row.get("caption_edited") and own):
        caption, text_from = regions, "regions"
    elif opts["text"] in ("caption", "regions") and own:
        caption, text_from = own, "caption"
    rules = rules or TagTextRules.from_options(opts)
    txt, cut = budgeted_text(caption, row, rules)
    keep_tokens = int(opts["keep_tokens"])
    if caption is None and rules.keep_tokens_separator:  # the kept part is per image (TagTextRules.kept)
        ordered = rules.ordered_pairs(row["tags"], row["categories"], row["tag_scores"])
        keep_tokens = max(keep_tokens, rules.kept([c for _, c in ordered]))
    repeats = int(row["repeats"])  # the balance gives them out per group (sql/091_balance.sql)
    concept = opts["concept"] or row["group"] or "all"
    meta = {  # the source without a URI's query nor its user part: a trainer's metadata holds no
        # endpoint, options or credentials (`s3://KEY:SECRET@bucket/...`)
        "key": row["key"], "source": {"source": redacted(input_location(row["source"])), "member": row["member"]},
        "caption": row["caption"], "text_from": text_from,
        "tags": row["tags"], "tag_categories": row["categories"],
        "tag_scores": dict(zip(row["tags"], [round(float(s), 4) for s in row["tag_scores"]], strict=True)),
        "characters": row["characters"], "rating": row["rating"], "n_people": row["n_people"],
        "scores": {k: row.get(k) for k in ("accuracy", "tag_inclusion", "english_similarity", "subject_consistency",
                                           "scored_against", "not_scored")},
        "quality_tags": row["quality_tags"], "group": row["group"], "keep_tokens": keep_tokens,
        "multiply": float(row["multiply"]), "repeats": repeats,
        "width": size[0], "height": size[1], "original_width": width, "original_height": height,
        # the EXIF orientation the exported bytes carry: 1 = upright; else a reader must turn them
        "orientation": 1 if reencode else orientation,
    }
    # every caption the image has, by origin (the tags as text, the template, the captioning
    # model, the rewriter): a trainer may pick or mix them per step
    # (KEY.txt's own text when it is the tags with no budget to cut them: built once)
    tags_text = txt if caption is None and not rules.clip_token_budget else \
        rules.whole_text(row["tags"], row["categories"], row["tag_scores"])
    meta["captions"] = {"tags": tags_text,
                        **{v["origin"]: v["caption"] for v in row.get("caption_variants") or []}}
    if rules.clip_token_budget:  # what the budget did to KEY.txt
        meta["clip_tokens"] = {"budget": rules.clip_token_budget, "tokens": clip_tokens(txt), "cut": cut}
    if row.get("own_texts"):  # the texts that came with the image: {kind: [text, ...]}
        meta["source_texts"] = {}
        for own in row["own_texts"]:
            meta["source_texts"].setdefault(own["kind"], []).append(own["text"])
    if row.get("region_caption"):  # the 2x2 region captions (caption.regions)
        meta["region_caption"] = row["region_caption"]
    if row.get("lint"):  # the character's fixed traits the caption repeats (caption lint)
        meta["lint"] = row["lint"]
    if row.get("caption_edited"):  # written by a person (booruset review), not by a captioner
        meta["caption_edited"] = True
    if row.get("clip"):  # a video or animation frame: which clip, and when in it
        meta["clip"], meta["frame_time"] = row["clip"], row["frame_time"]
    meta_text = json.dumps(meta, ensure_ascii=False, sort_keys=True)
    image_bytes = estimated_bytes(int(row["bytes"] or 0), width, height, size, reencode)
    plan = {
        "key": row["key"], "member": row["member"], "offset": row.get("member_offset"), "clip": row.get("clip"),
        # the bytes ingest saw: a member of another size was rewritten since (not exported with
        # these rows); in the plan's digest, so that a unit whose images changed is written again
        "bytes": row["bytes"],
        # and what they were: a picture fixed in place may keep its size (a BMP, a TIFF of the same
        # dimensions), and its unit, kept, went on holding the old picture
        "sha256": row["sha256"],
        "name": safe_name(row["key"]),
        "size": list(size),
        "reencode": reencode, "orientation": meta["orientation"], "crop": bool(opts["buckets"]), "ext": ext,
        "background": background,
        "txt": txt, "json": meta_text, "text_cut": cut,
        "multiply": float(row["multiply"]), "repeats": repeats,
        "kohya": f"{repeats}_{safe_folder(concept)}",
        "everydream": f"{safe_folder(concept)}_x{round(float(row['multiply']), 2):g}",
        "planned_bytes": image_bytes + len(txt.encode()) + len(meta_text.encode()) + TAR_OVERHEAD,
    }
    warnings = text_warnings(caption, row, rules, txt)
    if warnings:  # only then: a key in every sample would change every unit's digest
        plan["text_warnings"] = warnings
    return plan


def text_warnings(caption: str | None, row: dict, rules: TagTextRules, txt: str) -> list[dict]:
    """What is wrong with KEY.txt that the export cannot mend, as errors rows to write (the image
    is exported): the kept tags alone over the CLIP token budget (the budget never leaves them
    out), or kohya's fixed keep_tokens count splitting the image's leading category."""
    warnings = []
    if caption is None and rules.clip_token_budget and clip_tokens(txt) > rules.clip_token_budget:
        warnings.append({"kind": "over_token_budget", "message": (
            f"KEY.txt is {clip_tokens(txt)} CLIP tokens, over export.clip_token_budget {rules.clip_token_budget}: "
            "its keep_tokens tags alone are longer, and the budget never leaves them out (a trainer cuts the "
            "text at its limit)")})
    split = rules.keep_warning(row["tags"], row["categories"], row["tag_scores"]) if caption is None else ""
    if split:
        warnings.append({"kind": "keep_tokens_split", "message": split})
    return warnings


def budgeted_text(caption: str | None, row: dict, rules: TagTextRules) -> tuple[str, int]:
    """KEY.txt within the CLIP token budget (when there is one): the caption cut at a sentence
    (cut 1), or the tags without the lowest-ranked ones (cut: how many were left out)."""
    if caption is None:
        return rules.fitted(row["tags"], row["categories"], row["tag_scores"])
    if not rules.clip_token_budget:
        return caption, 0
    text, was_cut = fit_caption(caption, rules.clip_token_budget)
    return text, int(was_cut)


def plan_samples(rows: list[dict], opts: dict) -> tuple[list[dict], int]:
    """A unit's samples with their copies and shard numbers counted from 0; and its shard count.

    Shards are cut by count and by planned bytes (exact for original bytes, area-scaled for
    re-encoded images); a shard never mixes units. Materialised repeats are placed a round at a
    time (every sample's first copy, then every second copy, ...), and a copy whose image is in
    the shard already starts the next one: a shard never holds two copies of one image (the
    writer puts a sample's copies of one shard side by side, as it reads the image once)."""
    materialize = bool(opts["materialize_repeats"])
    names: set[str] = set()
    rules = TagTextRules.from_options(opts)
    samples = []
    for row in rows:
        sample = sample_plan(row, opts, rules)
        sample["name"] = unique_name(sample["name"], row["key"], names)
        sample["copies"] = []
        samples.append(sample)
    cut = ShardCut(int(opts["max_count"]), int(opts["max_bytes"]))
    rounds = max((s["repeats"] for s in samples), default=1) if materialize else 1
    for n in range(rounds):
        for sample in samples:
            if n == 0 or n < sample["repeats"]:
                name = sample["name"] if n == 0 else unique_name(copy_name(sample, n), sample["key"], names)
                sample["copies"].append({"name": name, "shard": cut.place(sample["key"], sample["planned_bytes"])})
    return samples, (cut.shard + 1 if samples else 0)


class ShardCut:
    """Shard numbers for samples in plan order: a new shard before the sample that would take the
    current one past max_count samples or max_bytes, or whose image it holds already (a shard
    holds at least one sample)."""

    def __init__(self, max_count: int, max_bytes: int) -> None:
        self.max_count, self.max_bytes = max_count, max_bytes
        self.shard, self.size = 0, TAR_END  # a shard's bytes: its samples and its end
        self.keys: set[str] = set()  # the images in the current shard: at most max_count

    def place(self, key: str, planned_bytes: int) -> int:
        full = len(self.keys) + 1 > self.max_count or self.size + planned_bytes > self.max_bytes
        if self.keys and (full or key in self.keys):
            self.shard, self.size = self.shard + 1, TAR_END
            self.keys.clear()
        self.keys.add(key)
        self.size += planned_bytes
        return self.shard


def copy_name(sample: dict, n: int) -> str:
    """The name of a sample's n-th materialised copy: with a digest, as a safe name that had to
    change: `x-r1` alone is the safe name of the key `x-r1`, in another unit of the export."""
    return f"{sample['name']}-r{n}-{key_digest(sample['key'] + chr(0) + str(n))}"


def unique_name(name: str, key: str, names: set[str]) -> str:
    """Safe names are unique by construction (they carry a digest of the key where they had to
    change it); this guards the rare hash collision and repeat suffixes within a unit."""
    while name in names:
        name = f"{name}-{key_digest(key + name)}"
    names.add(name)
    return name


def placed(samples: list[dict], offset: int) -> list[dict]:
    """The samples with their copies' shard numbers moved to the unit's global numbering."""
    return [{**s, "copies": [{**c, "shard": c["shard"] + offset} for c in s["copies"]]} for s in samples]


# What a re-encoded source pixel costs, in bytes a copy writes in the same time. Measured with
# bench/export.py on 2 cores: a unit of 100 images re-encoding ~85 million source pixels to
# max_size 1024 took ~3.2 s (~35 ns a pixel); its copies ran at ~1 GB/s (~1 ns a byte).
REENCODE_BYTES_PER_PIXEL = 35


def unit_work(rows: list[dict], samples: list[dict]) -> int:
    """A unit's estimated task time, in copied-byte equivalents: the bytes its samples write, plus
    the source pixels of those it re-encodes (the driver hands out the costliest units first)."""
    work = 0
    for row, sample in zip(rows, samples, strict=True):
        work += sample["planned_bytes"] * len(sample["copies"])
        if sample["reencode"]:
            work += REENCODE_BYTES_PER_PIXEL * int(row["width"] or 0) * int(row["height"] or 0)
    return work


def plan_unit(item: dict[str, Any], workspace: str, options: dict) -> dict[str, Any]:
    """Ray task: plan one unit from its key range of the staged selection and write the plan to
    the unit's path; returns the unit's counts, its estimated work and a digest of its plan."""
    ws = Workspace(workspace, create=False)
    rows = unit_rows(ws, item).to_pylist()
    samples, shards = plan_samples(rows, options)
    text = json.dumps(samples, sort_keys=True)
    with ws.fs.open_output_stream(item["path"]) as f:
        f.write(text.encode())
    return {"group": int(item["group"]), "shards": shards, "samples": len(samples),
            "work": unit_work(rows, samples), "digest": hashlib.sha1(text.encode()).hexdigest()}


def unit_rows(ws: Workspace, item: dict[str, Any]) -> pa.Table:
    """The unit's rows in key order: its source's keys from first_key to last_key in the staged
    chunk files it overlaps (sorted by source and key, so row-group statistics skip the rest)."""
    key = pc.field("key")
    wanted = (pc.field("source") == item["source"]) & (key >= item["first_key"]) & (key <= item["last_key"])
    table = pads.dataset(item["files"], format="parquet", filesystem=ws.fs).to_table(filter=wanted)
    return table.sort_by("key")


def read_plan(ws: Workspace, path: str) -> list[dict]:
    with ws.fs.open_input_stream(path) as f:
        return json.loads(f.read())
