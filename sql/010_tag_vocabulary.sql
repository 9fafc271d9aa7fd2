-- tag_vocabulary: every tag curate may see, after alias normalisation, with its category and
-- an integer id (the per-image steps join and group on ids: much cheaper than strings).
-- Inputs: source_tags, tag_scores, tag_aliases(alias, tag), tag_categories(tag, category).
-- A tag's category: the tag list's (Danbooru / tagger label file), else a specific category
-- the data itself gave it somewhere (a Danbooru JSON or three-line sidecar, the tagger), else
-- general. Sidecars such as kohya .txt files only know "general"; this fixes them.
with raw_tags as (
    select distinct tag, category from source_tags
    union
    select distinct tag, category from tag_scores
),
normalized as (
    select coalesce(a.tag, r.tag) as tag, r.category
    from raw_tags r
    left join tag_aliases a on a.alias = r.tag
),
seen as (
    select tag, max(category) filter (where category not in ('general', 'rating')) as specific_category
    from normalized
    group by tag
)
select s.tag, coalesce(c.category, s.specific_category, 'general') as category,
       (row_number() over (order by s.tag))::integer as tag_id
from seen s
left join tag_categories c on c.tag = s.tag
