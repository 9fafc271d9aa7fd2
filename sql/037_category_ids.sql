-- category_ids: a small integer id per tag category (general, character, rating, ...), so that
-- sql/040 picks a tag's category per image with arg_max over an integer instead of a string.
with categories as (
    select distinct category from source_tags
    union
    select distinct category from tag_scores
    union
    select distinct category from tag_vocabulary
)
select category, (row_number() over (order by category))::integer as category_id
from categories
