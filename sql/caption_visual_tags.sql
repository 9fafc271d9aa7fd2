-- caption_visual_tags: the tags related-tag suggestions work from, one row per (key, tag): the
-- image's tags as the captioners and the export read them (image_tag_lists: curated `tags`, else
-- its source tags, with a person's tag edits applied: a removed tag suggests nothing, an added one
-- does); visual categories only.
-- Parameters: none. Reads image_tag_lists.
select distinct key, tag, category
from (select key, unnest(tags) as tag, unnest(categories) as category from image_tag_lists)
where category in ('general', 'character', 'copyright')
