-- group_counts: the images of each group path that the balance shares its weight among.
-- A near duplicate that is not its group's representative is left out of the export (by
-- default, export.drop_duplicates), so it does not count: a folder of 12 images, 8 of them
-- copies of others, is balanced as the 4 it exports. A folder whose images are all such
-- duplicates counts them all, so that it still gets a multiply (for exports that keep them).
-- Parameters: none. Reads groups, duplicates.
with duplicate_keys as (
    select key, bool_and(is_representative) as is_representative
    from duplicates
    group by key
),
counted as (
    select g.path, coalesce(d.is_representative, true) as exported
    from groups g
    left join duplicate_keys d using (key)
)
select path, coalesce(nullif(count(*) filter (where exported), 0), count(*)) as n_images
from counted
group by path
