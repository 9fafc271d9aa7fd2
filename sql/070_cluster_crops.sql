-- cluster_crops: the CCIP embeddings to cluster, each with its block: the sorted character
-- tags of its image ('' when none). Crops are clustered block by block (the job), which keeps
-- clustering affordable at millions of crops: pairwise differences stay inside a block.
-- Person crops when the image has any, else the whole-image embedding; of images that are
-- there (image_meta, from images: annotate's rows of a file an ingest removed stay until the next
-- annotate).
-- The vectors only stream through here: the joins build their hash tables on keys (the job
-- runs this with the joins as written, udfs/curate/work_database.joins_as_written). A `not
-- exists` over embeddings made DuckDB keep every row, vectors included, for its delim join: Out
-- of Memory once they outgrew memory_limit (150,000 images at 256MB).
-- One model per image: with $cluster_model '' and two models for one image, the first model by
-- name (as sql/061_embedding_ids): each crop was there once per model, and clustered as many times.
with image_models as (
    select key, min(model) as model
    from embeddings
    where $cluster_model = '' or model = $cluster_model
    group by key
),
images_with_person_crops as (
    select distinct e.key
    from embeddings e
    join image_models i on i.key = e.key and i.model = e.model
    where e.crop >= 0
)
select e.key, e.crop, coalesce(array_to_string(m.characters, '+'), '') as block,
       coalesce(m.n_characters, 0) as block_characters,
       e.vector::float[768] as vector  -- Parquet gives a list; CCIP vectors are 768 floats
from embeddings e
join image_models i on i.key = e.key and i.model = e.model
join image_meta m on m.key = e.key
left join images_with_person_crops p on p.key = e.key
where e.crop >= 0 or p.key is null
-- not ordered here: udfs/curate/ccip_cluster.cluster_blocks reads the rows in the order it needs,
-- as a table's scan does not keep the order it was written in
