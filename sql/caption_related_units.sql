-- caption_related_units: the visual tags (visual_tags, a temp view of sql/caption_visual_tags.sql),
-- present, and the tags a person removed in review (edit_state), not present: they are never
-- suggested to that image again; cut into units of $unit_size images in key order, for the tasks
-- that write suggestions.
with image_tags as (
    select key, tag, true as present from visual_tags
    union all
    select key, subject as tag, false as present from edit_state where field = 'tags' and new is null
)
select key, tag, present,
       (dense_rank() over (order by key) - 1) // $unit_size as unit_index
from image_tags
order by key, tag
