-- report_caption_accuracy: the accepted captions counted by backend, accuracy bin (20 bins of
-- 0.05, the last one taking 1.0; null: not scored), what the accuracy was computed against
-- (scored_against) or why it was not scored (not_scored), and how many are flagged: a few
-- hundred rows at any number of images, for the report's histogram.
-- A caption a person wrote in `booruset review` (edit_state) stands in for the accepted one, as
-- in the export: not scored ('edited_by_person'), never flagged (the flag was the replaced one's).
-- Parameters: none. Reads captions, edit_state, images.
with caption_edits as (
    select key from edit_state where field = 'caption' and new is not null
),
written as (
    select coalesce(c.key, e.key) as key,
           case when e.key is null then c.backend else 'edited' end as backend,
           case when e.key is null then c.accuracy end as accuracy,
           case when e.key is null then c.scored_against end as scored_against,
           case when e.key is null then c.not_scored else 'edited_by_person' end as not_scored,
           e.key is null and coalesce(c.flagged, false) as flagged
    from (select * from captions where accepted) as c
    full join caption_edits as e on e.key = c.key
)
select backend,
       case when accuracy is not null then least(greatest(floor(accuracy * 20), 0), 19)::integer end as bin,
       scored_against,
       not_scored,
       count(*) as n,
       count(*) filter (where flagged) as flagged
from written
where key in (select key from images)  -- not a picture gone from the inputs (its rows stay until caption runs)
group by all
order by all
