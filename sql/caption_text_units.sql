-- caption_text_units: text_images (a temp view of sql/caption_text_images.sql) cut into units of
-- $unit_size images in key order, for the actors that find tags in the texts.
select *, (row_number() over (order by key) - 1) // $unit_size as unit_index
from text_images
order by key
