-- caption_characters: every character tag the dataset knows (curated tags, source tags not derived
-- from text, the tagger's scores): the names a caption is checked for, a name of them that is not
-- one of the image's being made up (udfs/caption/caption_scoring.py, Claims).
-- Parameters: none. Reads tags, source_tags, tag_scores.
select tag from tags where category = 'character'
union
select tag from source_tags where category = 'character' and origin <> 'caption'
union
select tag from tag_scores where category = 'character'
order by tag
