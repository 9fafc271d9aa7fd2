-- edit_undo: the edits that take back the edits of batch $batch (one request of booruset review).
-- Only what the batch still decides is taken back (a later edit of the same field wins over an
-- undo of an earlier one). Each such (image, field, subject) goes back to what stood before: for a tag,
-- the opposite of the batch's edit (a batch holds only real changes); for the other fields, the
-- previous edit's value, or null (what the jobs made) when there was none.
-- Parameters: $batch. Reads edits.
with undone as (
    select key, field, old, new, time, seq,
           case when field = 'tags' then coalesce(new, old) else '' end as subject
    from edits
    where batch = $batch
),
still_standing as (
    -- no later edit of its (image, field, subject): edit_state's latest, without computing
    -- edit_state over every edit of the workspace
    select u.*
    from undone as u
    where not exists (
        select 1
        from edits as e
        where e.key = u.key
          and e.field = u.field
          and case when e.field = 'tags' then coalesce(e.new, e.old) else '' end = u.subject
          and (e.time > u.time or (e.time = u.time and (e.batch > $batch or (e.batch = $batch and e.seq > u.seq))))
    )
),
earlier as (
    select e.key, e.field, e.new,
           case when e.field = 'tags' then coalesce(e.new, e.old) else '' end as subject
    from edits as e
    semi join still_standing as u on u.key = e.key and u.field = e.field
    where e.batch < $batch
    qualify row_number() over (partition by e.key, e.field, subject order by e.time desc, e.batch desc, e.seq desc) = 1
)
select u.key,
       u.field,
       u.new as old,
       case when u.field = 'tags' then u.old else p.new end as new
from still_standing as u
left join earlier as p using (key, field, subject)
order by u.seq
