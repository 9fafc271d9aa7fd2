-- export_stale_files: the per-image files (kohya and EveryDream images and their KEY.txt) that
-- units no longer planned wrote (stale_units) and no current unit wrote too (current_units):
-- the files a changed selection or changed options leave behind. Shards, Parquet files and
-- multiply.txt are named in the units' markers instead. Paths are relative to the export
-- folder. Reads export_manifest, stale_units, current_units.
with image_files as (
    select unit, path || '/' || unnest([image, sample_key || '.txt']) as file
    from export_manifest
    where layout in ('kohya', 'everydream')
),
stale_files as (
    select file from image_files semi join stale_units using (unit)
),
kept_files as (
    select file from image_files semi join current_units using (unit)
)
select distinct file
from stale_files
anti join kept_files using (file)
order by file
