-- cluster_crops: the CCIP embeddings to cluster, each with its block: the sorted character
-- tags of its image ('' when none). Crops are clustered block by block (the job), which keeps
-- clustering affordable at millions of crops: pairwise differences stay inside a block.
-- Person crops when the image has any, else the whole-image embedding; of images that are
-- there (image_meta, from images: annotate's rows of a file an ingest removed stay until the next
-- annotate).
-- The vectors only stream through here: both joins build their hash tables on keys (the job
-- runs this with the joins as written, udfs/curate/work_database.joins_as_written). A `not
-- exists` over embeddings made DuckDB keep every row, vectors included, for its delim join: Out
-- of Memory once they outgrew memory_limit (150,000 images at 256MB).
with images_with_person_crops as (
    select distinct key
    from embeddings
    where crop >= 0 and ($cluster_model = '' or model = $cluster_model)
)
select e.key, e.crop, coalesce(array_to_string(m.characters, '+'), '') as block,
       coalesce(m.n_characters, 0) as block_characters,
       e.vector::float[768] as vector  -- Parquet gives a list; CCIP vectors are 768 floats
from embeddings e
join image_meta m on m.key = e.key
left join images_with_person_crops p on p.key = e.key
where ($cluster_model = '' or e.model = $cluster_model)
  and (e.crop >= 0 or p.key is null)
-- not ordered here: udfs/curate/ccip_cluster.cluster_blocks reads the rows in the order it needs,
-- as a table's scan does not keep the order it was written in
