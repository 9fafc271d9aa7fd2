-- caption_related_units: the visual tags (visual_tags, a temp view of sql/caption_visual_tags.sql)
-- cut into units of $unit_size images in key order, for the tasks that write suggestions.
select key, tag,
       (dense_rank() over (order by key) - 1) // $unit_size as unit_index
from visual_tags
order by key, tag
