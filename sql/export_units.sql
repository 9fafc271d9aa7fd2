-- export_units: the staged selection (export_selected) cut into export units, one row per unit,
-- in export order: each source in chunks of $unit_images images in key order (export.max_count,
-- at most ingest.folder_unit_size), so that a source of many images is written by several tasks
-- side by side (local shards are read with seeks, plain folders file by file). A tar on object
-- storage is read as one stream, so it stays one unit. A unit is the key range
-- [first_key, last_key] of one source: its task reads exactly those rows. Shard numbers follow
-- unit_index, so the order must be total. Parameters: $unit_images. Reads export_selected.
with chunked as (
    select source,
           key,
           case when source like '%.tar' and source like '%://%' then 0
                else (row_number() over (partition by source order by key) - 1) // $unit_images
           end as export_chunk
    from export_selected
),
units as (
    select source, export_chunk, min(key) as first_key, max(key) as last_key, count(*) as n_images
    from chunked
    group by source, export_chunk
)
select row_number() over (order by source, export_chunk) - 1 as unit_index,
       source,
       first_key,
       last_key,
       n_images
from units
order by unit_index
