-- reference_matches: few-shot classification of every crop against reference embeddings as a
-- join on embedding distance: the character whose references have the smallest mean difference
-- (1 - cosine similarity), kept when that mean is <= $ccip_threshold.
-- character_references holds one row per character (udfs/curate/ccip_cluster.reference_means):
-- the mean of its unit reference vectors as a length and a unit direction, so that the mean
-- difference is 1 - length * cosine(crop, direction): one product per crop and character, not
-- one per crop and reference.
with differences as (
    select c.key, c.crop, r.character,
           1 - r.length * array_cosine_similarity(c.vector, r.direction::float[768]) as difference
    from cluster_crops c
    cross join character_references r
)
select key, crop, arg_min(character, {'difference': difference, 'character': character}) as character, min(difference) as difference
from differences
group by key, crop
having min(difference) <= $ccip_threshold
