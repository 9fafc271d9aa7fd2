-- character_trait_tags: general tags that describe a character's fixed traits (hair, eyes, ...),
-- by the word suffix / prefix rules of character_trait_rules(kind, pattern), minus the
-- whitelist. Patterns are in underscore form; plural / singular forms are expanded when the
-- rules are loaded. A suffix matches whole words only: `hair` matches `red_hair`, not `chair`.
with general_tags as (
    select tag from tag_vocabulary where category = 'general'
),
matches as (
    select g.tag, r.kind
    from general_tags g
    join character_trait_rules r
      on (r.kind in ('suffix', 'whitelist_suffix') and (g.tag = r.pattern or ends_with(g.tag, '_' || r.pattern)))
      or (r.kind in ('prefix', 'whitelist_prefix') and (g.tag = r.pattern or starts_with(g.tag, r.pattern || '_')))
      or (r.kind = 'whitelist' and g.tag = r.pattern)
)
select m.tag, any_value(v.tag_id) as tag_id
from matches m
join tag_vocabulary v on v.tag = m.tag
group by m.tag
having bool_or(m.kind in ('suffix', 'prefix')) and not bool_or(m.kind like 'whitelist%')
