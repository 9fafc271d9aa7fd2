-- review_rows: the review page's row per image: the export selection with nothing dropped, plus
-- the image's hash (thumbnail names), whether a person edited it and whether they said it is no
-- near duplicate of its group. `$selection` stands for
-- sql/export_selection.sql, put in by review/selection.py, which keeps the result as a table in
-- key order. Parameters: those of export_selection. Reads images, edit_state.
select s.*,
       i.sha256,
       exists (select 1 from edit_state as e where e.key = s.key) as edited,
       exists (select 1 from edit_state as e where e.key = s.key and e.field = 'not_duplicate' and e.new = 'true')
           as not_duplicate
from $selection as s
join images as i using (key)
