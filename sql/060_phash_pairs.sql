-- phash_pairs: image pairs whose perceptual hashes differ in at most $phash_distance bits,
-- without an all-pairs join (multi-index hashing): the 64-bit hash is cut into $bands bands of
-- $band_bits bits; two hashes within distance k have at least one band within distance
-- $radius = floor(k / bands) (pigeonhole). Each image probes, per band, its band value with
-- every flip of at most $radius bits against the exact band values of the others; only
-- those candidates get the full 64-bit comparison. The job picks bands so that radius <= 2.
-- Only hashes with structure take part: a flat or near-flat image (detail below
-- $phash_min_detail, or a hash with almost all bits equal, as smooth gradients give) has a pHash
-- that says nothing about its content; such images are compared in 062_exact_pairs instead.
with band_values as materialized (
    select key, phash, band,
           (phash >> (band * $band_bits)::ubigint)
             & (case when (band + 1) * $band_bits >= 64 then 18446744073709551615::ubigint
                     else (1::ubigint << $band_bits::ubigint) - 1::ubigint end) as band_value
    from (select key, phash, unnest(range(0, $bands)) as band from images
          where phash is not null
            and coalesce(detail, 255) >= $phash_min_detail  -- null: ingested before detail was measured
            and bit_count(phash) between 8 and 56)
),
flips as (
    select 0::ubigint as mask
    union all
    select 1::ubigint << i::ubigint from range(0, $band_bits) a(i) where $radius >= 1
    union all
    select (1::ubigint << i::ubigint) | (1::ubigint << j::ubigint)
    from range(0, $band_bits) a(i), range(0, $band_bits) b(j)
    where $radius >= 2 and i < j
),
probes as (
    select v.key, v.phash, v.band, xor(v.band_value, f.mask) as band_value
    from band_values v, flips f
)
select distinct p.key as key_a, v.key as key_b
from probes p
join band_values v on v.band = p.band and v.band_value = p.band_value and p.key < v.key
where bit_count(xor(p.phash, v.phash)) <= $phash_distance
