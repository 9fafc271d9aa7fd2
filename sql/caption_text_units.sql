-- caption_text_units: text_images (a temp view of sql/caption_text_images.sql) cut into units of
-- at most $unit_size images in key order, for the actors that find tags in the texts. row_digest:
-- a digest of each row (store/staging.py): a unit whose digest a unit built before had keeps that
-- unit's tags (jobs/caption.tags_from_text). Parameters: $unit_size, $cut_every.
-- Cuts are content-defined (as sql/export_units.sql): the keys are cut after each key whose md5
-- falls in 1 of $cut_every buckets, then each such run into units of $unit_size in key order. Cut
-- every $unit_size images, one text added or removed moved every later unit, and every text
-- after it was embedded again.
with keyed as (
    select *,
           md5(key || chr(0) || text) as row_digest,
           (md5_number(key) % $cut_every::uhugeint = 0)::integer as ends_run  -- typed: a DOUBLE modulo loses the low bits
    from text_images
),
runs as (
    select *,
           coalesce(sum(ends_run) over (order by key rows between unbounded preceding and 1 preceding), 0) as key_run
    from keyed
)
select * exclude (ends_run, key_run),
       key_run * 4294967296 + (row_number() over (partition by key_run order by key) - 1) // $unit_size as unit_index
from runs
order by key
