-- tag_candidates: every (image, tag) candidate of sql/040 with its integer image id, in image id
-- order, built in one pass over source_tags and tag_scores for all partitions. sql/040 reads a
-- range of image ids per partition; the table is stored in image id order, so DuckDB's zone maps
-- (min/max per row group) skip every other partition's rows: the partitions cost O(n) in all,
-- not O(n x partitions).
-- Candidates: source tags (score 1); tagger tags over their category's threshold; the tagger's
-- top rating when the source has none.
with source_candidates as (
    select i.image_id, s.tag, s.category, 1.0::float as score, s.position
    from source_tags s
    join image_ids i on i.key = s.key
),
tagger_candidates as (
    select i.image_id, t.tag, t.category, t.score, null::integer as position
    from tag_scores t
    join image_ids i on i.key = t.key
    where (t.category = 'general' and t.score >= $general_threshold)
       or (t.category = 'character' and t.score >= $character_threshold)
),
tagger_ratings as (
    select i.image_id, arg_max(t.tag, t.score) as tag, 'rating' as category, max(t.score) as score,
           null::integer as position
    from tag_scores t
    join image_ids i on i.key = t.key
    where t.category = 'rating'
    group by i.image_id
),
candidates as (
    select * from source_candidates
    union all
    select * from tagger_candidates
    union all
    select r.* from tagger_ratings r
    anti join (select image_id from source_candidates where category = 'rating') s on s.image_id = r.image_id
)
select * from candidates
order by image_id
