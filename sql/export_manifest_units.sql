-- export_manifest_units: the units an export folder's manifest.parquet (folder_manifest) names:
-- those of the last export to that folder that ended. Reads folder_manifest.
select distinct unit
from folder_manifest
order by unit
