-- report_balance: per balance group, its share of the images before multiply and its share of
-- the training samples after (sum of multiply).
-- Parameters: none. Reads balance.
with per_group as (
    select path, count(*) as images, sum(multiply) as samples
    from balance
    group by path
)
select path,
       images,
       samples,
       images / sum(images) over () as share_before,
       samples / sum(samples) over () as share_after
from per_group
order by images desc, path
