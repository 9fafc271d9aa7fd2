-- caption_tag_vocabulary: the known tags (curated and source tags, not those derived from text),
-- with their most common category. Parameters: none.
with seen as (
    select tag, coalesce(category, 'general') as category from tags
    union all
    select tag, coalesce(category, 'general') as category from source_tags where origin <> 'caption'
)
select tag, mode(category) as category
from seen
where category not in ('rating', 'meta')
group by tag
order by tag
