-- export_left_out: the images of one key range [$first, $last) ($last null: to the end) that
-- sql/export_selection.sql leaves out, counted by reason (the first that applies, in this order):
-- gone with their input ($gone_inputs), excluded in review ($drop_excluded), a near duplicate that is not its group's representative
-- ($drop_duplicates), an accepted caption flagged for review and not edited ($drop_flagged).
-- The same conditions as the selection's; what export.where leaves out is the rest (jobs/export.py).
with flagged_captions as (
    select key, bool_or(flagged) as flagged
    from captions
    where accepted
    group by key
),
duplicate_groups as (
    select key, bool_and(is_representative) as is_representative
    from duplicates
    group by key
),
caption_edits as (
    select key from edit_state where field = 'caption' and new is not null
),
exclude_edits as (
    select key, new = 'true' as excluded from edit_state where field = 'exclude'
),
reasons as (
    select case
               when list_contains($gone_inputs::varchar[], split_part(i.key, '/', 1)) then 'gone with their input'
               when $drop_excluded and coalesce(x.excluded, false) then 'excluded in review'
               when $drop_duplicates and not coalesce(d.is_representative, true) then 'near duplicates'
               when $drop_flagged and cap.key is null and coalesce(f.flagged, false) then 'flagged captions'
           end as reason
    from images as i
    left join flagged_captions as f using (key)
    left join duplicate_groups as d using (key)
    left join caption_edits as cap using (key)
    left join exclude_edits as x using (key)
    where i.key >= $first and ($last is null or i.key < $last)
)
select reason, count(*) as images
from reasons
where reason is not null
group by reason
order by reason
