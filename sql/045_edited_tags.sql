-- edited_tags: the curated `tags` with a person's tag edits applied (edit_state, from
-- `booruset review`): a removed tag is dropped; an added one comes after the image's other tags
-- (score 1.0, its category from tag_vocabulary, else general). Curate runs this only when the
-- workspace has tag edits, and then puts it in place of `tags` (jobs/curate.py), so image_meta,
-- groups and balance see the edits. An image with no curated tags keeps none here: its source
-- tags stand in for them until curate has seen it (sql/image_tag_lists.sql), and that view applies its edits.
-- A character a person set replaces the image's character tags (set to '': it has none), so that
-- KEY.txt, the caption and KEY.json name the same character.
-- Parameters: none. Reads tags, edit_state, tag_vocabulary.
with tag_edits as (
    select key, subject as tag, new is not null as present, coalesce(v.category, 'general') as category
    from edit_state
    left join tag_vocabulary as v on v.tag = edit_state.subject
    where field = 'tags'
    union all
    select key, new as tag, true as present, 'character' as category
    from edit_state
    where field = 'character' and new is not null and new <> ''
),
character_edits as (
    select key, new as tag from edit_state where field = 'character' and new is not null
),
kept as (
    -- less the removed tags, the character tags a set character replaces, and the set
    -- character's own tag when the image has it in another category (a plain .txt's `eileen`):
    -- it comes back from `added` as the character
    select t.*
    from tags as t
    anti join (select key, tag from tag_edits where not present) as r using (key, tag)
    where not exists (select 1 from character_edits as c
                      where c.key = t.key
                        and (t.category = 'character' and c.tag <> t.tag or t.category <> 'character' and c.tag = t.tag))
),
ranks as (
    select key, min(rank) as first_rank, max(rank) as last_rank from tags group by key
),
added as (
    -- an added tag after the image's others; a character set in review first (where kohya's
    -- keep_tokens and the token budget keep it, as the character tags it replaces were)
    select e.key, e.tag, e.category, 1.0::float as score,
           (case when e.category = 'character' then m.first_rank - 1
                 else m.last_rank + row_number() over (partition by e.key order by e.tag) end)::integer as rank
    from (select key, tag, min(category) as category from tag_edits where present group by key, tag) as e
    join ranks as m using (key)
    where not exists (select 1 from kept as t where t.key = e.key and t.tag = e.tag)
)
select * from kept
union all
select * from added
