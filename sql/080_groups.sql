-- groups: each image's folder path, one segment per entry of group_format(level, segment):
--   n_characters  1_character, 2_characters, ..., <max>+_characters (0_characters)
--   character     the sorted character tags joined with '+', or character_others when the
--                 image has none, the name is 100 characters or longer, or the combination has
--                 fewer than $min_images_per_combination images
--   fh_ratio      fh_ratio_<lo>-<hi> from fh_ratio_bins(lo, hi, name), or no_face
--   n_people      1_person, 2_people, ...; n_faces: 1_face, 2_faces, ...; rating: the rating
--   any other image_meta column: <column>_<value>
-- Values from data (character tags, the rating, other columns) are escaped so that two different
-- values never give one path (a group is one folder of the balance and of the export): '%', '/'
-- and, in a character's name, '+' as %25, %2F, %2B, and a leading '.' as %2E (no segment is '.'
-- or '..'). Dots were dropped and '/' was '_': `a.b` and `ab`, `x/y` and `x_y`, the character
-- `p+q` and the pair p, q were one group.
-- $min_images_per_combination counts a combination's images without the near duplicates the
-- export leaves out (a combination of copies of one picture is one image).
-- Images a person excluded (edit_state, booruset review), and those of an input whose folder or
-- shard is gone ($gone_inputs: input ids, the first part of a key), get no group: they are not
-- exported, so they must not weigh in the balance of the others.
with meta as (
    select m.*,
           array_to_string(list_transform(m.characters, lambda c: regexp_replace(
               replace(replace(replace(c, '%', '%25'), '/', '%2F'), '+', '%2B'), '^\.', '%2E')), '+') as combination
    from image_meta m
    anti join (select key from edit_state where field = 'exclude' and new = 'true') x on x.key = m.key
    where not list_contains($gone_inputs::varchar[], split_part(m.key, '/', 1))
),
combination_sizes as (
    -- the pictures the export writes: a near duplicate that is not its group's representative is
    -- left out (export.drop_duplicates, as sql/085_group_counts counts), so ten copies of one
    -- picture are one image, not a combination with ten
    select combination, count(*) as n_images
    from meta
    anti join (select key from duplicates group by key having not bool_and(is_representative)) d on d.key = meta.key
    group by combination
),
path_format as (
    -- the format as one list, so that each image's path is built in its own row (a join with
    -- group_format and a string_agg ordered within each image: 3x the time at 1M images); the
    -- row as JSON only when a segment names another column
    select list(segment order by level) as segments,
           bool_or(segment not in ('n_characters', 'character', 'fh_ratio', 'n_people', 'n_faces', 'rating')) as reads_columns
    from group_format
),
image_facts as (
    select m.*, f.segments, case when f.reads_columns then to_json(m) end as row_json,
           coalesce(s.n_images, 0) as combination_images, b.name as fh_ratio_bin
    from meta m
    cross join path_format f
    left join combination_sizes s on s.combination = m.combination  -- none: copies of other combinations' pictures
    left join fh_ratio_bins b on m.fh_ratio >= b.lo and (m.fh_ratio < b.hi or (b.last and m.fh_ratio <= b.hi))
)
select key, array_to_string(list_transform(segments, lambda segment: case segment
        when 'n_characters' then case when n_characters >= $max_characters then $max_characters || '+_characters'
                                      when n_characters = 1 then '1_character'
                                      else n_characters || '_characters' end
        when 'character' then case when n_characters = 0 or length(combination) >= 100
                                        or combination_images < $min_images_per_combination then 'character_others'
                                   else combination end
        when 'fh_ratio' then coalesce(fh_ratio_bin, 'no_face')
        when 'n_people' then n_people || case when n_people = 1 then '_person' else '_people' end
        when 'n_faces' then n_faces || case when n_faces = 1 then '_face' else '_faces' end
        when 'rating' then regexp_replace(replace(replace(coalesce(rating, 'unrated'), '%', '%25'), '/', '%2F'),
                                          '^\.', '%2E')
        else segment || '_' || replace(replace(coalesce(json_extract_string(row_json, '$."' || segment || '"'), 'none'),
                                               '%', '%25'), '/', '%2F') end), '/') as path
from image_facts
