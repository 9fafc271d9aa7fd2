-- group_counts: the images of each group path that the balance shares its weight among: those
-- the export keeps (group_members), so a folder of 12 images, 8 of them copies of others, is
-- balanced as the 4 it exports. A folder whose images are all such duplicates counts them all,
-- so that it still gets a multiply (for exports that keep them).
-- Parameters: none. Reads group_members.
select path, coalesce(nullif(count(*) filter (where exported), 0), count(*)) as n_images
from group_members
group by path
