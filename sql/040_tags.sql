-- tags: the curated (image, tag) rows of one partition of the images
-- (hash(key) % $partitions = $partition; the job runs every partition).
-- Steps, each a CTE: candidates (source tags, score 1; tagger tags over their category's
-- threshold; the tagger's top rating when the source has none) -> aliases -> one row per tag
-- -> blacklist -> impossible combinations -> overlapping tags (imgutils drop_overlap_tags) ->
-- character traits (optional, images with a character tag only) -> rank.
with source_candidates as (
    select key, tag, category, 1.0::float as score, position
    from source_tags
    where $partitions = 1 or hash(key) % $partitions = $partition
),
tagger_candidates as (
    select key, tag, category, score, null::integer as position
    from tag_scores
    where ($partitions = 1 or hash(key) % $partitions = $partition)
      and ((category = 'general' and score >= $general_threshold)
        or (category = 'character' and score >= $character_threshold))
),
tagger_ratings as (
    select key, arg_max(tag, score) as tag, 'rating' as category, max(score) as score, null::integer as position
    from tag_scores
    where ($partitions = 1 or hash(key) % $partitions = $partition) and category = 'rating'
    group by key
),
candidates as (
    select * from source_candidates
    union all
    select * from tagger_candidates
    union all
    select r.* from tagger_ratings r
    where not exists (select 1 from source_candidates s where s.key = r.key and s.category = 'rating')
),
aliased as (
    select c.key, coalesce(a.tag, c.tag) as tag, c.category as given_category, c.score, c.position
    from candidates c
    left join tag_aliases a on a.alias = c.tag
),
categorized as (
    select a.key, a.tag, a.score, a.position,
           case when a.given_category <> 'general' then a.given_category
                else coalesce(v.category, 'general') end as category
    from aliased a
    left join tag_vocabulary v on v.tag = a.tag
),
one_row_per_tag as (
    select key, tag, arg_max(category, score) as category, max(score)::float as score, min(position) as position
    from categorized
    group by key, tag
),
not_blacklisted as (
    select t.* from one_row_per_tag t
    anti join tag_blacklist b on b.tag = t.tag
),
rule_hits as materialized (
    -- rules first (few rows), then the other tag: joining the image's tags with each other
    -- on key alone would pair every tag with every tag
    select a.key, a.tag, a.score, r.tag_b, r.winner
    from not_blacklisted a
    join impossible_tags r on r.tag_a = a.tag
),
impossible_losers as (
    select distinct h.key,
           case when h.winner = 'a' or (h.winner = 'score' and h.score >= b.score) then b.tag else h.tag end as tag
    from rule_hits h
    join not_blacklisted b on b.key = h.key and b.tag = h.tag_b
),
possible as (
    select t.* from not_blacklisted t
    anti join impossible_losers l on l.key = t.key and l.tag = t.tag
),
overlapped as (
    -- from the more specific tag u to the tags it implies (a few substrings each), then keep
    -- those present: this direction joins ~3 rows per tag, the other (a short tag to all its
    -- superstrings) thousands
    select distinct u.key, i.tag
    from possible u
    join tag_implications i on i.implied_by = u.tag
    where u.category = 'general'
),
not_overlapped as (
    select t.* from possible t
    anti join overlapped o on o.key = t.key and o.tag = t.tag and t.category = 'general'
),
named_images as (
    select distinct key from not_overlapped where category = 'character'
),
trait_rows as (
    select t.key, t.tag
    from not_overlapped t
    join character_trait_tags c on c.tag = t.tag
    join named_images n on n.key = t.key
    where $drop_character_traits and t.category = 'general'
),
curated as (
    select t.* from not_overlapped t
    anti join trait_rows d on d.key = t.key and d.tag = t.tag
)
select t.key, t.tag, t.category, t.score,
       row_number() over (
           partition by t.key
           order by case when c.tag is not null then 0 when t.category = 'character' then 1 else 2 end,
                    t.score desc, t.position nulls last, t.tag
       )::integer as rank
from curated t
left join (select distinct tag from count_tags) c on c.tag = t.tag
