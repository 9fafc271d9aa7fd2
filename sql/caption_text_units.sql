-- caption_text_units: text_images (a temp view of sql/caption_text_images.sql) cut into units of
-- $unit_size images in key order, for the actors that find tags in the texts. row_digest: a
-- digest of each row (store/staging.py), by which a rerun tells that the texts are the same.
select *, (row_number() over (order by key) - 1) // $unit_size as unit_index,
       md5(key || chr(0) || text) as row_digest
from text_images
order by key
