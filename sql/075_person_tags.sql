-- person_tags: one row per person the tagger saw on its own (a person detection whose crop it
-- scored, annotate.tagger.person_crops): the box, position words and the person's own tags.
-- Each curated general tag of the image goes to every person whose crop scores it over
-- $general_threshold; a tag no crop scores stays with the image (the scene). A character tag
-- goes to one crop: the crop CCIP clustered as that character (clusters; of several, the one
-- that scores it highest), else to the crop that scores it highest. position: left / centre /
-- right by the box centre's thirds; quadrant: top left, top right, bottom left, bottom right by
-- its halves.
-- Parameters: $general_threshold, $person_label, $person_threshold. Reads detections,
-- tag_scores, tags, clusters.
with tagged_crops as (
    select distinct key, crop from tag_scores where crop >= 0
),
persons as (
    select d.key, d.index as person, d.x0, d.y0, d.x1, d.y1, (d.x0 + d.x1) / 2 as cx, (d.y0 + d.y1) / 2 as cy
    from detections d
    join tagged_crops c on c.key = d.key and c.crop = d.index
    where d.label = $person_label and d.score >= $person_threshold
),
crop_scores as (
    select t.key, t.crop as person, t.tag, t.score
    from tag_scores t
    semi join persons p on p.key = t.key and p.person = t.crop
    where t.crop >= 0
),
image_tags as (
    select t.key, t.tag, t.category, t.rank
    from tags t
    semi join persons p on p.key = t.key
    where t.category in ('general', 'character')
),
general_tags as (
    select i.key, c.person, i.tag, i.category, i.rank
    from image_tags i
    join crop_scores c on c.key = i.key and c.tag = i.tag
    where i.category = 'general' and c.score > $general_threshold
),
characters_by_cluster as (
    -- one person per character tag: a block of images tagged with one character gives that
    -- character to every real cluster in it (sql/072_clusters.sql), a companion the tags do not
    -- name included, so two crops of an image can be clustered as it; the one that scores the
    -- tag highest takes it (then the first person), as in characters_by_score
    select i.key, arg_max(c.crop, {'score': coalesce(s.score, 0), 'first': -c.crop}) as person, i.tag, i.category,
           any_value(i.rank) as rank
    from image_tags i
    join clusters c on c.key = i.key and c.character = i.tag and c.crop >= 0
    semi join persons p on p.key = c.key and p.person = c.crop
    left join crop_scores s on s.key = c.key and s.person = c.crop and s.tag = i.tag
    where i.category = 'character'
    group by i.key, i.tag, i.category
),
characters_by_score as (
    select i.key, arg_max(c.person, {'score': c.score, 'first': -c.person}) as person, i.tag, i.category, any_value(i.rank) as rank
    from image_tags i
    join crop_scores c on c.key = i.key and c.tag = i.tag
    anti join characters_by_cluster b on b.key = i.key and b.tag = i.tag
    where i.category = 'character'
    group by i.key, i.tag, i.category
),
assigned as (
    select * from general_tags
    union all
    select * from characters_by_cluster
    union all
    select * from characters_by_score
)
select p.key,
       p.person::integer as person,
       p.x0::float as x0, p.y0::float as y0, p.x1::float as x1, p.y1::float as y1,
       case when p.cx < 1 / 3 then 'left' when p.cx > 2 / 3 then 'right' else 'centre' end as position,
       (case when p.cy < 0.5 then 'top ' else 'bottom ' end) || (case when p.cx < 0.5 then 'left' else 'right' end)
           as quadrant,
       coalesce(list(a.tag order by a.rank) filter (where a.tag is not null), []::varchar[]) as tags,
       coalesce(list(a.category order by a.rank) filter (where a.tag is not null), []::varchar[]) as categories
from persons p
left join assigned a on a.key = p.key and a.person = p.person
group by all
order by key, x0, person
