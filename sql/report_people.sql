-- report_people: images by number of people (image_meta.n_people; null: unknown).
-- Parameters: none. Reads image_meta.
select coalesce(cast(n_people as varchar), 'unknown') as n_people, count(*) as images
from image_meta
group by n_people
order by n_people nulls last
