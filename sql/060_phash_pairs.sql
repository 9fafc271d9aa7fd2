-- phash_pairs: image pairs whose perceptual hashes differ in at most $phash_distance bits.
-- Pigeonhole blocking: the 64-bit hash is cut into $bands = distance + 1 bands; two hashes
-- within the distance agree exactly on at least one band, so only images sharing a band value
-- are compared (no all-pairs join).
with bands as (
    select key, phash, unnest(range(0, $bands)) as band
    from images
    where phash is not null
),
band_values as (
    select key, phash, band,
           (phash >> (band * (64 // $bands))::ubigint)
             & (case when band = $bands - 1 then 18446744073709551615::ubigint >> ((band * (64 // $bands)))::ubigint
                     else ((1::ubigint << (64 // $bands)::ubigint) - 1::ubigint) end) as band_value
    from bands
)
select distinct a.key as key_a, b.key as key_b
from band_values a
join band_values b on b.band = a.band and b.band_value = a.band_value and a.key < b.key
where bit_count(xor(a.phash, b.phash)) <= $phash_distance
