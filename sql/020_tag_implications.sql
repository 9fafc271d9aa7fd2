-- tag_implications: (tag, implied_by) pairs among general tags: `tag` is dropped from an image
-- that also has `implied_by`. Exactly the two rules of imgutils' drop_overlap_tags:
--   1. the overlap table (tag_overlap: long_hair <- very_long_hair, ...), and
--   2. any tag that is a substring of another tag of the image (shirt <- white_shirt; like
--      imgutils this is a plain substring test: hat <- hatsune_miku too).
-- Rule 2 is computed once over the vocabulary, so that per-image pruning is an equi-join
-- instead of a pairwise `contains` over ~900 tag pairs per image. Only tags can be substrings:
-- each tag is cut into windows of the lengths that vocabulary tags have (not every substring
-- of every length), and a window is kept when it equals a tag. The cost is bounded by tag
-- length x distinct tag lengths per tag (ingest bounds both by max_tag_chars), whatever the data.
with general_tags as (
    select tag, length(tag) as len from tag_vocabulary where category = 'general'
),
tag_lengths as (
    select distinct len from general_tags
),
windows as (
    select g.tag as implied_by, l.len, unnest(range(1, g.len - l.len + 2)) as start_at
    from general_tags g
    join tag_lengths l on l.len < g.len
),
substring_pairs as (
    select distinct g.tag, w.implied_by
    from windows w
    join general_tags g on g.len = w.len and g.tag = substr(w.implied_by, w.start_at, w.len)
),
overlap_pairs as (
    -- through the aliases, as the images' tags are read: imgutils' data names tags that
    -- Danbooru's list makes aliases (object_hug for hugging_object)
    select a.tag, b.tag as implied_by
    from tag_overlap o
    left join tag_aliases x on x.alias = o.tag
    left join tag_aliases y on y.alias = o.implied_by
    join general_tags a on a.tag = coalesce(x.tag, o.tag)
    join general_tags b on b.tag = coalesce(y.tag, o.implied_by)
    where a.tag <> b.tag
),
pairs as (
    select tag, implied_by from substring_pairs
    union
    select tag, implied_by from overlap_pairs
)
select p.tag, p.implied_by, a.tag_id, b.tag_id as implied_by_id
from pairs p
join tag_vocabulary a on a.tag = p.tag
join tag_vocabulary b on b.tag = p.implied_by
