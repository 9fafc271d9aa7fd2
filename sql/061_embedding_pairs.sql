-- embedding_pairs: image pairs whose whole-image embeddings have cosine similarity
-- >= curate.embedding_similarity: the pairs udfs/curate/near_duplicates.py found among the LSH
-- candidates (similar_embeddings, written by the job as ids), as keys.
select a.key as key_a, b.key as key_b
from similar_embeddings s
join embedding_ids a on a.id = s.id_a
join embedding_ids b on b.id = s.id_b
