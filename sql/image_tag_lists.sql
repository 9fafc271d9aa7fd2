-- image_tag_lists: one row per image that has tags, with its tag lists in order.
-- Tags are the curated `tags` in rank order; an image without curated tags falls back to its
-- `source_tags` (sidecar order, score 1.0). source_rating is a rating tag from the sidecars.
-- A view every workspace connection has (store/workspace.py); captioners and export read it.
-- Parameters: none. Reads tags, source_tags.
with curated as (
    select key,
           list(tag order by rank, tag) as tags,
           list(coalesce(category, 'general') order by rank, tag) as categories,
           list(coalesce(score, 1.0) order by rank, tag) as tag_scores
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
           list(coalesce(category, 'general') order by position, tag) as categories,
           list(1.0::float order by position, tag) as tag_scores
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
)
select key, t.tags, t.categories, t.tag_scores, r.rating as source_rating
from image_tags as t
full join source_rating as r using (key)
