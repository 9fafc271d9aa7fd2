-- group_members: every image of the groups with whether the export keeps it. A near duplicate
-- that is not its group's representative is left out of the export (by default,
-- export.drop_duplicates): the balance shares its weight among, and hands its repeats to, the
-- images the export keeps.
-- Parameters: none. Reads groups, duplicates.
with duplicate_keys as (
    select key, bool_and(is_representative) as is_representative
    from duplicates
    group by key
)
select g.key, g.path, coalesce(d.is_representative, true) as exported
from groups g
left join duplicate_keys d using (key)
