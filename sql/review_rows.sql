-- review_rows: the review page's row per image: the export selection with nothing dropped (its
-- sha256 names the thumbnails), plus whether a person edited it and whether they said it is no
-- near duplicate of its group. `$selection` stands for
-- sql/export_selection.sql, put in by review/selection.py, which keeps the result as a table in
-- key order. Parameters: those of export_selection. Reads edit_state.
select s.*,
       e.key is not null as edited,
       coalesce(e.not_duplicate, false) as not_duplicate
from $selection as s
-- a join with edit_state per key, not `exists` subqueries: a key filter on the result reaches
-- its scan of edits (each subquery read every edit of the workspace, at each row refresh)
left join (select key, bool_or(field = 'not_duplicate' and new = 'true') as not_duplicate
           from edit_state
           group by key) as e using (key)
