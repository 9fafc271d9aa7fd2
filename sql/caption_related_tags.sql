-- caption_related_tags: tags often seen with an image's tags that the image lacks.
-- Pointwise mutual information over the whole dataset: pmi(a, b) = ln(n * n_ab / (n_a * n_b)).
-- A suggestion for an image is a tag b it lacks with a pmi(a, b) >= $min_pmi for one of its tags a,
-- from at least $min_support images having both; at most $top_k per image, best first.
-- Tags: curated `tags`, else `source_tags` for images without curated tags; visual categories only.
-- Parameters: $min_support, $min_pmi, $top_k.
with curated as (
    select distinct key, tag, coalesce(category, 'general') as category
    from tags
),
image_tags as (
    select * from curated
    union
    select distinct key, tag, coalesce(category, 'general') as category
    from source_tags
    where key not in (select key from curated)
),
visual_tags as (
    select key, tag, category
    from image_tags
    where category in ('general', 'character', 'copyright')
),
n_images as (
    select count(distinct key)::double as n from visual_tags
),
tag_counts as (
    select tag, any_value(category) as category, count(*) as n_tag
    from visual_tags
    group by tag
),
pairs as (
    select a.tag as tag_a, b.tag as tag_b, count(*) as support
    from visual_tags as a
    join visual_tags as b on a.key = b.key and a.tag <> b.tag
    group by a.tag, b.tag
    having count(*) >= $min_support
),
pair_pmi as (
    select p.tag_a, p.tag_b, p.support, ln(p.support * n.n / (ca.n_tag * cb.n_tag)) as pmi
    from pairs as p
    cross join n_images as n
    join tag_counts as ca on ca.tag = p.tag_a
    join tag_counts as cb on cb.tag = p.tag_b
),
strong_pairs as (
    select * from pair_pmi where pmi >= $min_pmi
),
candidates as (
    select t.key, s.tag_b as tag, s.tag_a as because, s.pmi, s.support
    from visual_tags as t
    join strong_pairs as s on s.tag_a = t.tag
    anti join visual_tags as have on have.key = t.key and have.tag = s.tag_b
),
best_per_tag as (
    select key, tag, max(pmi) as score, arg_max(because, pmi) as because, arg_max(support, pmi) as support
    from candidates
    group by key, tag
),
ranked as (
    select *, row_number() over (partition by key order by score desc, support desc, tag) as place
    from best_per_tag
)
select r.key, r.tag, c.category, r.score::float as score, r.support::integer as support, r.because,
       'pmi' as origin
from ranked as r
join tag_counts as c using (tag)
where r.place <= $top_k
order by r.key, r.place
