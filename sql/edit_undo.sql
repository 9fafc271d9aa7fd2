-- edit_undo: the edits that take back the edits of batch $batch (one request of booruset review).
-- Each (image, field, subject) the batch changed goes back to what stood before it: for a tag,
-- the opposite of the batch's edit (a batch holds only real changes); for the other fields, the
-- previous edit's value, or null (what the jobs made) when there was none.
-- Parameters: $batch. Reads edits.
with undone as (
    select key, field, old, new, seq,
           case when field = 'tags' then coalesce(new, old) else '' end as subject
    from edits
    where batch = $batch
),
earlier as (
    select e.key, e.field, e.new,
           case when e.field = 'tags' then coalesce(e.new, e.old) else '' end as subject
    from edits as e
    semi join undone as u on u.key = e.key and u.field = e.field
    where e.batch < $batch
    qualify row_number() over (partition by e.key, e.field, subject order by e.time desc, e.batch desc, e.seq desc) = 1
)
select u.key,
       u.field,
       u.new as old,
       case when u.field = 'tags' then u.old else p.new end as new
from undone as u
left join earlier as p using (key, field, subject)
order by u.seq
