-- embedding_pairs: image pairs whose whole-image embeddings have cosine similarity
-- >= $embedding_similarity. Only the candidate pairs of the LSH step (embedding_candidates,
-- written by the job: ids that share a bucket in at least one table) are compared.
with candidates as (
    select distinct id_a, id_b from embedding_candidates
)
select va.key as key_a, vb.key as key_b
from candidates c
join embedding_vectors va on va.id = c.id_a
join embedding_vectors vb on vb.id = c.id_b
where array_cosine_similarity(va.vector, vb.vector) >= $embedding_similarity
