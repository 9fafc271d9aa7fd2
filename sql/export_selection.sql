-- export_selection: one row per image to export, with everything its txt and json say.
-- Left out: near duplicates that are not their group's representative ($drop_duplicates) and
-- images whose accepted caption is flagged for review ($drop_flagged).
-- Tags come from the image_tag_lists view (sql/image_tag_lists.sql), as for the captioners.
-- Caption: the accepted attempt. Video frames carry their clip's key (`--where "clip = '...'"`).
-- The user's --where runs afterwards as a filter over a view of this selection (jobs/export.py).
-- Parameters: $drop_duplicates, $drop_flagged. Reads images, image_tag_lists, image_meta,
-- captions, balance, duplicates.
with accepted as (
    select key,
           arg_max(caption, attempt) as caption,
           arg_max(tag_inclusion, attempt) as tag_inclusion,
           arg_max(english_similarity, attempt) as english_similarity,
           arg_max(subject_consistency, attempt) as subject_consistency,
           arg_max(accuracy, attempt) as accuracy,
           arg_max(quality_tags, attempt) as quality_tags,
           bool_or(flagged) as flagged
    from captions
    where accepted
    group by key
),
dropped_duplicates as (
    select distinct key from duplicates where not is_representative
)
select i.key,
       i.source,
       i.member,
       i.format,
       i.width,
       i.height,
       coalesce(i.orientation, 1) as orientation,
       i.bytes,
       i.clip,
       i.frame_time,
       coalesce(t.tags, []::varchar[]) as tags,
       coalesce(t.categories, []::varchar[]) as categories,
       coalesce(t.tag_scores, []::float[]) as tag_scores,
       coalesce(m.characters, []::varchar[]) as characters,
       coalesce(m.rating, t.source_rating) as rating,
       m.n_people,
       a.caption,
       a.tag_inclusion,
       a.english_similarity,
       a.subject_consistency,
       a.accuracy,
       coalesce(a.quality_tags, []::varchar[]) as quality_tags,
       coalesce(a.flagged, false) as flagged,
       coalesce(b.path, '') as "group",
       coalesce(b.multiply, 1.0) as multiply
from images as i
left join image_tag_lists as t using (key)
left join image_meta as m using (key)
left join accepted as a using (key)
left join balance as b using (key)
where not ($drop_duplicates and i.key in (select key from dropped_duplicates))
  and not ($drop_flagged and coalesce(a.flagged, false))
order by i.source, i.key
