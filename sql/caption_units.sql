-- caption_inputs (a temp view of sql/caption_inputs.sql) cut into units of $unit_size images in
-- key order. row_digest is a digest of each row's values: a unit's id hashes its rows' digests,
-- so new tags, texts or people make a new unit instead of reusing stale captions.
select *,
       (row_number() over (order by key) - 1) // $unit_size as unit_index,
       md5(to_json(caption_inputs)::varchar) as row_digest
from caption_inputs
order by key
