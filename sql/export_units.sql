-- The selected images (temp table export_selected) cut into export units, in export order:
-- each source in chunks of $unit_images images in key order (export.max_count, at most
-- ingest.folder_unit_size), so that a source of many images is written by several tasks side
-- by side (local shards are read with seeks, plain folders file by file). A tar on object
-- storage is read as one stream, so it stays one unit. Shard numbers follow unit_index, so the
-- order must be total.
with chunked as (
    select *,
           case when source like '%.tar' and source like '%://%' then 0
                else (row_number() over (partition by source order by key) - 1) // $unit_images
           end as export_chunk
    from export_selected
)
select * exclude (export_chunk),
       dense_rank() over (order by source, export_chunk) - 1 as unit_index
from chunked
order by unit_index, key
