-- caption_related_tags: for one unit of images, the tags often seen with an image's tags that the
-- image lacks. A suggestion for an image is a tag b it lacks from a related pair (a, b) of one of
-- its tags a; its score is the best such pmi; at most $top_k per image, best first. Never
-- suggested: a tag a person removed from the image in review, and a tag that cannot stand beside
-- one the image has (curate's impossible combinations, either way: no 3girls for a solo image).
-- Inputs: image_tags (key, tag, present: the unit's visual tags, and the tags a person removed,
-- not present), related_pairs (tag, related, category, pmi, support: sql/caption_related_pairs.sql
-- over the whole dataset), impossible_tags (tag_a, tag_b, winner: curate.rules_dir's
-- impossible_tags.csv). Parameter: $top_k.
with have as (
    select key, tag from image_tags where present
),
conflicts as (
    select h.key, r.other as tag
    from have as h
    join (select tag_a as tag, tag_b as other from impossible_tags
          union
          select tag_b, tag_a from impossible_tags) as r using (tag)
),
candidates as (
    select t.key, p.related as tag, p.category, p.tag as because, p.pmi, p.support
    from have as t
    join related_pairs as p on p.tag = t.tag
    anti join image_tags as known on known.key = t.key and known.tag = p.related
    anti join conflicts as c on c.key = t.key and c.tag = p.related
),
best_per_tag as (
    -- ties in pmi go to the first tag by name, so reruns give the same rows
    select key, tag, min(category) as category, max(pmi) as score,
           arg_min(because, {'pmi': -pmi, 'because': because}) as because,
           arg_min(support, {'pmi': -pmi, 'because': because}) as support
    from candidates
    group by key, tag
),
ranked as (
    select *, row_number() over (partition by key order by score desc, support desc, tag) as place
    from best_per_tag
)
select key, tag, category, score::float as score, support::integer as support, because, 'pmi' as origin
from ranked
where place <= $top_k
order by key, place
