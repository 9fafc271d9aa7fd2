-- review_cluster_neighbours: for the image page, other members of one character cluster, nearest
-- first: the highest cosine similarity between any of the image's CCIP vectors in the cluster
-- and any of theirs. Only the first $candidates members in key order are compared, so a page
-- stays quick on a cluster of a hundred thousand crops (then "nearest" means among those).
-- Each with its sha256, which its thumbnail's URL carries (a replaced picture, a new URL).
-- Parameters: $key, $cluster, $model ('' = any), $candidates, $n. Reads clusters, embeddings, images.
with mine as (
    select e.vector
    from clusters as c
    join embeddings as e on e.key = c.key and e.crop = c.crop
    where c.key = $key and c.cluster = $cluster and ($model = '' or e.model = $model)
),
candidates as (
    select distinct key from clusters
    where cluster = $cluster and key <> $key
    order by key
    limit $candidates
),
theirs as (
    select c.key, e.vector
    from clusters as c
    semi join candidates as k using (key)
    join embeddings as e on e.key = c.key and e.crop = c.crop
    where c.cluster = $cluster and ($model = '' or e.model = $model)
),
neighbours as (
    select t.key, max(list_cosine_similarity(t.vector::float[], m.vector::float[])) as similarity
    from theirs as t, mine as m
    group by t.key
    union all
    -- members without a vector (none compared): after the others
    select k.key, null as similarity
    from candidates as k
    where k.key not in (select key from theirs)
    order by similarity desc nulls last, key
    limit $n
)
select n.key, n.similarity, i.sha256
from neighbours as n
left join images as i using (key)
order by n.similarity desc nulls last, n.key
