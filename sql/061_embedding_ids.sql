-- embedding_ids: a dense integer id (0..n-1, in key order) for each image with a whole-image
-- embedding, and the model it is taken from. The LSH step (udfs/curate/near_duplicates.py) pairs
-- ids, not keys. Empty when embedding duplicates are off ($embedding_similarity = 0).
with whole_image as (
    -- with $embedding_model '' and two models for one image, the first model by name
    -- of images that are there: annotate's rows of a file an ingest removed stay until the
    -- next annotate, and a curate in between paired them
    select key, min(model) as model
    from embeddings
    semi join images using (key)
    where $embedding_similarity > 0 and crop = -1 and ($embedding_model = '' or model = $embedding_model)
    group by key
)
select (row_number() over (order by key) - 1)::bigint as id, key, model
from whole_image
