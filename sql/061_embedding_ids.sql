-- embedding_ids: a dense integer id (0..n-1, in key order) for each image with a whole-image
-- embedding, and the model it is taken from. The LSH step (udfs/curate/near_duplicates.py) pairs
-- ids, not keys. Empty when embedding duplicates are off ($embedding_similarity = 0).
with whole_image as (
    -- with $embedding_model '' and two models for one image, the first model by name
    select key, min(model) as model
    from embeddings
    where $embedding_similarity > 0 and crop = -1 and ($embedding_model = '' or model = $embedding_model)
    group by key
)
select (row_number() over (order by key) - 1)::bigint as id, key, model
from whole_image
