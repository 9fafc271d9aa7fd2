-- export_unit_folders: the kohya and EveryDream folders that the units in checked_units wrote
-- per-image files in, relative to the export folder: each is listed once to find the units
-- whose files are gone (sql/export_lost_units.sql). Reads export_manifest, checked_units.
select distinct path
from export_manifest
semi join checked_units using (unit)
where layout in ('kohya', 'everydream')
order by path
