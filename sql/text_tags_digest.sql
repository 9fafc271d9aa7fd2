-- text_tags_digest: one digest of the tags caption.tags_from_text took from the images' own
-- captions and prompts (source_tags of origin 'caption'). Curate records the one it read
-- (state/curate-text-tags.json); the caption job curates again when the tags it has just found
-- are not those, so that one run ends with the rows a second run would leave as they are.
-- An order-free aggregate of row hashes: a scan in bounded memory at millions of rows (a string
-- of every row, then its md5, grew with the table). DuckDB's hash() may change between DuckDB
-- versions: the price is one extra curate after such an upgrade.
-- Parameters: none.
select count(*)::varchar || '-' || coalesce(bit_xor(hash(key, tag, category, position)), 0)::varchar
from source_tags
where origin = 'caption'
