-- report_balance: per balance group, its share of the images before multiply and its share of
-- the training samples after (sum of multiply), over the images the export selects (the
-- conditions of sql/export_selection.sql, but export.where): a near duplicate that is not its
-- group's representative as the export keeps it ($drop_duplicates, over export_duplicates: the
-- next copy stands in for a representative the export leaves out), an image whose accepted
-- caption is flagged and not edited ($drop_flagged), one excluded in review (the export leaves it
-- out at once, curate's balance next time), one of an input whose folder or shard is gone
-- ($gone_inputs) and a picture gone from the inputs are left out. Counting the near duplicates
-- showed a balanced dataset as unbalanced (three copies of one picture, one exported, against one
-- other picture: 3:1 for an export of 1:1); counting the images of a moved input showed groups the
-- export writes without them. A group the export writes nothing of has no row.
-- Parameters: $drop_duplicates, $drop_flagged, $gone_inputs, $no_group. Reads balance, export_duplicates
-- (jobs/export.export_duplicates), images, captions, edit_state.
with duplicate_keys as (
    select key, bool_and(is_representative) as is_representative
    from export_duplicates
    group by key
),
flagged_captions as (
    select key, bool_or(flagged) as flagged
    from captions
    where accepted
    group by key
),
caption_edits as (
    select key from edit_state where field = 'caption' and new is not null
),
per_group as (
    -- from images: a picture gone from the inputs has a balance row until curate runs, no sample;
    -- an image without a balance row (ingested since curate, or included again since curate left
    -- it out) is exported once with no group ($no_group)
    select coalesce(b.path, $no_group) as path, count(*) as images, sum(coalesce(b.multiply, 1.0)) as samples
    from images i
    left join balance b using (key)
    left join duplicate_keys d using (key)
    left join flagged_captions f using (key)
    left join caption_edits cap using (key)
    where not ($drop_duplicates and not coalesce(d.is_representative, true))
      and not ($drop_flagged and cap.key is null and coalesce(f.flagged, false))
      and not list_contains($gone_inputs::varchar[], split_part(i.key, '/', 1))
      and i.key not in (select key from edit_state where field = 'exclude' and new = 'true')
    group by all
)
select path,
       images,
       samples,
       images / sum(images) over () as share_before,
       samples / sum(samples) over () as share_after
from per_group
order by images desc, path
