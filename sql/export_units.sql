-- The selected images (temp table export_selected) cut into export units, in export order:
-- one unit per input shard; a plain folder in chunks of $folder_unit_size images in key order
-- (its files are read one by one). Shard numbers follow unit_index, so the order must be total.
with chunked as (
    select *,
           case when source like '%.tar' then 0
                else (row_number() over (partition by source order by key) - 1) // $folder_unit_size
           end as export_chunk
    from export_selected
)
select * exclude (export_chunk),
       dense_rank() over (order by source, export_chunk) - 1 as unit_index
from chunked
order by unit_index, key
