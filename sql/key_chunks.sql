-- key_chunks: the first key of each chunk of $chunk images in key order. Jobs that read the whole
-- selection (export's staging, the review table) run it one key range at a time, so that
-- DuckDB's memory is bounded by a chunk, not the workspace: a key range reaches the table scans
-- (sql/image_tag_lists.sql is written for it). Parameters: $chunk. Reads images.
with numbered as (
    select key, row_number() over (order by key) - 1 as n
    from images
)
select key as first_key
from numbered
where n % $chunk = 0
order by key
