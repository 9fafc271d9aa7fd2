-- report_caption_accuracy: accuracy of each image's accepted caption, with its backend.
-- Parameters: none. Reads captions.
select key, backend, accuracy, flagged
from captions
where accepted and accuracy is not null
order by key
