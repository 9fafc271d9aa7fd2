-- export_selection: one row per image to export, with everything its txt and json say.
-- Left out: near duplicates that are not their group's representative ($drop_duplicates) and
-- images whose accepted caption is flagged for review ($drop_flagged).
-- Tags come from the image_tag_lists view (sql/image_tag_lists.sql), as for the captioners.
-- Caption: the accepted attempt. Video frames carry their clip's key (`--where "clip = '...'"`).
-- A person's edits (edit_state, from `booruset review`) win: their caption replaces the accepted
-- one (its scores are then null, not_scored 'edited_by_person', with no quality tags or lint: those
-- were the replaced caption's) and the captions of every origin (KEY.json's captions: the generated
-- ones are what the person corrected, so only theirs, 'edited', is left), their character replaces the curated ones,
-- and an excluded image is left out ($drop_excluded; the review page keeps it, to include again).
-- The user's --where runs afterwards as a filter over a view of this selection (jobs/export.py).
-- Images of an input whose folder or shard is no longer there ($gone_inputs: input ids, the first
-- part of a key) are left out: their files cannot be read (a collection moved to a new path, which
-- ingest takes as a new input, leaves the old one's rows).
-- Parameters: $drop_duplicates, $drop_flagged, $drop_excluded, $gone_inputs. Reads images, image_tag_lists,
-- image_meta, captions, balance, duplicates, errors, edit_state, caption_regions, source_text.
with accepted as (
    select key,
           arg_max(caption, attempt) as caption,
           arg_max(tag_inclusion, attempt) as tag_inclusion,
           arg_max(english_similarity, attempt) as english_similarity,
           arg_max(subject_consistency, attempt) as subject_consistency,
           arg_max(accuracy, attempt) as accuracy,
           arg_max(scored_against, attempt) as scored_against,
           arg_max(not_scored, attempt) as not_scored,
           arg_max(lint, attempt) as lint,
           arg_max(quality_tags, attempt) as quality_tags,
           bool_or(flagged) as flagged
    from captions
    where accepted
    group by key
),
duplicate_groups as (
    select key, min(dup_group) as dup_group, bool_and(is_representative) as is_representative
    from duplicates
    group by key
),
error_counts as (
    select key, count(*) as n_errors from errors where key is not null group by key
),
caption_edits as (
    select key, new as caption from edit_state where field = 'caption' and new is not null
),
character_edits as (
    select key, new as character from edit_state where field = 'character' and new is not null
),
exclude_edits as (
    select key, new = 'true' as excluded from edit_state where field = 'exclude'
),
own_texts as (
    -- the texts that came with the image (a .caption sidecar, a JSON caption, its generation
    -- prompt): KEY.json carries them beside the caption the pipeline wrote
    select key, list({'kind': kind, 'text': text} order by kind, text) as own_texts
    from source_text
    group by key
),
caption_variants as (
    -- the best caption of each origin (the template, the captioning model, the rewriter), for
    -- KEY.json's captions; own captions are in own_texts already
    select key, list({'origin': origin, 'caption': caption} order by origin) as caption_variants
    from (
        select key, caption,
               case when backend like 'template:%' then 'template'
                    when backend like 'rewrite:%' then 'rewrite'
                    else 'model' end as origin,
               accuracy, attempt
        from captions
        where backend <> 'own' and caption <> ''
        qualify row_number() over (partition by key, origin order by accuracy desc nulls last, attempt desc) = 1
    )
    group by key
),
region_captions as (
    -- the 2x2 region captions (caption.regions) as one structured caption
    select key,
           string_agg(region || ': ' || rtrim(caption, '.'), '; '
                      order by list_position(['top left', 'top right', 'bottom left', 'bottom right'], region))
               as region_caption
    from caption_regions
    where caption <> ''
    group by key
)
select i.key,
       i.source,
       i.member,
       i.member_offset,
       i.format,
       i.mode,
       i.width,
       i.height,
       coalesce(i.orientation, 1) as orientation,
       i.bytes,
       i.sha256,
       i.clip,
       i.frame_time,
       coalesce(t.tags, []::varchar[]) as tags,
       coalesce(t.categories, []::varchar[]) as categories,
       coalesce(t.tag_scores, []::float[]) as tag_scores,
       case when ce.key is null then coalesce(m.characters, []::varchar[])
            when ce.character = '' then []::varchar[]
            else [ce.character] end as characters,
       coalesce(m.rating, t.source_rating) as rating,
       m.n_people,
       coalesce(cap.caption, a.caption) as caption,
       cap.key is not null as caption_edited,
       case when cap.key is null then a.tag_inclusion end as tag_inclusion,
       case when cap.key is null then a.english_similarity end as english_similarity,
       case when cap.key is null then a.subject_consistency end as subject_consistency,
       case when cap.key is null then a.accuracy end as accuracy,
       case when cap.key is null then a.scored_against end as scored_against,
       case when cap.key is null then a.not_scored else 'edited_by_person' end as not_scored,
       case when cap.key is null then coalesce(a.lint, []::varchar[]) else []::varchar[] end as lint,
       case when cap.key is null then coalesce(a.quality_tags, []::varchar[]) else []::varchar[] end as quality_tags,
       cap.key is null and coalesce(a.flagged, false) as flagged,
       coalesce(x.excluded, false) as excluded,
       d.dup_group,
       coalesce(e.n_errors, 0) as n_errors,
       rc.region_caption,
       case when cap.key is null then cv.caption_variants
            else [{'origin': 'edited', 'caption': cap.caption}] end as caption_variants,
       o.own_texts,
       coalesce(b.path, '') as "group",
       coalesce(b.multiply, 1.0) as multiply,
       -- a balance an older curate wrote has no repeats: multiply rounded, until curate runs again
       coalesce(b.repeats, greatest(1, round(coalesce(b.multiply, 1.0))))::integer as repeats
from images as i
left join image_tag_lists as t using (key)
left join image_meta as m using (key)
left join accepted as a using (key)
left join balance as b using (key)
left join duplicate_groups as d using (key)
left join error_counts as e using (key)
left join caption_edits as cap using (key)
left join character_edits as ce using (key)
left join exclude_edits as x using (key)
left join region_captions as rc using (key)
left join caption_variants as cv using (key)
left join own_texts as o using (key)
where not ($drop_duplicates and not coalesce(d.is_representative, true))
  and not ($drop_flagged and cap.key is null and coalesce(a.flagged, false))
  and not ($drop_excluded and coalesce(x.excluded, false))
  and not list_contains($gone_inputs::varchar[], split_part(i.key, '/', 1))
order by i.source, i.key
