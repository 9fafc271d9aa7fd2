-- export_file_samples: samples per layout and file (a shard, a Parquet file, a kohya or
-- EveryDream folder) of this export: the wids index's counts and the summary's per layout.
-- Reads current_manifest (sql/export_manifest.sql).
select layout, path, count(*) as samples
from current_manifest
group by layout, path
order by layout, path
