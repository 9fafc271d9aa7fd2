-- export_left_files: the files the export folder's previous manifest ($previous, the
-- manifest.parquet this export replaces) names and this export's (current_manifest) does not:
-- what an earlier export to this folder left there. Paths are relative to the export folder.
-- A webdataset or Parquet row names its file; a kohya or EveryDream row its image and KEY.txt,
-- and an EveryDream folder has multiply.txt.
-- Parameters: $previous. Reads current_manifest (sql/export_manifest.sql).
with manifests as (
    select true as previous, layout, path, image, sample_key from read_parquet($previous)
    union all
    select false, layout, path, image, sample_key from current_manifest
),
files as (
    select previous,
           unnest(case when layout in ('kohya', 'everydream')
                       then [path || '/' || image, path || '/' || sample_key || '.txt']
                            || case when layout = 'everydream' then [path || '/multiply.txt'] else [] end
                       else [path] end) as file
    from manifests
)
select file from files where previous
except
select file from files where not previous
order by file
