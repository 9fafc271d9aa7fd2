-- report_balance: per balance group, its share of the images before multiply and its share of
-- the training samples after (sum of multiply), over the images the export keeps: a near
-- duplicate that is not its group's representative is left out ($drop_duplicates,
-- export.drop_duplicates), as the export leaves it out. Counting them showed a balanced dataset
-- as unbalanced (three copies of one picture, one exported, against one other picture: 3:1 for
-- an export of 1:1; a group of 12 images, 8 of them such duplicates, 12 samples for an export of
-- 4). A group of such duplicates only (their representatives in other groups) has no row: the
-- export writes none of it.
-- Parameters: $drop_duplicates. Reads balance, duplicates, images, edit_state.
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
      and b.key in (select key from images)  -- a picture gone from the inputs: the export has none
      -- excluded in review (edit_state): the export leaves it out at once, curate's balance next time
      and b.key not in (select key from edit_state where field = 'exclude' and new = 'true')
    group by b.path
)
select path,
       images,
       samples,
       images / sum(images) over () as share_before,
       samples / sum(samples) over () as share_after
from per_group
order by images desc, path
