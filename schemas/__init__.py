"""Arrow schemas of every workspace table: the single source of column names and types.

Every job writes exactly these schemas (`conform` casts and orders columns) so that the
Parquet files of one table can always be read together by DuckDB and Ray Data.
"""

from __future__ import annotations

import pyarrow as pa

# CCIP features are 768 floats; a fixed-size list lets DuckDB use array_cosine_similarity.
CCIP_DIM = 768

WHOLE_IMAGE = -1  # `crop` value of an embedding of the whole image
# `crop` values of the tagger's 2x2 regions (annotate.tagger.regions), in images.region_images order
REGIONS = {-2: "top left", -3: "top right", -4: "bottom left", -5: "bottom right"}

images = pa.schema(
    [
        ("key", pa.string()),  # "<source stem>/<sample key>": unique across sources
        ("source", pa.string()),  # shard path or folder the sample came from
        ("member", pa.string()),  # image member name inside the shard / file in the folder
        # where the member's header starts in its shard or frame store tar (offset in the
        # uncompressed tar), for the later jobs' seeks (udfs/source_members.py); null for folders
        ("member_offset", pa.int64()),
        ("width", pa.int32()),  # as displayed (EXIF orientation applied)
        ("height", pa.int32()),
        ("format", pa.string()),  # Pillow format: JPEG, PNG, WEBP, GIF, ...
        ("mode", pa.string()),  # Pillow mode: RGB, RGBA, P, CMYK, I;16, ...
        ("n_frames", pa.int32()),
        # EXIF orientation (1..8, 1 when absent); width and height are as displayed, i.e. swapped
        # from the stored pixels for 5..8
        ("orientation", pa.int32()),
        ("bytes", pa.int64()),
        ("sha256", pa.string()),
        ("phash", pa.uint64()),  # 64-bit DCT perceptual hash (imagehash.phash)
        # standard deviation of the 32x32 grey image the pHash is made from: near 0 for flat
        # images, whose pHash says nothing (curate.phash_min_detail)
        ("detail", pa.float32()),
        # 2x2 grid of mean RGB, 4 bits a channel: what flat images are compared by instead
        ("colour", pa.uint64()),
        # video and animation frames (null for still images): the clip's key, the frame's index
        # in the clip (also in the key, `<clip>/f<index>`), its time in seconds, and its slice
        # (scene) in the clip, counted from 0
        ("clip", pa.string()),
        ("frame", pa.int32()),
        ("frame_time", pa.float64()),
        ("slice", pa.int32()),
    ]
)

