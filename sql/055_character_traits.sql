-- character_traits: each character's fixed traits, for the caption lint of character LoRAs: the
-- trait tags (character_trait_tags: hair, eyes, ...) that at least $trait_share of the images
-- naming that character alone carry, over at least $trait_min_images such images.
-- The tags are the source tags and the tagger's tags over $general_threshold, read before
-- curate's optional trait drop (drop_character_traits), which would leave nothing to count.
-- Parameters: $trait_share, $trait_min_images, $general_threshold. Reads image_meta, source_tags,
-- tag_scores, character_trait_tags.
with solo_images as (
    select key, characters[1] as character
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
    select s.key, s.tag
    from source_tags s
    semi join solo_images i on i.key = s.key
    semi join character_trait_tags c on c.tag = s.tag
    union
    select t.key, t.tag
    from tag_scores t
    semi join solo_images i on i.key = t.key
    semi join character_trait_tags c on c.tag = t.tag
    where t.category = 'general' and t.score > $general_threshold and coalesce(t.crop, -1) = -1
),
trait_counts as (
    select i.character, t.tag, count(*) as n
    from trait_tags t
    join solo_images i on i.key = t.key
    group by i.character, t.tag
)
select t.character, t.tag, c.images, (t.n / c.images)::float as share
from trait_counts t
join character_images c on c.character = t.character
where t.n >= $trait_share * c.images
order by t.character, t.tag
