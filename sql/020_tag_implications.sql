-- tag_implications: (tag, implied_by) pairs among general tags: `tag` is dropped from an image
-- that also has `implied_by`. Exactly the two rules of imgutils' drop_overlap_tags:
--   1. the overlap table (tag_overlap: long_hair <- very_long_hair, ...), and
--   2. any tag that is a substring of another tag of the image (shirt <- white_shirt; like
--      imgutils this is a plain substring test: hat <- hatsune_miku too).
-- Rule 2 is computed once over the vocabulary (every substring of every tag, joined back to
-- the vocabulary), so that per-image pruning is an equi-join instead of a pairwise
-- `contains` over ~900 tag pairs per image.
with general_tags as (
    select tag from tag_vocabulary where category = 'general'
),
starts as (
    select tag as implied_by, unnest(range(1, length(tag) + 1)) as start_at from general_tags
),
substrings as (
    select implied_by, substr(implied_by, start_at, unnest(range(1, length(implied_by) - start_at + 2))) as tag
    from starts
),
substring_pairs as (
    select distinct s.tag, s.implied_by
    from substrings s
    join general_tags g on g.tag = s.tag
    where s.tag <> s.implied_by
),
overlap_pairs as (
    select o.tag, o.implied_by
    from tag_overlap o
    join general_tags a on a.tag = o.tag
    join general_tags b on b.tag = o.implied_by
    where o.tag <> o.implied_by
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
