-- export_text_cut: the images of this export whose KEY.txt was cut to export.clip_token_budget
-- (an image counts once, whatever its layouts and repeats). Reads current_manifest
-- (sql/export_manifest.sql).
select count(distinct key) as images
from current_manifest
where text_cut > 0