clips = pa.schema(
    [
        ("key", pa.string()),  # the clip's key; its frames are `<key>/f<index>` in images
        ("source", pa.string()),
        ("member", pa.string()),
        ("format", pa.string()),  # container (FFmpeg's name) or Pillow format of an animation
        ("codec", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("fps", pa.float64()),  # nominal; 0 when the container does not say (animations)
        ("duration", pa.float64()),  # seconds, as the container says; 0 when unknown
        ("frames_seen", pa.int64()),  # frames decoded
        ("frames_kept", pa.int32()),
        ("slices", pa.int32()),  # scenes (and forced slices) among the frames seen
        ("errors", pa.int32()),  # errors rows of this clip
    ]
)

source_tags = pa.schema(
    [
        ("key", pa.string()),
        ("tag", pa.string()),  # Danbooru form: lower case, underscores
        ("category", pa.string()),  # general, character, copyright, artist, meta, rating
        ("origin", pa.string()),  # txt, booru, three_line, danbooru_json, caption, ...
        ("position", pa.int32()),  # order in the sidecar (kohya keep_tokens relies on it)
    ]
)

source_text = pa.schema(
    [
        ("key", pa.string()),
        ("kind", pa.string()),  # caption, sd_prompt, sd_negative, sd_params, nai_comment
        ("text", pa.string()),
    ]
)

errors = pa.schema(
    [
        ("key", pa.string()),
        ("source", pa.string()),
        ("member", pa.string()),
        ("stage", pa.string()),  # ingest, annotate:<model>, curate, caption, export
        ("kind", pa.string()),  # short machine-readable reason: corrupt_image, bomb, ...
        ("message", pa.string()),
        ("dropped", pa.bool_()),  # the sample was not ingested because of this error
    ]
)

detections = pa.schema(
    [
        ("key", pa.string()),
        ("model", pa.string()),
        # the box's place among its model's boxes of the image: person crops (embeddings.crop,
        # tag_scores.crop, clusters.crop) are the person detection of this index
        ("index", pa.int32()),
        ("label", pa.string()),  # face, head, person, ...
        ("score", pa.float32()),
        ("x0", pa.float32()),  # box corners relative to the image, 0..1
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
    ]
)

embeddings = pa.schema(
    [
        ("key", pa.string()),
        ("crop", pa.int32()),  # WHOLE_IMAGE, or the index of the person box it was cut from
        ("model", pa.string()),
        ("x0", pa.float32()),
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("vector", pa.list_(pa.float32(), CCIP_DIM)),
    ]
)

tag_scores = pa.schema(
    [
        ("key", pa.string()),
        # WHOLE_IMAGE (or null, in parts written before crops were tagged); >= 0: the index of the
        # person detection whose crop the tagger saw; <= -2: a 2x2 region (REGIONS)
        ("crop", pa.int32()),
        ("tag", pa.string()),
        ("category", pa.string()),  # general, character, rating
        ("score", pa.float32()),
        ("model", pa.string()),
    ]
)

tags = pa.schema(
    [
        ("key", pa.string()),
        ("tag", pa.string()),
        ("category", pa.string()),
        ("score", pa.float32()),  # 1.0 for source tags
        ("rank", pa.int32()),
    ]
)

image_meta = pa.schema(
    [
        ("key", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("n_faces", pa.int32()),
        ("facepos", pa.list_(pa.string())),
        ("fh_ratio", pa.float32()),
        ("n_people", pa.int32()),
        ("n_characters", pa.int32()),
        ("characters", pa.list_(pa.string())),
        ("rating", pa.string()),
        ("n_people_tags", pa.int32()),  # from count tags (1girl, 2boys, solo, ...); null when none
        ("n_people_detected", pa.int32()),  # person detections; null when none
    ]
)

# A character's fixed traits (curate, sql/055_character_traits.sql): the caption lint flags
# captions that repeat them, so a character LoRA's trigger word learns them.
character_traits = pa.schema(
    [
        ("character", pa.string()),
        ("tag", pa.string()),
        ("images", pa.int64()),  # images naming this character alone
        ("share", pa.float32()),  # of them carrying the tag
    ]
)

# Each person's own tags (curate, sql/075_person_tags.sql): the tags of the image that the
# tagger found on that person's crop; what no crop has stays with the image (the scene).
person_tags = pa.schema(
    [
        ("key", pa.string()),
        ("person", pa.int32()),  # the person detection's index (detections.index, tag_scores.crop)
        ("x0", pa.float32()),  # the person box, relative to the image, 0..1
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("position", pa.string()),  # left, centre, right (thirds of the width)
        ("quadrant", pa.string()),  # top left, top right, bottom left, bottom right
        ("tags", pa.list_(pa.string())),  # in the image's rank order
        ("categories", pa.list_(pa.string())),
    ]
)

duplicates = pa.schema(
    [
        ("key", pa.string()),
        ("dup_group", pa.string()),  # key of the group's representative
        ("is_representative", pa.bool_()),
        ("reason", pa.string()),  # identical, phash, colour, embedding
    ]
)

clusters = pa.schema(
    [
        ("key", pa.string()),
        ("crop", pa.int32()),
        ("cluster", pa.int32()),  # -1 is noise, its own class
        ("character", pa.string()),
    ]
)

groups = pa.schema([("key", pa.string()), ("path", pa.string())])

balance = pa.schema(
    [
        ("key", pa.string()),
        ("path", pa.string()),
        ("weight", pa.float64()),  # per-image weight
        ("probability", pa.float64()),  # probability of the image's folder
        ("multiply", pa.float64()),
        ("repeats", pa.int32()),  # whole repeats: kohya's <repeats>_ folder, materialised copies
    ]
)

captions = pa.schema(
    [
        ("key", pa.string()),
        ("attempt", pa.int32()),
        ("backend", pa.string()),
        ("seed", pa.int64()),
        ("caption", pa.string()),
        ("tag_inclusion", pa.float32()),
        ("english_similarity", pa.float32()),
        ("subject_consistency", pa.float32()),
        ("accuracy", pa.float32()),  # null when not scored
        # what the scores were computed against: "tagger" (its tags and the person detections),
        # "curated_tags" (a VLM caption where no tagger ran); null when not scored
        ("scored_against", pa.string()),
        ("not_scored", pa.string()),  # why not: "built_from_tags" (a template caption)
        ("lint", pa.list_(pa.string())),  # the character's fixed traits the caption repeats
        ("quality_tags", pa.list_(pa.string())),
        ("flagged", pa.bool_()),
        ("accepted", pa.bool_()),
        # of the image's tag list the caption was written from (udfs/caption/tags_digest.py): the
        # review page tells a caption older than the tags; null in parts from before the column
        ("tags_digest", pa.string()),
    ]
)

# A caption per 2x2 region of an image (caption.regions, from the tagger's region tags,
# annotate.tagger.regions); export joins them into "top left: ...; top right: ...".
caption_regions = pa.schema(
    [
        ("key", pa.string()),
        ("region", pa.string()),  # top left, top right, bottom left, bottom right
        ("backend", pa.string()),
        ("tags", pa.list_(pa.string())),  # the tagger's tags of the region over curate's thresholds
        ("caption", pa.string()),  # "" when the tagger named nothing there
    ]
)

# Related tags an image lacks, from tag co-occurrence over the whole dataset (caption job):
# suggestions for review, never applied to `tags`.
tag_suggestions = pa.schema(
    [
        ("key", pa.string()),
        ("tag", pa.string()),
        ("category", pa.string()),
        ("score", pa.float32()),  # the highest PMI (natural log) with one of the image's tags
        ("support", pa.int32()),  # images that have both tags of that best pair
        ("because", pa.string()),  # the image's tag that suggests it
        ("origin", pa.string()),  # pmi
    ]
)

# What the export wrote where: one row per exported sample (or repeat) and layout.
export_manifest = pa.schema(
    [
        ("key", pa.string()),  # the image's key in the workspace
        ("clip", pa.string()),  # the clip's key for a video or animation frame, else null
        ("frame_time", pa.float64()),  # the frame's time in its clip (seconds), else null
        ("sample_key", pa.string()),  # its safe name in the export (+ "-r<n>-<digest>" for materialised repeats)
        ("layout", pa.string()),  # webdataset, kohya, everydream, parquet
        ("path", pa.string()),  # shard / folder / Parquet file, relative to the export folder
        ("image", pa.string()),  # image member or file name
        ("width", pa.int32()),  # exported size
        ("height", pa.int32()),
        ("image_bytes", pa.int64()),
        ("reencoded", pa.bool_()),  # false: the original bytes
        ("orientation", pa.int32()),  # EXIF orientation the exported bytes carry (1: upright)
        ("multiply", pa.float64()),
        ("repeats", pa.int32()),
        # export.clip_token_budget: tags left out of KEY.txt, or 1 for a caption cut short; 0: whole
        ("text_cut", pa.int32()),
        ("unit", pa.string()),
    ]
)

# Corrections made by a person (`booruset review`): append-only, never rewritten; the latest
# edit of a (key, field, subject) wins, so undo is a later edit. Applied where the tables are
# read: the image_tag_lists view (tags) and the export selection (caption, exclude, character).
edits = pa.schema(
    [
        ("key", pa.string()),
        ("field", pa.string()),  # tags, caption, exclude, character
        # tags: old=tag, new=null removes it; old=null, new=tag adds it. caption: the text (null: the
        # generated caption again). exclude: "true" / "false". character: a name ("" for none, null: curated)
        ("old", pa.string()),
        ("new", pa.string()),
        ("time", pa.timestamp("us", tz="UTC")),
        ("seq", pa.int32()),  # order within one batch
        ("batch", pa.string()),  # the request that made it: one undo takes back a whole bulk action
    ]
)

TABLES: dict[str, pa.Schema] = {
    name: value for name, value in dict(globals()).items() if isinstance(value, pa.Schema)
}


def conform(table: pa.Table | list[dict], name: str) -> pa.Table:
    """Return `table` (or rows) with exactly the columns and types of schema `name`."""
    schema = TABLES[name]
    if isinstance(table, list):
        return pa.Table.from_pylist(table, schema=schema)
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ValueError(f"table {name} lacks columns {missing}")
    return table.select(schema.names).cast(schema)
