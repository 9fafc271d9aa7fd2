-- edit_state: the standing correction per (image, field, subject), from the append-only `edits`
-- table that `booruset review` writes. The latest edit wins, so an undo is simply a later edit.
-- subject: the tag for field 'tags' (new = the tag: added; new null: removed), else ''.
-- For the other fields a null `new` means "back to what the jobs made".
-- A view every workspace connection has (store/workspace.py); image_tag_lists, the export
-- selection and the review page read it. Parameters: none. Reads edits.
select key,
       field,
       case when field = 'tags' then coalesce(new, old) else '' end as subject,
       new,
       time,
       batch
from edits
qualify row_number() over (partition by key, field, subject order by time desc, batch desc, seq desc) = 1
