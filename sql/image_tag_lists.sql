-- image_tag_lists: one row per image that has tags, with its tag lists in order.
-- Tags are the curated `tags` in rank order; an image without curated tags falls back to its
-- `source_tags` (sidecar order, score 1.0). source_rating is a rating tag from the sidecars.
-- A person's tag edits (edit_state, from `booruset review`) apply on top: a removed tag is gone,
-- an added one comes last (score 1.0, the category the tag has elsewhere in `tags`, else general).
-- A view every workspace connection has (store/workspace.py); captioners and export read it.
-- Parameters: none. Reads tags, source_tags, edit_state.
with curated as (
    select key, tag, coalesce(category, 'general') as category, coalesce(score, 1.0) as score,
           rank::bigint as position
    from tags
),
source_distinct as (
    select key, tag, coalesce(any_value(category), 'general') as category, 1.0::float as score,
           min(position)::bigint as position
    from source_tags
    where key not in (select key from curated)
      and coalesce(category, 'general') <> 'rating'
    group by key, tag
),
job_tags as (
    select * from curated
    union all
    select * from source_distinct
),
tag_edits as (
    select key, subject as tag, new is not null as present
    from edit_state
    where field = 'tags'
),
added_categories as (
    select tag, any_value(category) as category
    from tags
    where tag in (select tag from tag_edits where present)
    group by tag
),
added as (
    select e.key, e.tag, coalesce(c.category, 'general') as category, 1.0::float as score,
           9223372036854775807 as position
    from tag_edits as e
    left join added_categories as c using (tag)
    where e.present
      and not exists (select 1 from job_tags as j where j.key = e.key and j.tag = e.tag)
),
kept as (
    select j.*
    from job_tags as j
    anti join (select key, tag from tag_edits where not present) as r using (key, tag)
),
image_tags as (
    select key,
           list(tag order by position, tag) as tags,
           list(category order by position, tag) as categories,
           list(score order by position, tag) as tag_scores
    from (select * from kept union all select * from added)
    group by key
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
