-- export_unfinished_files: the files that units of an export stopped before its manifest
-- (unfinished_units) wrote in its folder, less those the folder's manifest.parquet names
-- (folder_manifest: its last complete export; empty when it has none). A unit's per-image files
-- (kohya and EveryDream images and their KEY.txt) are its export_manifest rows; its shards,
-- Parquet files and multiply.txt are named by its marker (marker_files). Paths are relative to
-- the export folder. Reads export_manifest, unfinished_units, marker_files, folder_manifest.
with written as (
    select path || '/' || unnest([image, sample_key || '.txt']) as file
    from export_manifest
    semi join unfinished_units using (unit)
    where layout in ('kohya', 'everydream')
    union
    select file from marker_files
),
named as (
    select unnest(case when layout in ('kohya', 'everydream')
                       then [path || '/' || image, path || '/' || sample_key || '.txt']
                            || case when layout = 'everydream' then [path || '/multiply.txt'] else [] end
                       else [path] end) as file
    from folder_manifest
)
select file
from written
anti join named using (file)
order by file
