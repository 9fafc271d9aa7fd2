-- character_traits: each character's fixed traits, for the caption lint of character LoRAs: the
-- trait tags (character_trait_tags: hair, eyes, ...) that at least $trait_share of the images
-- naming that character alone carry, over at least $trait_min_images such images.
-- The tags are the source tags and the tagger's tags over $general_threshold, read before
-- curate's optional trait drop (drop_character_traits), which would leave nothing to count, and
-- through the aliases as sql/040_tags.sql reads them (`blond_hair` is blonde_hair).
-- Parameters: $trait_share, $trait_min_images, $general_threshold. Reads image_meta, source_tags,
-- tag_scores, tag_aliases, character_trait_tags.
with solo_images as materialized (
    -- integer ids, so that the (image, tag) union and the counts below hash integers, not strings
    select key, characters[1] as character, row_number() over () as image_id
    from image_meta
    where len(characters) = 1
),
character_images as (
    select character, count(*) as images
    from solo_images
    group by character
    having count(*) >= $trait_min_images
),
trait_tags as (
    select i.image_id, c.tag_id
    from source_tags s
    join solo_images i on i.key = s.key
    left join tag_aliases a on a.alias = s.tag
    join character_trait_tags c on c.tag = coalesce(a.tag, s.tag)
    union
    select i.image_id, c.tag_id
    from tag_scores t
    join solo_images i on i.key = t.key
    left join tag_aliases a on a.alias = t.tag
    join character_trait_tags c on c.tag = coalesce(a.tag, t.tag)
    where t.category = 'general' and t.score > $general_threshold and coalesce(t.crop, -1) = -1
),
trait_counts as (
    select i.character, t.tag_id, count(*) as n
    from trait_tags t
    join solo_images i on i.image_id = t.image_id
    group by i.character, t.tag_id
)
select t.character, g.tag, c.images, (t.n / c.images)::float as share
from trait_counts t
join character_images c on c.character = t.character
join character_trait_tags g on g.tag_id = t.tag_id
where t.n >= $trait_share * c.images
order by t.character, g.tag
