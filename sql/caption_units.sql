-- caption_inputs (a temp view of sql/caption_inputs.sql) in key order, each row with its position
-- in that order (jobs/caption_cuts.py cuts the units over the positions). row_digest is a digest
-- of each row's values: a unit's id hashes its rows' digests,
-- so new tags, texts or people make a new unit instead of reusing stale captions.
-- own_captions counts only where an image has some (the merge patch takes the null out): rows
-- without keep the digest they had before the column was added, so an upgrade does not make
-- every unit new (every VLM caption asked for again). member_offset (where the image is in its
-- shard) says nothing of the image: it is never in the digest, nor is bytes (the member's size at
-- ingest: it only lets a reader tell a rewritten member from the one ingested, and in the digest
-- it would have made every unit new on the upgrade that added it). Nor is tagger_near (the tags the
-- tagger scored near its thresholds): it comes from the tag_scores and thresholds tagger_tags
-- come from, and in the digest it would have made every unit new on the upgrade that added it.
-- tags_from_text counts only where true, for the same reason.
-- sha256 (the picture's, only where the captioner is shown it: a VLM caption describes the
-- picture) goes into row_digest, not into legacy_digest: the digest of versions before it, by
-- which a unit committed by one of them is still known (jobs/caption_cuts.py kept_ranges), so
-- the upgrade does not caption a VLM workspace again. A template run's digests are the same.
with digested as (
    select *,
           md5(json_merge_patch(to_json(caption_inputs),
                                '{"own_captions": null, "member_offset": null, "bytes": null, "tagger_near": null,
                                  "tags_from_text": null, "sha256": null}'
                                )::varchar
               || coalesce(to_json(own_captions)::varchar, '')
               || case when tags_from_text then 'tags_from_text' else '' end) as legacy_digest
    from caption_inputs
)
select *,
       row_number() over (order by key) - 1 as position,
       case when sha256 is null then legacy_digest else md5(legacy_digest || sha256) end as row_digest
from digested
order by key
