-- embedding_vectors: one whole-image embedding per image with a dense integer id (0..n-1), the
-- input of the LSH step (udfs/curate/near_duplicates.py), which pairs ids, not keys. Empty when
-- embedding duplicates are off ($embedding_similarity = 0).
with whole_image as (
    select key, any_value(vector)::float[768] as vector  -- Parquet gives a list; CCIP vectors are 768 floats
    from embeddings
    where $embedding_similarity > 0 and crop = -1 and ($embedding_model = '' or model = $embedding_model)
    group by key
)
select (row_number() over (order by key) - 1)::bigint as id, key, vector
from whole_image
