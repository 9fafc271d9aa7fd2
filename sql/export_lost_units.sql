-- export_lost_units: the units in checked_units one of whose per-image files (a kohya or
-- EveryDream image, or its KEY.txt) is not in present_files, the listing of their folders
-- (sql/export_unit_folders.sql): a unit taken as done is written again when one is gone.
-- Shards, Parquet files and multiply.txt are named in the units' markers instead. Paths are
-- relative to the export folder. Reads export_manifest, checked_units, present_files.
with unit_files as (
    select unit, path || '/' || unnest([image, sample_key || '.txt']) as file
    from export_manifest
    semi join checked_units using (unit)
    where layout in ('kohya', 'everydream')
)
select distinct unit
from unit_files
anti join present_files using (file)
order by unit
