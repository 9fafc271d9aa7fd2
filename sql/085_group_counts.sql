-- group_counts: the images of each group path that the balance shares its weight among: those
-- the export keeps (group_members), so a folder of 12 images, 8 of them copies of others, is
-- balanced as the 4 it exports. A folder whose images are all such duplicates has no row: the
-- export writes nothing of it, so it must not take a share from the folders beside it nor set
-- the smallest per-image weight that every multiply is relative to (counted whole, 100 copies
-- in a folder of their own made every exported image's multiply 10 times too large, and one
-- copy alone in a face-size bin halved its character's weight). sql/091_balance gives its
-- images min_multiply, for an export that keeps them (drop_duplicates = false).
-- Parameters: none. Reads group_members.
select path, count(*) as n_images
from group_members
where exported
group by path
