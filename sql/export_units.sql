-- The selected images (temp table export_selected) cut into export units, in export order:
-- one unit per input shard; a plain folder in chunks of $folder_unit_size images in key order
-- (its files are read one by one). Shard numbers follow this order, so it must be total.
select *,
       case when source like '%.tar' then 0
            else (row_number() over (partition by source order by key) - 1) // $folder_unit_size
       end as export_chunk
from export_selected
order by source, export_chunk, key
