-- balance: every image with its group path, per-image weight, folder probability, multiply and
-- whole repeats (kohya's <repeats>_ folders, materialised copies).
-- An image's repeats are floor(multiply), plus one for the first round(n_images x multiply's
-- fraction) images of its group in md5(key) order, the images the export keeps first: a
-- group's repeats add up to its multiply times its images (1.6 over 5 images: 8, where a coin
-- per image gave 5 to 10), and an image keeps its repeats while its group does. At least 1:
-- only EveryDream's multiply.txt and KEY.json weigh an image less.
-- Parameters: none. Reads group_members, group_counts, balance_folders.
with ranked as (
    select key, path,
           row_number() over (partition by path order by not exported, md5(key), key) as place
    from group_members
)
select r.key, r.path, f.image_weight as weight, f.probability, f.multiply,
       greatest(1, floor(f.multiply)::integer
                   + (r.place <= round(c.n_images * (f.multiply - floor(f.multiply))))::integer) as repeats
from ranked r
join balance_folders f on f.path = r.path
join group_counts c on c.path = r.path
