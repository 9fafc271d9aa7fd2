-- text_tags_digest: one digest of the tags caption.tags_from_text took from the images' own
-- captions and prompts (source_tags of origin 'caption'). Curate records the one it read
-- (state/curate-text-tags.json); the caption job curates again when the tags it has just found
-- are not those, so that one run ends with the rows a second run would leave as they are.
-- Parameters: none.
select md5(coalesce(string_agg(concat_ws(chr(31), key, tag, coalesce(category, ''), position::varchar), chr(30)
                               order by key, position, tag, category), ''))
from source_tags
where origin = 'caption'
