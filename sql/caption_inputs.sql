-- caption_inputs: one row per image with what the captioners read.
-- Tags come from the image_tag_lists view (sql/image_tag_lists.sql). Rating: image_meta, else
-- a source rating tag.
-- Parameters: none. Reads images, image_tag_lists, image_meta, source_text.
with texts as (
    select key, list(text order by kind, text) as texts
    from source_text
    where kind in ('caption', 'sd_prompt', 'nai_comment')
    group by key
)
select i.key,
       i.source,
       i.member,
       coalesce(t.tags, []::varchar[]) as tags,
       coalesce(t.categories, []::varchar[]) as categories,
       m.n_people,
       coalesce(m.characters, []::varchar[]) as characters,
       coalesce(m.rating, t.source_rating) as rating,
       coalesce(x.texts, []::varchar[]) as texts
from images as i
left join image_tag_lists as t using (key)
left join image_meta as m using (key)
left join texts as x using (key)
order by i.key
