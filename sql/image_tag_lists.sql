-- image_tag_lists: one row per image that has tags, with its tag lists in order.
-- Tags are the curated `tags` in rank order; an image without curated tags falls back to its
-- `source_tags` (sidecar order, score 1.0), unless curate has seen it (an `image_meta` row) and
-- left it none (all blacklisted): then only the tags the caption job derived from its text
-- since (origin caption). source_rating is a rating tag from the sidecars.
-- A person's tag edits (edit_state, from `booruset review`) apply on top: a removed tag is gone,
-- an added one comes last (score 1.0, the category the tag has elsewhere in `tags`, else general).
-- A view every workspace connection has (store/workspace.py); captioners, export and the review
-- page read it. Written so that a filter on the key reaches the table scans (one image's lists
-- in a fraction of the whole): CTEs read twice are `not materialized`, and one aggregate, no
-- full join, makes the result; the edits are applied with left joins, not anti joins (DuckDB moves
-- a key filter across a left join, not into an anti join's other side): a query of one image
-- reads that image's edits, not every edit of the workspace.
-- Parameters: none. Reads tags, image_meta, source_tags, edit_state, edits.
with curated as not materialized (
    select key, tag, coalesce(category, 'general') as category, coalesce(score, 1.0)::float as score,
           rank::bigint as position
    from tags
),
source_distinct as not materialized (
    select key, tag, coalesce(min(category), 'general') as category, 1.0::float as score,
           min(position)::bigint as position, bool_or(origin = 'caption') as from_text
    from source_tags
    where coalesce(category, 'general') <> 'rating'
    group by key, tag
),
job_tags as not materialized (
    -- an image's curated tags if it has any; else its source tags, unless curate has seen the
    -- image (an image_meta row) and left it none: the tags it removed (a blacklisted one) do not
    -- come back. The tags the caption job derives from the image's own text after curate
    -- (origin caption) stand in all the same. A window over the key, not an anti join with
    -- every key of `tags`, so that a key filter reaches all three scans.
    select key, tag, category, score, position
    from (select *, bool_or(kind = 'curated') over (partition by key) as has_curated,
                 bool_or(kind = 'seen') over (partition by key) as seen
          from (select key, tag, category, score, position, 'curated' as kind, false as from_text from curated
                union all
                select key, null, null, null, null, 'seen', false from image_meta
                union all
                select key, tag, category, score, position, 'source', from_text from source_distinct))
    where kind = 'curated' or (kind = 'source' and not has_curated and (not seen or from_text))
),
tag_edits as not materialized (
    select key, subject as tag, new is not null as present
    from edit_state
    where field = 'tags'
),
added as (
    select e.key, e.tag, coalesce(c.category, 'general') as category, 1.0::float as score,
           9223372036854775807 as position
    from tag_edits as e
    -- the tags ever added (from edits, not edit_state: no key filter reaches this lookup, and
    -- edit_state would sort every edit of the workspace for it; a tag added then removed is one
    -- more tag looked up, which nothing joins)
    left join (select tag, min(category) as category from tags
               where tag in (select new from edits where field = 'tags') group by tag) as c using (tag)
    -- a left join, not `not exists`: DuckDB moves a key filter on e across it into job_tags' scans
    left join job_tags as j using (key, tag)
    where e.present
      and j.key is null
),
kept as (
    -- the job's tags a person did not remove
    select j.*
    from job_tags as j
    left join (select key, tag from tag_edits where not present) as r using (key, tag)
    where r.key is null
),
source_ratings as (
    select key, tag, 'rating' as category, null::float as score, null::bigint as position
    from source_tags
    where category = 'rating'
),
tag_rows as (
    select *, false as is_rating from kept
    union all
    select *, false as is_rating from added
    union all
    select *, true as is_rating from source_ratings
)
select key,
       list(tag order by position, tag) filter (where not is_rating) as tags,
       list(category order by position, tag) filter (where not is_rating) as categories,
       list(score order by position, tag) filter (where not is_rating) as tag_scores,
       min(tag) filter (where is_rating) as source_rating
from tag_rows
group by key
