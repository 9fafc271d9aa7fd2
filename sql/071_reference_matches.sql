-- reference_matches: few-shot classification of every crop against reference embeddings
-- (character_references: character, vector) as a join on embedding distance: the character
-- whose references have the smallest mean difference (1 - cosine similarity), kept when that
-- mean is <= $ccip_threshold.
with differences as (
    select c.key, c.crop, r.character, avg(1 - array_cosine_similarity(c.vector, r.vector)) as difference
    from cluster_crops c
    cross join (select character, vector::float[768] as vector from character_references) r
    group by c.key, c.crop, r.character
)
select key, crop, arg_min(character, {'difference': difference, 'character': character}) as character, min(difference) as difference
from differences
group by key, crop
having min(difference) <= $ccip_threshold
