-- exact_pairs: images that are duplicates without a distance: files with the same bytes
-- (reason identical), and flat images (those 060_phash_pairs leaves out) with the same pHash and
-- the same colour signature (reason colour): a red and a blue flat image are not duplicates.
-- Each image is paired with the first key of its group (a star, not all pairs): a million
-- copies of one file make a million edges, not 10^12.
with identical as (
    select key, min(key) over (partition by sha256) as first_key, 'identical' as reason
    from images
    where sha256 is not null
),
flat as (
    select key, min(key) over (partition by phash, colour) as first_key, 'colour' as reason
    from images
    where phash is not null and colour is not null
      and not (coalesce(detail, 255) >= $phash_min_detail and bit_count(phash) between 8 and 56)
),
edges as (
    select * from identical
    union all
    select * from flat
)
select first_key as key_a, key as key_b, reason
from edges
where key <> first_key
