-- clusters: identity of every crop. cluster: the id from clustering (-1: noise, its own class);
-- character: the reference match, else, for a crop in a real cluster of a block with exactly
-- one character tag, that character; else none.
select c.key, c.crop, c.cluster,
       coalesce(r.character,
                case when c.cluster >= 0 and c.block_characters = 1 then c.block end) as character
from crop_clusters c
left join reference_matches r on r.key = c.key and r.crop = c.crop
