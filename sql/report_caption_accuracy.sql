-- report_caption_accuracy: each image's accepted caption: its backend, accuracy, what the
-- accuracy was computed against (scored_against), or why it was not scored (not_scored).
-- Parameters: none. Reads captions.
select key, backend, accuracy, flagged, scored_against, not_scored
from captions
where accepted
order by key
