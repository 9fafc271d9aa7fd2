-- export_units: the staged selection (export_selected) cut into export units, one row per unit,
-- in export order, so that a source of many images is written by several tasks side by side
-- (local shards are read with seeks, plain folders file by file). A tar on object storage is read
-- as one stream, so it stays one unit. A unit is the key range [first_key, last_key] of one
-- source: its task reads exactly those rows. Shard numbers follow unit_index, so the order must
-- be total. Parameters: $unit_images (export.max_count, at most ingest.folder_unit_size),
-- $cut_every. Reads export_selected.
-- Cuts are content-defined (as ingest's folder units, and rsync's): a source's keys are cut after
-- each key whose md5 falls in 1 of $cut_every buckets, then each such run of keys into units of
-- $unit_images in key order. An image left out or added moves the cuts of its own run only: cut
-- every $unit_images images of the source, one exclusion early in a source moved every later
-- unit's range, and the export wrote the rest of the source again.
with keyed as (
    select source,
           key,
           source like '%.tar' and source like '%://%' as streamed,
           (md5_number(key) % $cut_every::uhugeint = 0)::integer as ends_run  -- typed: a DOUBLE modulo loses the low bits
    from export_selected
),
runs as (
    select source, key, streamed,
           coalesce(sum(ends_run) over (partition by source order by key
                                        rows between unbounded preceding and 1 preceding), 0) as key_run
    from keyed
),
chunked as (
    select source,
           key,
           case when streamed then 0 else key_run end as key_run,
           case when streamed then 0
                else (row_number() over (partition by source, key_run order by key) - 1) // $unit_images
           end as run_chunk
    from runs
),
units as (
    select source, min(key) as first_key, max(key) as last_key, count(*) as n_images
    from chunked
    group by source, key_run, run_chunk
)
select row_number() over (order by source, first_key) - 1 as unit_index,
       source,
       first_key,
       last_key,
       n_images
from units
order by unit_index
