-- duplicates: every image in a near-duplicate group (duplicate_components: key, component,
-- from the connected components of phash_pairs and embedding_pairs), with its group's
-- representative: the largest image (width x height, then bytes), then the first key.
-- reason: phash when the image is in a phash pair, else embedding.
with members as (
    select d.key, d.component, i.width, i.height, i.bytes
    from duplicate_components d
    left join images i on i.key = d.key
),
representatives as (
    select component, key as representative
    from (
        select component, key, row_number() over (
            partition by component
            order by coalesce(width, 0)::bigint * coalesce(height, 0) desc, coalesce(bytes, 0) desc, key
        ) as place
        from members
    )
    where place = 1
),
phash_keys as (
    select key_a as key from phash_pairs union select key_b from phash_pairs
)
select m.key, r.representative as dup_group, m.key = r.representative as is_representative,
       case when p.key is not null then 'phash' else 'embedding' end as reason
from members m
join representatives r on r.component = m.component
left join phash_keys p on p.key = m.key
