-- caption_inputs: one row per image with what the captioners read.
-- Tags are the curated `tags` in rank order; an image without curated tags falls back to its
-- `source_tags` (sidecar order). Rating: image_meta, else a source rating tag.
-- Parameters: none. Reads images, tags, source_tags, image_meta, source_text.
with curated as (
    select key,
           list(tag order by rank, tag) as tags,
           list(coalesce(category, 'general') order by rank, tag) as categories
    from tags
    group by key
),
source_distinct as (
    select key, tag, any_value(category) as category, min(position) as position
    from source_tags
    where key not in (select key from curated)
      and coalesce(category, 'general') <> 'rating'
    group by key, tag
),
from_source as (
    select key,
           list(tag order by position, tag) as tags,
           list(coalesce(category, 'general') order by position, tag) as categories
    from source_distinct
    group by key
),
image_tags as (
    select * from curated
    union all
    select * from from_source
),
source_rating as (
    select key, min(tag) as rating
    from source_tags
    where category = 'rating'
    group by key
),
texts as (
    select key, list(text order by kind, text) as texts
    from source_text
    where kind in ('caption', 'sd_prompt', 'nai_comment')
    group by key
)
select i.key,
       i.source,
       i.member,
       coalesce(t.tags, []::varchar[]) as tags,
       coalesce(t.categories, []::varchar[]) as categories,
       m.n_people,
       coalesce(m.characters, []::varchar[]) as characters,
       coalesce(m.rating, r.rating) as rating,
       coalesce(x.texts, []::varchar[]) as texts
from images as i
left join image_tags as t using (key)
left join image_meta as m using (key)
left join source_rating as r using (key)
left join texts as x using (key)
order by i.key
