-- report_people: the images by number of people (image_meta.n_people; "unknown": none known, or
-- an image curate has not seen yet), each image of the images table once: read from image_meta
-- alone, images ingested since curate ran were left out and images gone from the inputs counted.
-- Parameters: none. Reads images, image_meta.
select coalesce(cast(m.n_people as varchar), 'unknown') as n_people, count(*) as images
from images i
left join image_meta m using (key)
group by m.n_people
order by m.n_people nulls last
