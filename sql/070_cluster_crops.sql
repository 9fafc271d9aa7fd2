-- cluster_crops: the CCIP embeddings to cluster, each with its block: the sorted character
-- tags of its image ('' when none). Crops are clustered block by block (the job), which keeps
-- clustering affordable at millions of crops: pairwise differences stay inside a block.
-- Person crops when the image has any, else the whole-image embedding.
with chosen as (
    select e.key, e.crop, e.vector::float[768] as vector  -- Parquet gives a list; CCIP vectors are 768 floats
    from embeddings e
    where ($cluster_model = '' or e.model = $cluster_model)
      and (e.crop >= 0 or not exists (
          select 1 from embeddings p where p.key = e.key and p.crop >= 0 and ($cluster_model = '' or p.model = $cluster_model)))
)
select c.key, c.crop, coalesce(array_to_string(m.characters, '+'), '') as block,
       coalesce(m.n_characters, 0) as block_characters, c.vector
from chosen c
left join image_meta m on m.key = c.key
-- not ordered here: udfs/curate/ccip_cluster.cluster_blocks reads the rows in the order it needs,
-- as a table's scan does not keep the order it was written in
