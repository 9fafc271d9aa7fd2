-- report_balance: per balance group, its share of the images before multiply and its share of
-- the training samples after (sum of multiply), over the images the export keeps: a near
-- duplicate that is not its group's representative is left out ($drop_duplicates,
-- export.drop_duplicates), as the balance gives its group's multiply to the others
-- (sql/084_group_members.sql); summed over every image, a group of 12 images, 8 of them such
-- duplicates, showed 12 samples where the export wrote 4.
-- Parameters: $drop_duplicates. Reads balance, duplicates.
with duplicate_keys as (
    select key, bool_and(is_representative) as is_representative
    from duplicates
    group by key
),
per_group as (
    select b.path, count(*) as images, sum(b.multiply) as samples
    from balance b
    left join duplicate_keys d using (key)
    where not ($drop_duplicates and not coalesce(d.is_representative, true))
    group by b.path
)
select path,
       images,
       samples,
       images / sum(images) over () as share_before,
       samples / sum(samples) over () as share_after
from per_group
order by images desc, path
