-- caption_characters: the character tags the dataset has (curated tags, source tags not derived
-- from text): the names a caption is checked for, a name of them that is not one of the image's
-- being made up (udfs/caption/caption_scoring.py, Claims). Not the tagger's raw scores, which keep
-- every character it guessed above annotate.tagger.score_floor: nearly every name it knows.
-- Parameters: none. Reads tags, source_tags.
select tag from tags where category = 'character'
union
select tag from source_tags where category = 'character' and origin <> 'caption'
order by tag
