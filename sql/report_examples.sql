-- report_examples: $n example images spread over the dataset (exported ones, of any layout, when
-- there is an export), with where to find their bytes (their webdataset shard member, if any;
-- the report reads the others from their inputs, of the size ingest saw), their caption and their tags in rank order:
-- those of the image_tag_lists view (what export writes), so a tag curate removed is not on a card.
-- The caption is the one export writes: a person's from `booruset review` (edit_state) in place of
-- the accepted one, with no accuracy (nothing scored it).
-- Parameters: $n, $gone_inputs (jobs/export.gone_inputs). Reads images, export_manifest, captions,
-- image_tag_lists, edit_state.
with exported as (
    select key,
           min(path) filter (where layout = 'webdataset') as path,
           arg_min(image, path) filter (where layout = 'webdataset') as image
    from export_manifest
    group by key
),
pool as (
    select i.key, i.source, i.member, i.member_offset, i.bytes, e.path as shard, e.image as shard_member,
           row_number() over (order by hash(i.key), i.key) as pick
    from images i
    left join exported e using (key)
    -- before an export: not an image of an input whose folder or shard is gone (no picture to show)
    where e.key is not null
       or (not exists (select 1 from exported) and not list_contains($gone_inputs::varchar[], split_part(i.key, '/', 1)))
)
select p.key, p.source, p.member, p.member_offset, p.bytes, p.shard, p.shard_member,
       coalesce(e.caption, c.caption) as caption,
       case when e.key is null then c.accuracy end as accuracy,
       coalesce(l.tags, []::varchar[]) as tags
from pool p
left join captions c on c.key = p.key and c.accepted
left join (select key, new as caption from edit_state where field = 'caption' and new is not null) e
    on e.key = p.key
left join image_tag_lists l on l.key = p.key
where p.pick <= $n
order by p.key
