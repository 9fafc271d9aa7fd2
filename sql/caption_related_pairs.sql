-- caption_related_pairs: tag pairs that go together, over the whole dataset (visual_tags, a temp
-- view of sql/caption_visual_tags.sql). Pointwise mutual information
-- pmi(a, b) = ln(n * n_ab / (n_a * n_b)); a pair counts from $min_support images having both and
-- a pmi >= $min_pmi. One row per direction: `related` is suggested because of `tag`.
-- The co-occurrence self-join runs on integer ids (tens of tags per image make it the costly
-- step), once per unordered pair; names come back at the end. The result is per pair of tags,
-- bounded by the vocabulary, not by the number of images.
-- Parameters: $min_support, $min_pmi.
with tag_counts as (
    select tag, min(category) as category, count(*) as n_tag,
           (row_number() over (order by tag))::integer as tag_id
    from visual_tags
    group by tag
),
image_ids as (
    select key, (row_number() over (order by key))::integer as image_id
    from (select distinct key from visual_tags)
),
n_images as (
    select count(*)::double as n from image_ids
),
tagged as (
    select i.image_id, c.tag_id
    from visual_tags as v
    join image_ids as i using (key)
    join tag_counts as c using (tag)
),
unordered_pairs as (
    select a.tag_id as tag_a, b.tag_id as tag_b, count(*) as support
    from tagged as a
    join tagged as b on a.image_id = b.image_id and a.tag_id < b.tag_id
    group by a.tag_id, b.tag_id
    having count(*) >= $min_support
),
pairs as (
    select tag_a, tag_b, support from unordered_pairs
    union all
    select tag_b, tag_a, support from unordered_pairs
),
pair_pmi as (
    select p.tag_a, p.tag_b, p.support, ln(p.support * n.n / (ca.n_tag * cb.n_tag)) as pmi
    from pairs as p
    cross join n_images as n
    join tag_counts as ca on ca.tag_id = p.tag_a
    join tag_counts as cb on cb.tag_id = p.tag_b
)
select a.tag, b.tag as related, b.category, p.pmi, p.support
from pair_pmi as p
join tag_counts as a on a.tag_id = p.tag_a
join tag_counts as b on b.tag_id = p.tag_b
where p.pmi >= $min_pmi
order by a.tag, b.tag
