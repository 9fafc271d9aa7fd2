-- report_characters: images per character (image_meta.characters), most frequent first, and the
-- images with no character as "(none)".
-- Parameters: $top_n. Reads image_meta.
with per_image as (
    select key, unnest(case when len(characters) = 0 then ['(none)'] else characters end) as character
    from image_meta
)
select character, count(distinct key) as images
from per_image
group by character
order by images desc, character
limit $top_n
