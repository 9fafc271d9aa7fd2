-- caption_inputs: one row per image with what the captioners read, and the independent evidence
-- a caption is scored against.
-- Tags come from the image_tag_lists view (sql/image_tag_lists.sql). Rating: image_meta, else
-- a source rating tag.
-- Evidence (README, "Honest caption scores"): when the tagger ran on the image,
-- its own tags over curate's thresholds (not the source tags), those it scored over half a
-- threshold but not over it (tagger_near), and the person detections.
-- Parameters (DuckDB variables, set by the job before the view is read, since a view takes no
-- prepared parameters): general_threshold, character_threshold, person_label, person_threshold,
-- caption_regions, own_captions, caption_images.
-- Reads images, image_tag_lists, image_meta, source_text, tag_scores, detections, character_traits,
-- person_tags.
-- regions: with annotate.tagger.regions, the tagger's tags of each 2x2 region (caption.regions).
with texts as (
    select key,
           list(text order by kind, text) as texts,
           -- the captions the image came with (a .caption sidecar, a JSON caption; not prompts):
           -- scored as candidates (caption.own_captions)
           list(distinct text order by text) filter (where kind = 'caption') as own_captions
    from source_text
    where kind in ('caption', 'sd_prompt', 'nai_comment')
    group by key
),
tagger_scores as (
    -- the tagger's scores of the whole image (crop -1) and of its 2x2 regions (crop -2..-5), each
    -- kept when strictly above curate's threshold for its category, as sql/040_tags.sql keeps them
    -- near: not kept, but over half the threshold (not "well below" it: a caption saying it is
    -- neither right nor wrong; the tagger scored every other tag under half its threshold)
    select key, coalesce(crop, -1) as crop, tag, category, score,
           (category = 'general' and score > getvariable('general_threshold'))
           or (category = 'character' and score > getvariable('character_threshold')) as kept,
           (category = 'general' and score > getvariable('general_threshold') / 2)
           or (category = 'character' and score > getvariable('character_threshold') / 2) as over_half
    from tag_scores
    where coalesce(crop, -1) < 0
),
tagger_tags as (
    select key,
           list(tag order by score desc, tag) filter (where kept) as tags,
           list(category order by score desc, tag) filter (where kept) as categories,
           list(tag order by score desc, tag) filter (where over_half and not kept) as near
    from tagger_scores
    where crop = -1
    group by key
),
image_traits as (
    -- the fixed traits of the one character an image names (caption lint, character_traits)
    select m.key, list(c.tag order by c.tag) as traits
    from image_meta m
    join character_traits c on c.character = m.characters[1]
    where len(m.characters) = 1
    group by m.key
),
region_tags as (
    -- the tagger's tags of each 2x2 region (annotate.tagger.regions)
    select key, crop,
           list(tag order by score desc, tag) filter (where kept) as tags,
           list(category order by score desc, tag) filter (where kept) as categories
    from tagger_scores
    where crop <= -2
    group by key, crop
),
image_regions as (
    select key,
           list({'region': case crop when -2 then 'top left' when -3 then 'top right' when -4 then 'bottom left'
                                else 'bottom right' end,
                 'tags': coalesce(tags, []::varchar[]), 'categories': coalesce(categories, []::varchar[])}
                order by crop desc) as regions
    from region_tags
    group by key
),
image_persons as (
    -- each person's own tags and place (curate's person_tags), left to right
    select key, list({'position': position, 'quadrant': quadrant, 'tags': tags, 'categories': categories}
                     order by x0, person) as persons
    from person_tags
    group by key
),
text_tagged as (
    -- images whose every source tag caption.tags_from_text took from their own text (origin
    -- caption): their curated tags say what their own caption says, no evidence for it
    select key
    from source_tags
    group by key
    having bool_and(origin = 'caption')
),
people_detected as (
    select key, count(*)::integer as n_people_detected
    from detections
    where label = getvariable('person_label') and score >= getvariable('person_threshold')
    group by key
)
select i.key,
       i.source,
       i.member,
       i.member_offset,
       -- the member's size at ingest: a member of another size is a picture nobody ingested (the
       -- shard or file was rewritten since), read as not found as export reads it
       i.bytes,
       -- the picture's digest, only where the captioner is shown the picture (caption_images): a
       -- picture replaced under the same tags makes a new unit (its VLM caption described the old
       -- one); a caption made from the tags alone is kept, as are template units on upgrade
       case when getvariable('caption_images') then i.sha256 end as sha256,
       coalesce(t.tags, []::varchar[]) as tags,
       coalesce(t.categories, []::varchar[]) as categories,
       m.n_people,
       coalesce(m.characters, []::varchar[]) as characters,
       coalesce(m.rating, t.source_rating) as rating,
       coalesce(x.texts, []::varchar[]) as texts,
       -- null unless read (caption.own_captions = "score") and there are some: sql/caption_units.sql
       case when getvariable('own_captions') then x.own_captions end as own_captions,
       g.key is not null as tagger_ran,
       y.key is not null as tags_from_text,
       coalesce(g.tags, []::varchar[]) as tagger_tags,
       coalesce(g.categories, []::varchar[]) as tagger_categories,
       coalesce(g.near, []::varchar[]) as tagger_near,
       d.n_people_detected,
       coalesce(r.traits, []::varchar[]) as traits,
       p.persons,
       -- only when asked for (caption.regions): a unit's id hashes its rows, so the region tags
       -- must not make new units (and new VLM captions) when nothing reads them
       case when getvariable('caption_regions') then g2.regions end as regions
from images as i
left join image_tag_lists as t using (key)
left join image_meta as m using (key)
left join texts as x using (key)
left join tagger_tags as g using (key)
left join text_tagged as y using (key)
left join people_detected as d using (key)
left join image_traits as r using (key)
left join image_persons as p using (key)
left join image_regions as g2 using (key)
order by i.key
