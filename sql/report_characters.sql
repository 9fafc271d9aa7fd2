-- report_characters: images per character, most frequent first, and the images with no character
-- as "(none)". An image curate has seen has its characters (image_meta.characters, with a
-- person's review edits); one it has not seen yet (no curate run, or ingested since) has the
-- character tags of the image_tag_lists view: its source tags, the rule the tag sections follow.
-- A character a person set in review since (edit_state; '' clears) replaces them, as in the
-- export selection, before curate runs again.
-- Parameters: $top_n. Reads images, image_meta, image_tag_lists, edit_state.
with source_characters as (
    select key, list(distinct tag) as characters
    from (select key, unnest(tags) as tag, unnest(categories) as category from image_tag_lists)
    where category = 'character'
    group by key
),
character_edits as (
    select key, new as character from edit_state where field = 'character' and new is not null
),
image_characters as (
    select i.key,
           case when ce.key is not null then (case when ce.character = '' then []::varchar[] else [ce.character] end)
                when m.key is not null then coalesce(m.characters, []::varchar[])
                else coalesce(s.characters, []::varchar[]) end as characters
    from images i
    left join image_meta m using (key)
    left join source_characters s using (key)
    left join character_edits ce using (key)
),
per_image as (
    select key, unnest(case when len(characters) = 0 then ['(none)'] else characters end) as character
    from image_characters
)
select character, count(distinct key) as images
from per_image
group by character
order by images desc, character
limit $top_n
