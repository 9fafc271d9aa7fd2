-- tags: the curated (image, tag) rows of one partition of the images: ids $first_id until $end_id,
-- keys $first_key to $last_key (the job runs every partition). The key bounds are also given to
-- the source_tags and tag_scores scans, where Parquet statistics skip the files and row groups
-- of other partitions: each partition reads its own rows, not the whole tables.
-- Steps, each a CTE: candidates (source tags, score 1; tagger tags over their category's
-- threshold; the tagger's top rating when the source has none) -> aliases and blacklist (one
-- lookup) -> one row per tag -> impossible combinations -> overlapping tags (imgutils
-- drop_overlap_tags) and character traits (optional, images with a character tag only) -> rank.
-- Tags, categories and images become integer ids (tag_vocabulary, category_ids, image_ids) at
-- the first joins; the strings come back at the end. $general_category_id and
-- $character_category_id: those categories' ids in category_ids (null where there is none), as
-- parameters: a constant is a filter, the same id from a subquery a join of every row.
with image_part as (
    -- 32-bit ids (image_ids has 64): the group by, join and window keys every row carries are
    -- narrower; past 2^31 images the cast fails, it cannot wrap
    select key, image_id::integer as image_id from image_ids
    where image_id >= $first_id and image_id < $end_id
),
source_candidates as (
    select i.image_id, s.tag, s.category, 1.0::float as score, s.position
    from source_tags s
    join image_part i on i.key = s.key
    where s.key between $first_key and $last_key
),
tagger_candidates as (
    select i.image_id, t.tag, t.category, t.score, null::integer as position
    from tag_scores t
    join image_part i on i.key = t.key
    where t.key between $first_key and $last_key
      and coalesce(t.crop, -1) = -1  -- the whole image's scores (person crops: sql/075_person_tags.sql; regions)
      -- strictly above, as imgutils.tagging.get_wd14_tags keeps them
      and ((t.category = 'general' and t.score > $general_threshold)
        or (t.category = 'character' and t.score > $character_threshold))
),
tagger_ratings as (
    select i.image_id, arg_max(t.tag, {'score': t.score, 'tag': t.tag}) as tag, 'rating' as category, max(t.score) as score,
           null::integer as position
    from tag_scores t
    join image_part i on i.key = t.key
    where t.key between $first_key and $last_key and t.category = 'rating' and coalesce(t.crop, -1) = -1
    group by i.image_id
),
rating_names as (
    -- the ratings, and their aliases: a plain source tag of these names (`explicit` in a kohya
    -- .txt) is the image's rating once categorized below, as one written `rating:explicit` is
    select tag from tag_vocabulary where category = 'rating'
    union
    select a.alias from tag_aliases a join tag_vocabulary v on v.tag = a.tag where v.category = 'rating'
),
source_ratings as (
    select distinct image_id from source_candidates
    where category = 'rating' or (category = 'general' and tag in (select tag from rating_names))
),
candidates as (
    select * from source_candidates
    union all
    select * from tagger_candidates
    union all
    select r.* from tagger_ratings r
    anti join source_ratings s on s.image_id = r.image_id
),
kept_vocabulary as (
    -- the blacklist leaves its tags out of the lookup every candidate is joined with anyway: no
    -- anti join of every (image, tag) row
    select v.tag, v.tag_id, k.category_id
    from tag_vocabulary v
    join category_ids k on k.category = v.category
    anti join tag_blacklist b on b.tag = v.tag
),
tag_lookup as (
    -- every name a candidate can carry (a tag, or an alias of one) to the tag's id and category
    -- id: one join a candidate instead of three (aliases, vocabulary, the vocabulary's category)
    select v.tag as name, v.tag_id, v.category_id
    from kept_vocabulary v
    anti join tag_aliases a on a.alias = v.tag
    union all
    select a.alias, v.tag_id, v.category_id
    from tag_aliases a
    join kept_vocabulary v on v.tag = a.tag
),
categorized as (
    -- categories as small integer ids (category_ids) from here to the last join: the group by,
    -- the anti joins and the window move and compare integers, not strings
    select c.image_id, m.tag_id, c.score, c.position,
           case when c.category <> 'general' then k.category_id else m.category_id end as category_id
    from candidates c
    join tag_lookup m on m.name = c.tag
    left join category_ids k on k.category = c.category
),
one_row_per_tag as (
    -- the max of (score, category id) gives both the highest score and its category, ties to
    -- the higher id: one struct aggregate, not a max and an arg_max keyed on the same struct
    select image_id, tag_id, top.id as category_id, top.score::float as score, position
    from (
        select image_id, tag_id, max({'score': score, 'id': category_id}) as top, min(position) as position
        from categorized
        group by image_id, tag_id
    )
),
rules as materialized (
    -- a few rows, made once: inlined, the vocabulary's join for tag_b was planned after the
    -- join with the images' tags, once for each of their ~10 rule hits an image
    select a.tag_id as a_id, b.tag_id as b_id, r.winner
    from impossible_tags r
    join tag_vocabulary a on a.tag = r.tag_a
    join tag_vocabulary b on b.tag = r.tag_b
),
rule_hits as materialized (
    -- rules first (few rows), then the other tag: joining the image's tags with each other
    -- on the image alone would pair every tag with every tag
    select h.image_id, h.tag_id, h.score, r.b_id, r.winner
    from one_row_per_tag h
    join rules r on r.a_id = h.tag_id
),
impossible_losers as (
    select distinct h.image_id,
           case when h.winner = 'a' or (h.winner = 'score' and h.score >= b.score) then b.tag_id
                else h.tag_id end as tag_id
    from rule_hits h
    join one_row_per_tag b on b.image_id = h.image_id and b.tag_id = h.b_id
),
possible as (
    select t.* from one_row_per_tag t
    anti join impossible_losers l on l.image_id = t.image_id and l.tag_id = t.tag_id
),
general_possible as (
    select image_id, tag_id from possible where category_id = $general_category_id
),
overlapped as (
    -- from the more specific tag u to the tags it implies (a few substrings each), then keep
    -- those present: this direction joins ~3 rows per tag, the other (a short tag to all its
    -- superstrings) thousands. The semi join comes before the distinct, so that only the few
    -- implied tags that are present get deduplicated (not the ~1 implied tag per row).
    select distinct u.image_id, i.tag_id
    from general_possible u
    join tag_implications i on i.implied_by_id = u.tag_id
    semi join general_possible p on p.image_id = u.image_id and p.tag_id = i.tag_id
),
named_images as (
    -- from possible, not after the overlap rule: that drops general tags only
    select distinct image_id from possible where category_id = $character_category_id
),
trait_rows as (
    select t.image_id, t.tag_id
    from possible t
    join character_trait_tags c on c.tag_id = t.tag_id
    join named_images n on n.image_id = t.image_id
    where $drop_character_traits and t.category_id = $general_category_id
),
dropped as (
    -- the overlapped and the trait tags leave in one anti join (each a general tag of the
    -- image: the (image, tag) rows of possible are unique)
    select image_id, tag_id from overlapped
    union all
    select image_id, tag_id from trait_rows
),
curated as (
    select t.* from possible t
    anti join dropped d on d.image_id = t.image_id and d.tag_id = t.tag_id
),
count_tag_ids as (
    select distinct v.tag_id, v.tag = 'solo' as is_solo
    from count_tags c join tag_vocabulary v on v.tag = c.tag
),
ranked as (
    -- tag_id order is tag order (sql/010 numbers the tags in order), so the window sorts
    -- integers only; the strings are joined after it
    select t.image_id, t.tag_id, t.category_id, t.score,
           row_number() over (
               partition by t.image_id
               -- imgutils.tagging.sort_tags: `solo`, then the people counts; then characters
               order by case when c.is_solo then 0 when c.tag_id is not null then 1
                             when t.category_id = $character_category_id then 2 else 3 end,
                        t.score desc, t.position nulls last, t.tag_id
           )::integer as rank
    from curated t
    left join count_tag_ids c on c.tag_id = t.tag_id
)
-- the strings back by id as scalar subqueries: DuckDB joins each with its lookup table as the
-- hash table (a single join is never flipped). As inner joins, the build side followed the
-- row estimates, which the anti joins above shrink to a few rows for ranked's ~840,000: the
-- hash tables were built on ranked, three times, and probed with the lookups.
select (select i.key from image_part i where i.image_id = r.image_id) as key,
       (select v.tag from tag_vocabulary v where v.tag_id = r.tag_id) as tag,
       (select k.category from category_ids k where k.category_id = r.category_id) as category,
       r.score, r.rank
from ranked r
