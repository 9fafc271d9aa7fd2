-- edited_tags: the curated `tags` with a person's tag edits applied (edit_state, from
-- `booruset review`): a removed tag is dropped; an added one comes after the image's other tags
-- (score 1.0, its category from tag_vocabulary, else general). Curate runs this only when the
-- workspace has tag edits, and then puts it in place of `tags` (jobs/curate.py), so image_meta,
-- groups and balance see the edits. An image with no curated tags keeps none here: its source
-- tags stand in for them (sql/image_tag_lists.sql), and that view applies its edits.
-- Parameters: none. Reads tags, edit_state, tag_vocabulary.
with tag_edits as (
    select key, subject as tag, new is not null as present
    from edit_state
    where field = 'tags'
),
kept as (
    select t.*
    from tags as t
    anti join (select key, tag from tag_edits where not present) as r using (key, tag)
),
last_ranks as (
    select key, max(rank) as last_rank from tags group by key
),
added as (
    select e.key, e.tag, coalesce(v.category, 'general') as category, 1.0::float as score,
           (m.last_rank + row_number() over (partition by e.key order by e.tag))::integer as rank
    from tag_edits as e
    join last_ranks as m using (key)
    left join tag_vocabulary as v using (tag)
    where e.present
      and not exists (select 1 from tags as t where t.key = e.key and t.tag = e.tag)
)
select * from kept
union all
select * from added
