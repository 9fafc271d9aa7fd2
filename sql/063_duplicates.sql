-- duplicates: every image in a near-duplicate group (duplicate_components: key, component,
-- from the connected components of phash_pairs, embedding_pairs and exact_pairs), with its
-- group's representative: the largest image (width x height, then bytes), then the first key,
-- among the images a person did not exclude (edit_state, booruset review) when there are any:
-- the export leaves out an excluded image and every other member of its group, so an excluded
-- representative took the whole group out of the training set. An image a person marked as no
-- duplicate (edit_state field not_duplicate) is in no group: a false match took it out of the
-- training set, and nothing but a global phash_distance could give it back. Nor is an image of
-- an input whose folder or shard is gone ($gone_inputs: input ids) when the group has another:
-- the export cannot read it and keeps a copy that is there (sql/export_duplicates.sql).
-- reason: the strongest evidence the image is in: identical (same bytes), phash, colour (flat
-- images of one colour), else embedding.
with excluded as (
    select key from edit_state where field = 'exclude' and new = 'true'
),
not_duplicates as (
    select key from edit_state where field = 'not_duplicate' and new = 'true'
),
members as (
    select d.key, d.component, i.width, i.height, i.bytes, x.key is not null as excluded,
           list_contains($gone_inputs::varchar[], split_part(d.key, '/', 1)) as gone
    from duplicate_components d
    left join images i on i.key = d.key
    left join excluded x on x.key = d.key
    anti join not_duplicates n on n.key = d.key
),
representatives as (
    select component, key as representative
    from (
        select component, key, row_number() over (
            partition by component
            order by excluded, gone, coalesce(width, 0)::bigint * coalesce(height, 0) desc, coalesce(bytes, 0) desc, key
        ) as place
        from members
    )
    where place = 1
),
evidence as (
    select key_a as key, reason from exact_pairs
    union select key_b, reason from exact_pairs
    union select key_a, reason from phash_pairs
    union select key_b, reason from phash_pairs
),
strongest as (
    select key, min(case reason when 'identical' then 1 when 'phash' then 2 else 3 end) as strength
    from evidence
    group by key
)
select m.key, r.representative as dup_group, m.key = r.representative as is_representative,
       case s.strength when 1 then 'identical' when 2 then 'phash' when 3 then 'colour' else 'embedding' end
           as reason
from members m
join representatives r on r.component = m.component
left join strongest s on s.key = m.key
