-- caption_text_images: images with a caption or SD prompt of their own but no tags at all
-- (neither curated tags nor source tags other than those earlier derived from this text).
-- Parameters: none.
with tagged as (
    select distinct key from tags
    union
    select distinct key from source_tags where origin <> 'caption'
)
select key, string_agg(text, ', ' order by kind, text) as text
from source_text
where kind in ('caption', 'sd_prompt', 'nai_comment')
  and key not in (select key from tagged)
group by key
order by key
