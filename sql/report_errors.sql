-- report_errors: errors by stage and kind, most frequent first.
-- Parameters: none. Reads errors.
select stage, kind, count(*) as n, count(*) filter (where dropped) as dropped
from errors
group by stage, kind
order by n desc, stage, kind
