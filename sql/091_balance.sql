-- balance: every image with its group path, per-image weight, folder probability, multiply and
-- whole repeats (kohya's <repeats>_ folders, materialised copies).
-- An image's repeats are floor(multiply), plus one for the first round(n_images x multiply's
-- fraction) images of its group in md5(key) order, the images the export keeps first: a
-- group's repeats add up to its multiply times its images (1.6 over 5 images: 8, where a coin
-- per image gave 5 to 10), and an image keeps its repeats while its group does. At least 1:
-- only EveryDream's multiply.txt and KEY.json weigh an image less.
-- A folder of near duplicates the export leaves out alone (no group_counts row) has no share of
-- the balance (weight and probability 0) and its images min_multiply.
-- Parameters: $min_multiply. Reads group_members, group_counts, balance_folders.
with ranked as (
    select key, path,
           row_number() over (partition by path order by not exported, md5(key), key) as place,
           count(*) over (partition by path) as members
    from group_members
),
shares as (
    select r.key, r.path, r.place, coalesce(c.n_images, r.members) as n_images,
           coalesce(f.image_weight, 0) as weight, coalesce(f.probability, 0) as probability,
           coalesce(f.multiply, $min_multiply) as multiply
    from ranked r
    left join balance_folders f on f.path = r.path
    left join group_counts c on c.path = r.path
)
select key, path, weight, probability, multiply,
       greatest(1, floor(multiply)::integer
                   + (place <= round(n_images * (multiply - floor(multiply))))::integer) as repeats
from shares
