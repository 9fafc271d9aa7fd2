-- export_unit_files: the per-image files (kohya and EveryDream images and their KEY.txt) that
-- the units in checked_units wrote, each with its unit: a unit taken as done is written again
-- when one of them is gone from the export folder (jobs/export.py). Shards, Parquet files and
-- multiply.txt are named in the units' markers instead. Paths are relative to the export
-- folder. Reads export_manifest, checked_units.
select unit, path || '/' || unnest([image, sample_key || '.txt']) as file
from export_manifest
semi join checked_units using (unit)
where layout in ('kohya', 'everydream')
