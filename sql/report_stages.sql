-- report_stages: images that reached each stage, in pipeline order (one row per stage).
-- Parameters: $drop_duplicates (export.drop_duplicates); $samples_seen, the input samples ingest's
-- unit markers count (an image, a clip whatever its frames, a dropped member: ingest's own
-- accounting; the tables cannot tell a repeated dropped member from one); $annotated, the images
-- annotate's unit markers say it processed (an image with no detection and no score leaves no row
-- to count here). Reads images,
-- tags, captions, export_duplicates (jobs/export.export_duplicates), export_manifest. Tagged,
-- captioned and the duplicates left out count the images ingested now: rows of a picture gone
-- from the inputs stay until curate and caption run again.
with duplicates_left_out as (
    -- the copies the export leaves out (export_duplicates: the next copy stands in for a
    -- representative it leaves out, removed from its input, excluded, ...); curate's own choice
    -- counted that copy as left out too
    -- ($drop_duplicates, export.drop_duplicates: off, the export writes every copy)
    select count(distinct key) as n from export_duplicates
    where $drop_duplicates and not is_representative and key in (select key from images)
)
select 1 as step, 'samples seen' as stage, $samples_seen::bigint as images
union all
select 2, 'ingested', count(*) from images
union all
select 3, 'annotated', $annotated::bigint
union all
select 4, 'tagged (curated tags)', count(distinct key) from tags where key in (select key from images)
union all
select 5, 'captioned', count(distinct key) from captions
where accepted and key in (select key from images)
union all
select 6, 'after duplicates', (select count(*) from images) - (select n from duplicates_left_out)
union all
select 7, 'exported', count(distinct key) from export_manifest
order by step
