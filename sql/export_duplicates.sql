-- export_duplicates: the duplicates table as the export reads it (jobs/export.stage_selection
-- registers it in place of `duplicates` for the selection and its left-out counts): in each
-- group the one image the export keeps is the representative. Curate's representative stays it
-- unless the export leaves it out for another reason now: a person excluded it after curate
-- ($drop_excluded), its accepted caption is flagged and not edited ($drop_flagged; captions come
-- after curate), or an ingest removed its file since, or its input is gone ($gone_inputs). Then the next image by curate's order
-- (largest, then bytes, then key) of those the export keeps is: curate's choice alone left every
-- other copy out as a near duplicate, and the picture was gone from the training set. An image a
-- person marked as no duplicate (not_duplicate) is in no group, as curate's next run has it.
-- Run once over the whole workspace (a group's images are in any key range); the result has a
-- row per image of a group, far fewer than the images.
-- Parameters: $drop_flagged, $drop_excluded, $gone_inputs. Reads duplicates, images, captions, edit_state.
with not_duplicates as (
    select key from edit_state where field = 'not_duplicate' and new = 'true'
),
members as (
    select key, min(dup_group) as dup_group, bool_and(is_representative) as is_representative, min(reason) as reason
    from duplicates
    group by key
),
grouped as (
    select * from members
    anti join not_duplicates using (key)
),
flagged as (
    select key, bool_or(flagged) as flagged
    from captions
    semi join members using (key)
    where accepted
    group by key
),
caption_edits as (
    select key from edit_state where field = 'caption' and new is not null
),
excluded as (
    select key from edit_state where field = 'exclude' and new = 'true'
),
ranked as (
    select m.*, row_number() over (
        partition by m.dup_group
        order by i.key is null,
                 list_contains($gone_inputs::varchar[], split_part(m.key, '/', 1)),
                 $drop_excluded and x.key is not null,
                 $drop_flagged and e.key is null and coalesce(f.flagged, false),
                 not m.is_representative,
                 coalesce(i.width, 0)::bigint * coalesce(i.height, 0) desc, coalesce(i.bytes, 0) desc, m.key
    ) as place
    from grouped m
    left join images i using (key)
    left join flagged f using (key)
    left join caption_edits e using (key)
    left join excluded x using (key)
)
select key, dup_group, place = 1 as is_representative, reason
from ranked
