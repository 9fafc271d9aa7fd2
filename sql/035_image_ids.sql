-- image_ids: a dense integer id per image with tags, in key order, so that the per-image steps of
-- sql/040 join and group on (image_id, tag_id) integers instead of strings, and a range of ids
-- is a range of keys (a partition's bounds prune the Parquet files of the other partitions).
select key, (row_number() over (order by key) - 1)::bigint as image_id
from (select key from source_tags union select key from tag_scores)
