-- phash_pairs: image pairs whose perceptual hashes differ in at most $phash_distance bits,
-- without an all-pairs join (multi-index hashing): the 64-bit hash is cut into $bands bands of
-- $band_bits bits; two hashes within distance k have at least one band within distance
-- $radius = floor(k / bands) (pigeonhole). Each hash probes, per band, its band value with
-- every flip of at most $radius bits against the exact band values of the others; only
-- those candidates get the full 64-bit comparison. The job picks bands so that radius <= 2.
-- A flat or near-flat image (detail below $phash_min_detail, or a hash with almost all bits
-- equal, as smooth gradients give) has a pHash that says little of its content: a red and a blue
-- flat image have one hash. Such images pair only with flat images of their colour signature
-- (reason colour; the others reason phash): the colour is part of the join key, so flat
-- pictures of other colours never meet. (They paired only with the very same pHash before: a
-- faint sketch on white and its half-size JPEG, 2 to 4 bits apart, were not duplicates.)
-- The pairs are edges for the connected components of the duplicate groups, not every pair:
-- the images of one hash are each paired with its first key (a star), and two hashes within the
-- distance by their first keys. Thousands of copies of one picture (re-encoded, or the same
-- file) made every pair of them: 4,000 copies were 8M pairs, two minutes and 2.5 GB.
with classed as (
    select key, phash, colour,
           coalesce(detail, 255) >= $phash_min_detail  -- null: ingested before detail was measured
             and bit_count(phash) between 8 and 56 as detailed
    from images
    where phash is not null
),
hashed as materialized (
    -- bucket: -1 for a detailed image, its colour signature for a flat one
    select key, phash, case when detailed then -1 else colour::hugeint end as bucket
    from classed
    where detailed or colour is not null
),
hashes as materialized (
    -- integer ids, so that the ~70M probes (1M images) carry no key strings
    select row_number() over () as id, phash, bucket, first_key
    from (select phash, bucket, min(key) as first_key from hashed group by phash, bucket)
),
band_values as materialized (
    -- the band number in the high bits: one integer join key (band_bits <= 22, as bands >= 3)
    select id, phash, bucket,
           (band::ubigint << 32::ubigint) | ((phash >> (band * $band_bits)::ubigint)
             & (case when (band + 1) * $band_bits >= 64 then 18446744073709551615::ubigint
                     else (1::ubigint << $band_bits::ubigint) - 1::ubigint end)) as band_value
    from (select id, phash, bucket, unnest(range(0, $bands)) as band from hashes)
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
    select v.id, v.phash, v.bucket, xor(v.band_value, f.mask) as band_value
    from band_values v, flips f
),
id_pairs as (
    -- ids are not in key order: each pair is found from both sides, and ordered by key below
    select distinct p.id as id_a, v.id as id_b
    from probes p
    join band_values v on v.band_value = p.band_value and v.bucket = p.bucket
    where bit_count(xor(p.phash, v.phash)) <= $phash_distance and p.id <> v.id
),
near_hashes as (
    select distinct least(a.first_key, b.first_key) as key_a, greatest(a.first_key, b.first_key) as key_b,
           case when a.bucket = -1 then 'phash' else 'colour' end as reason
    from id_pairs p
    join hashes a on a.id = p.id_a
    join hashes b on b.id = p.id_b
),
same_hash as (
    select h.first_key as key_a, i.key as key_b, case when h.bucket = -1 then 'phash' else 'colour' end as reason
    from hashed i
    join hashes h on h.phash = i.phash and h.bucket = i.bucket
    where i.key <> h.first_key
)
select key_a, key_b, reason from near_hashes
union all
select key_a, key_b, reason from same_hash
