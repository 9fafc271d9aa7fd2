-- groups: each image's folder path, one segment per entry of group_format(level, segment):
--   n_characters  1_character, 2_characters, ..., <max>+_characters (0_characters)
--   character     the sorted character tags joined with '+', or character_others when the
--                 image has none, the name is 100 characters or longer, or the combination has
--                 fewer than $min_images_per_combination images
--   fh_ratio      fh_ratio_<lo>-<hi> from fh_ratio_bins(lo, hi, name), or no_face
--   n_people      1_person, 2_people, ...; n_faces: 1_face, 2_faces, ...; rating: the rating
--   any other image_meta column: <column>_<value>
-- Images a person excluded (edit_state, booruset review) get no group: they are not exported, so
-- they must not weigh in the balance of the others.
with meta as (
    select m.*, array_to_string(m.characters, '+') as combination
    from image_meta m
    anti join (select key from edit_state where field = 'exclude' and new = 'true') x on x.key = m.key
),
combination_sizes as (
    select combination, count(*) as n_images from meta group by combination
),
segments as (
    select m.key, to_json(m) as row_json,
        map {
            'n_characters': case when m.n_characters >= $max_characters then $max_characters || '+_characters'
                                 when m.n_characters = 1 then '1_character'
                                 else m.n_characters || '_characters' end,
            'character': case when m.n_characters = 0 or length(m.combination) >= 100
                                   or s.n_images < $min_images_per_combination then 'character_others'
                              else replace(m.combination, '.', '') end,
            'fh_ratio': coalesce(b.name, 'no_face'),
            'n_people': m.n_people || case when m.n_people = 1 then '_person' else '_people' end,
            'n_faces': m.n_faces || case when m.n_faces = 1 then '_face' else '_faces' end,
            'rating': coalesce(m.rating, 'unrated')
        } as named
    from meta m
    join combination_sizes s on s.combination = m.combination
    left join fh_ratio_bins b on m.fh_ratio >= b.lo and (m.fh_ratio < b.hi or (b.last and m.fh_ratio <= b.hi))
)
select s.key,
       string_agg(
           replace(coalesce(s.named[f.segment],
                            f.segment || '_' || coalesce(json_extract_string(s.row_json, '$."' || f.segment || '"'), 'none')),
                   '/', '_'),
           '/' order by f.level) as path
from segments s
cross join group_format f
group by s.key
