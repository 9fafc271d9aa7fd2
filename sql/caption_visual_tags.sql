-- caption_visual_tags: the tags related-tag suggestions work from, one row per (key, tag):
-- curated `tags`, else `source_tags` for images without curated tags; visual categories only.
with curated as (
    select distinct key, tag, coalesce(category, 'general') as category
    from tags
),
image_tags as (
    select * from curated
    union
    select distinct key, tag, coalesce(category, 'general') as category
    from source_tags
    where key not in (select key from curated)
)
select key, tag, category
from image_tags
where category in ('general', 'character', 'copyright')
