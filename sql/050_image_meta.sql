-- image_meta: facts per image from images, the curated tags and the detections.
--   n_faces   faces with score >= $face_threshold whose box (in pixels) is at most
--             $max_face_aspect times longer than wide or wide than long, of one face detector
--             (the first model by name that found one, the cascade's last)
--   facepos   one "fvp <v> fhp <h>" per face: the face centre's vertical / horizontal
--             position in percent of the image (0 top / left), largest face first
--   fh_ratio  height of the largest face / image height
--   n_people  from count tags (1girl, 2girls, ..., 6+girls, boys, others, solo) when the image
--             has any, else from person detections, else n_faces
--   characters  the character tags, or the character a person set (edit_state, booruset review)
with detected_faces as (
    select d.key, d.model, d.x0, d.y0, d.x1, d.y1, d.y1 - d.y0 as height_ratio
    from detections d
    join images i on i.key = d.key
    where d.label = $face_label and d.score >= $face_threshold
      and (d.x1 - d.x0) > 0 and (d.y1 - d.y0) > 0
      and greatest((d.x1 - d.x0) * i.width, (d.y1 - d.y0) * i.height)
          <= $max_face_aspect * least((d.x1 - d.x0) * i.width, (d.y1 - d.y0) * i.height)
),
face_models as (
    -- one detector's faces per image: the default models run two face detectors (the YOLO face
    -- model and the cascade), and each face was counted once per detector. The first model by
    -- name that found one (as the embedding steps choose a model), the cascade
    -- ($cascade_face_model, the weakest) only where no other did
    select key, coalesce(min(model) filter (where model <> $cascade_face_model), min(model)) as model
    from detected_faces
    group by key
),
faces as (
    select f.* from detected_faces f semi join face_models m on m.key = f.key and m.model = f.model
),
face_facts as (
    select key,
           count(*)::integer as n_faces,
           list('fvp ' || cast(floor(50 * (y0 + y1)) as integer) || ' fhp ' || cast(floor(50 * (x0 + x1)) as integer)
                order by height_ratio desc, x0, y0, x1, y1) as facepos,
           max(height_ratio)::float as fh_ratio
    from faces
    group by key
),
people_detected as (
    -- a box clipped to nothing at the image's edge is no person
    select key, count(*)::integer as n_people_detected
    from detections
    where label = $person_label and score >= $person_threshold and x1 > x0 and y1 > y0
    group by key
),
count_by_gender as (
    select t.key, c.gender, max(c.n) as n
    from tags t
    join count_tags c on c.tag = t.tag
    group by t.key, c.gender
),
people_tagged as (
    select key,
           greatest(coalesce(sum(n) filter (where gender <> 'any'), 0), coalesce(max(n) filter (where gender = 'any'), 0))::integer
               as n_people_tags
    from count_by_gender
    group by key
),
tag_facts as (
    -- only the character and rating rows (a few per image, not ~30): an image with neither
    -- gets no row, which the left joins below read as no characters and no rating
    select key,
           list(tag order by tag) filter (where category = 'character') as characters,
           arg_max(tag, {'score': score, 'tag': tag}) filter (where category = 'rating') as rating
    from tags
    where category in ('character', 'rating')
    group by key
),
character_edits as (
    select key, case when new = '' then []::varchar[] else [new] end as characters
    from edit_state
    where field = 'character' and new is not null
),
image_characters as (
    select i.key, coalesce(e.characters, t.characters, []::varchar[]) as characters
    from images i
    left join tag_facts t on t.key = i.key
    left join character_edits e on e.key = i.key
)
select i.key, i.width, i.height,
       coalesce(f.n_faces, 0) as n_faces,
       coalesce(f.facepos, []::varchar[]) as facepos,
       f.fh_ratio,
       coalesce(p.n_people_tags, d.n_people_detected, f.n_faces, 0) as n_people,
       len(c.characters)::integer as n_characters,
       c.characters,
       t.rating,
       p.n_people_tags,
       d.n_people_detected
from images i
left join face_facts f on f.key = i.key
left join people_detected d on d.key = i.key
left join people_tagged p on p.key = i.key
left join tag_facts t on t.key = i.key
left join image_characters c on c.key = i.key
