-- report_tag_frequency: the $top_n most frequent general tags, counted over each image's tags in
-- the image_tag_lists view: its curated tags, its source tags only while curate has not seen it
-- (and the tags the caption job derived from its text), with a person's review edits. A tag
-- curate removed is never counted, as it is never exported: the view is what export reads.
-- Parameters: $top_n. Reads image_tag_lists.
with image_tags as (
    select key, unnest(tags) as tag, unnest(categories) as category
    from image_tag_lists
)
select tag, count(distinct key) as images
from image_tags
where category = 'general'
group by tag
order by images desc, tag
limit $top_n
