-- exact_pairs: files with the same bytes (reason identical): duplicates without a distance,
-- whatever their pHash. (Flat images of one colour signature pair in 060_phash_pairs.)
-- Each image is paired with the first key of its group (a star, not all pairs): a million
-- copies of one file make a million edges, not 10^12.
with identical as (
    select key, min(key) over (partition by sha256) as first_key, 'identical' as reason
    from images
    where sha256 is not null
)
select first_key as key_a, key as key_b, reason
from identical
where key <> first_key
