-- report_tag_frequency: the $top_n most frequent general tags (curated tags, else source tags).
-- Parameters: $top_n. Reads tags, source_tags.
with image_tags as (
    select key, tag, category from tags
    union all
    select distinct key, tag, category from source_tags
    where key not in (select key from tags)
)
select tag, count(distinct key) as images
from image_tags
where coalesce(category, 'general') = 'general'
group by tag
order by images desc, tag
limit $top_n
