-- caption_text_images: images with a caption or SD prompt of their own but no tags at all
-- (neither curated tags nor source tags other than those earlier derived from this text).
-- Curated tags count only where the image has a source other than its text (other source tags,
-- the tagger): curate makes the tags derived from the text curated tags, and an image left with
-- those alone is untagged still (its tags found again, not dropped; its own caption is never
-- scored against them).
-- Parameters: none.
with text_tagged as (
    select key from source_tags group by key having bool_and(origin = 'caption')
),
text_tagged_with_scores as (
    -- only the text-tagged keys are looked up in tag_scores (a hundred rows an image or more: a
    -- semi join with all of it built a hash table of the whole table, 6-8 s at 200,000 images)
    select distinct key from tag_scores where key in (select key from text_tagged)
),
tagged as (
    select distinct key from tags
    where key not in (select key from text_tagged) or key in (select key from text_tagged_with_scores)
    union
    select distinct key from source_tags where origin <> 'caption'
)
select key, string_agg(text, ', ' order by kind, text) as text
from source_text
where kind in ('caption', 'sd_prompt', 'nai_comment')
  and key not in (select key from tagged)
group by key
order by key
