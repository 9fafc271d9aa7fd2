-- export_manifest: the manifest rows of this export's units, in file order (layout, file, sample),
-- for <out>/manifest.parquet. export_manifest also holds the rows of units no longer planned
-- until the next publish drops them: current_units (the unit ids of this export) keeps them out.
-- Reads export_manifest, current_units.
select manifest.*
from export_manifest as manifest
semi join current_units using (unit)
order by manifest.layout, manifest.path, manifest.sample_key
