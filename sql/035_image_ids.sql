-- image_ids: a dense integer id per image with tags, so that the per-image steps of sql/040
-- join and group on (image_id, tag_id) integers instead of strings.
select key, (row_number() over ())::bigint as image_id
from (select key from source_tags union select key from tag_scores)
