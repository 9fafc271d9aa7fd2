-- embedding_vectors: the whole-image vector of each embedding_ids id, in storage order. Not a
-- table: udfs/curate/near_duplicates.py streams it once. DuckDB cannot spill a sort, aggregate
-- or hash table whose rows carry 768-float vectors (Out of Memory once they outgrow
-- memory_limit), so the vectors are only streamed through a join whose hash table holds the ids.
select i.id, e.vector
from embeddings e
join embedding_ids i on i.key = e.key and i.model = e.model
where e.crop = -1
