-- embedding_pairs: image pairs whose whole-image embeddings have cosine similarity
-- >= $embedding_similarity. Blocking: only images that share a random-hyperplane LSH bucket
-- (embedding_buckets, computed by the job) in at least one table are compared.
with candidates as (
    select distinct a.key as key_a, b.key as key_b
    from embedding_buckets a
    join embedding_buckets b on b.lsh_table = a.lsh_table and b.bucket = a.bucket and a.key < b.key
),
vectors as (
    select key, any_value(vector)::float[768] as vector  -- Parquet gives a list; CCIP vectors are 768 floats
    from embeddings
    where crop = -1 and ($embedding_model = '' or model = $embedding_model)
    group by key
)
select c.key_a, c.key_b
from candidates c
join vectors va on va.key = c.key_a
join vectors vb on vb.key = c.key_b
where array_cosine_similarity(va.vector, vb.vector) >= $embedding_similarity
