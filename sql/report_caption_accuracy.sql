-- report_caption_accuracy: the accepted captions counted by backend, accuracy bin (20 bins of
-- 0.05, the last one taking 1.0; null: not scored), what the accuracy was computed against
-- (scored_against) or why it was not scored (not_scored), and how many are flagged: a few
-- hundred rows at any number of images, for the report's histogram.
-- Parameters: none. Reads captions.
select backend,
       case when accuracy is not null then least(greatest(floor(accuracy * 20), 0), 19)::integer end as bin,
       scored_against,
       not_scored,
       count(*) as n,
       count(*) filter (where flagged) as flagged
from captions
where accepted
group by all
order by all
