"""Lookup tables for curate's SQL, loaded from files named in the [curate] config section.

Every loader returns a pyarrow Table with fixed columns (empty when the file is not given), so
that the SQL always sees the same tables. Small rule tables ship in data/rules/; large Danbooru
lists come from a path (or from a tagger's label file).
"""

from __future__ import annotations

import ast
import csv
import json
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
from hbutils.string import plural_form, singular_form

RULES_DIR = Path(__file__).resolve().parents[2] / "data" / "rules"
# The lookup files are read as "utf-8-sig": a byte order mark (Excel's "CSV UTF-8") is no part
# of the first header or tag, and a file without one reads as UTF-8.

# Category numbers of Danbooru's tag list and of the WD taggers' selected_tags.csv.
CATEGORY_NAMES = {"0": "general", "1": "artist", "3": "copyright", "4": "character", "5": "meta", "9": "rating"}


def underscored(tag: str) -> str:
    """Danbooru form of a tag written with spaces."""
    return "_".join(tag.strip().lower().split())


def rules_file(rules_dir: str, name: str) -> Path:
    return Path(rules_dir or RULES_DIR) / name


def lookup_paths(opts: dict, names: Iterable[str]) -> dict[str, str]:
    """The files or folders that the lookup options `names` (curate's) have a build read: an empty
    rules_dir or blacklist is the repository's data/rules/, which a person edits, or a new version
    changes, as any folder of theirs."""
    defaults = {"rules_dir": str(RULES_DIR), "blacklist": str(RULES_DIR / "blacklist.txt")}
    return {name: str(opts[name]) or defaults[name] for name in names if opts.get(name) or name in defaults}


def read_csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        return list(csv.DictReader(f))


def tag_list(path: str) -> tuple[pa.Table, pa.Table]:
    """(categories, aliases) from a Danbooru tag list or a tagger label file.

    Danbooru list (no header): `name,category,post_count,"alias1,alias2"`.
    Tagger label file (header): `tag_id,name,category,count`.
    """
    categories: dict[str, str] = {}
    aliases: dict[str, str] = {}
    if path:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
        labelled = bool(rows) and rows[0][:3] == ["tag_id", "name", "category"]
        for row in rows[1:] if labelled else rows:
            if labelled and len(row) >= 3:
                categories[row[1]] = CATEGORY_NAMES.get(row[2], "general")
            elif not labelled and len(row) >= 2:
                categories[row[0]] = CATEGORY_NAMES.get(row[1], "general")
                for alias in (row[3].split(",") if len(row) > 3 and row[3] else []):
                    if alias:
                        aliases.setdefault(alias, row[0])
    # a name with a row of its own is a tag, wherever its row is: Danbooru's list keeps stale
    # aliases (`sonic_the_hedgehog`, a character, also listed as an alias of `sonic_(series)`)
    aliases = {alias: tag for alias, tag in aliases.items() if alias not in categories}
    return (
        pa.table({"tag": list(categories), "category": list(categories.values())}, schema=_schema("tag", "category")),
        pa.table({"alias": list(aliases), "tag": list(aliases.values())}, schema=_schema("alias", "tag")),
    )


def alias_table(list_aliases: pa.Table, rules_dir: str) -> pa.Table:
    """Aliases of the tag list, overridden by data/rules/aliases.csv (the repository's own), each
    to its final tag: the SQL follows one step, so a chain (a -> b -> c) must be c already.

    A name the file aliases a tag to is that tag, whatever the list says of it (the file's
    blonde_hair -> blond_hair beside the list's blond_hair -> blonde_hair: both are blond_hair,
    not each the other); a list alias of a name the file aliases goes on to the file's tag."""
    override = rules_file(rules_dir, "aliases.csv")
    rows = {r["alias"]: r["tag"] for r in read_csv_rows(override)} if override.is_file() else {}
    chosen = {alias: final_tag(rows, alias, str(override)) for alias in rows}
    tags = set(chosen.values())
    merged = {alias: tag for alias, tag in zip(list_aliases["alias"].to_pylist(), list_aliases["tag"].to_pylist(),
                                              strict=True) if alias not in tags}
    merged.update(chosen)
    merged = {alias: final_tag(merged, alias, str(override)) for alias in merged}
    merged = {a: t for a, t in merged.items() if a != t}
    return pa.table({"alias": list(merged), "tag": list(merged.values())}, schema=_schema("alias", "tag"))


def impossible_through_aliases(rules_dir: str, aliases: pa.Table) -> pa.Table:
    """impossible_tags.csv read as curate applies it, through the aliases (the caption job's
    suggestions keep to the same rules)."""
    return through_aliases(impossible(rules_dir), aliases, ("tag_a", "tag_b"), "impossible_tags.csv")


def through_aliases(rules: pa.Table, aliases: pa.Table, columns: tuple[str, ...], source: str) -> pa.Table:
    """A rule table with the tags of `columns` written as the images' tags are read: an alias as
    its tag (a blacklist entry `blonde_hair` acts on `blond_hair` when the tag list makes it an
    alias; written as the alias it acted on no image). ValueError for a row whose two tags become
    one (an impossible combination of a tag with itself would take it from every image)."""
    canonical = dict(zip(aliases["alias"].to_pylist(), aliases["tag"].to_pylist(), strict=True))
    values = {name: [canonical.get(tag, tag) for tag in rules[name].to_pylist()] for name in columns}
    if len(columns) == 2:
        for index, (first, second) in enumerate(zip(*values.values(), strict=True)):
            if first == second:
                row = ", ".join(str(rules[name][index]) for name in columns)
                raise ValueError(f"{source}: {row} are one tag ({first}) through the aliases")
    for name, tags in values.items():
        rules = rules.set_column(rules.schema.get_field_index(name), name, pa.array(tags, pa.string()))
    return rules


def final_tag(aliases: dict[str, str], alias: str, source: str) -> str:
    """The tag at the end of `alias`'s chain (an alias of itself ends it); ValueError for a circle."""
    chain = [alias]
    while chain[-1] in aliases and aliases[chain[-1]] != chain[-1]:
        tag = aliases[chain[-1]]
        if tag in chain:
            circle = " -> ".join([*chain[chain.index(tag):], tag])
            raise ValueError(f"{source}: aliases that go round in a circle: {circle}")
        chain.append(tag)
    return chain[-1]


def blacklist(path: str) -> pa.Table:
    """One tag a line; `#` starts a comment line. "" is data/rules/blacklist.txt.

    As imgutils.tagging.drop_blacklisted_tags: spaces or underscores alike, and an entry also
    takes the singular and plural of its last word (`breast` drops `breasts`)."""
    text = Path(path or RULES_DIR / "blacklist.txt").read_text(encoding="utf-8-sig")
    entries = {underscored(line) for line in text.splitlines() if line.strip() and not line.startswith("#")}
    tags = sorted({form for entry in entries for form in word_forms(entry)})
    return pa.table({"tag": tags}, schema=_schema("tag"))


def overlap(path: str) -> pa.Table:
    """`{tag: [more specific tags]}` (imgutils' overlap_tags data) as (tag, implied_by) rows."""
    pairs: list[tuple[str, str]] = []
    if path:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        # a string is a list of letters to Python: {"long_hair": "very_long_hair"} made one rule a letter
        if not isinstance(data, dict) or not all(isinstance(values, list) and all(isinstance(v, str) for v in values)
                                                 for values in data.values()):
            raise ValueError(f"{path}: expected {{tag: [more specific tags]}}")
        pairs = [(underscored(k), underscored(v)) for k, values in data.items() for v in values]
    return pa.table({"tag": [p[0] for p in pairs], "implied_by": [p[1] for p in pairs]},
                    schema=_schema("tag", "implied_by"))


def impossible(rules_dir: str) -> pa.Table:
    rows = read_csv_rows(rules_file(rules_dir, "impossible_tags.csv"))
    for r in rows:
        if r["winner"] not in ("a", "b", "score"):
            raise ValueError(f"impossible_tags.csv: winner must be a, b or score, got {r['winner']!r}")
        if r["tag_a"] == r["tag_b"]:  # the SQL pairs the tag with itself: it left every image
            raise ValueError(f"impossible_tags.csv: {r['tag_a']} cannot rule out itself")
    return pa.table({k: [r[k] for r in rows] for k in ("tag_a", "tag_b", "winner")},
                    schema=_schema("tag_a", "tag_b", "winner"))


def count_tags(rules_dir: str) -> pa.Table:
    rows = read_csv_rows(rules_file(rules_dir, "count_tags.csv"))
    return pa.table({"tag": [r["tag"] for r in rows], "gender": [r["gender"] for r in rows],
                     "n": pa.array([int(r["n"]) for r in rows], pa.int32())})


def character_trait_rules(path: str, level: int) -> pa.Table:
    """(kind, pattern) rows: suffix / prefix / whitelist.

    From a JSON in anime_screenshot_pipeline's form (`whitelist`, and `suffixes` / `prefixes`
    as lists of groups: groups 0..level are used), or, when `path` is "", from imgutils'
    CHAR_* lists (the same rules as imgutils.tagging.drop_basic_character_tags).
    """
    rows: list[tuple[str, str]] = []
    if path:
        data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        check_trait_rules(data, path)
        groups = lambda key: [w for group in data.get(key, [])[: level + 1] for w in group]  # noqa: E731
        rows += [("whitelist", w) for w in data.get("whitelist", [])]
        rows += [("suffix", w) for w in groups("suffixes")] + [("prefix", w) for w in groups("prefixes")]
    else:
        lists = imgutils_character_lists()
        rows += [("whitelist_suffix", w) for w in lists["CHAR_WHITELIST_SUFFIX"]]
        rows += [("whitelist_prefix", w) for w in lists["CHAR_WHITELIST_PREFIX"]]
        rows += [("whitelist", w) for w in lists["CHAR_WHITELIST_WORD"]]
        rows += [("suffix", w) for w in lists["CHAR_SUFFIXES"]]
        rows += [("prefix", w) for w in lists["CHAR_PREFIXES"]]
    expanded = sorted({(kind, form) for kind, word in rows for form in word_forms(underscored(word), kind)})
    return pa.table({"kind": [r[0] for r in expanded], "pattern": [r[1] for r in expanded]},
                    schema=_schema("kind", "pattern"))


def check_trait_rules(data: object, path: str) -> None:
    """ValueError unless `data` has anime_screenshot_pipeline's form: a flat list of suffixes (a
    string is a list of letters to Python) made a rule of each letter, none of which acted."""
    words = lambda value: isinstance(value, list) and all(isinstance(w, str) for w in value)  # noqa: E731
    if not (isinstance(data, dict) and words(data.get("whitelist", []))
            and all(isinstance(data.get(key, []), list) and all(words(group) for group in data.get(key, []))
                    for key in ("suffixes", "prefixes"))):
        raise ValueError(f'{path}: expected {{"whitelist": [tags], "suffixes": [[words], ...], '
                         f'"prefixes": [[words], ...]}}')


def imgutils_character_lists() -> dict[str, list[str]]:
    """The CHAR_* word lists of imgutils.tagging.character, read from its source as literals.

    Importing that module runs the imgutils.tagging package, whose camie tagger imports
    transformers: 1.9 s in every fresh worker, for five lists of strings."""
    import imgutils  # its own __init__ is light

    source = Path(imgutils.__file__).parent / "tagging" / "character.py"
    lists = {}
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id.startswith("CHAR_"):
            lists[node.targets[0].id] = ast.literal_eval(node.value)
    return lists


def word_forms(pattern: str, kind: str = "whitelist") -> list[str]:
    """The pattern with its last word in singular and plural (`ear` -> `ears`, `eyes` -> `eye`),
    by the pluralisation imgutils matches tags with (hbutils.string); prefixes match as written,
    as in imgutils.tagging.match.tag_match_prefix.

    imgutils matches when the forms of the tag and the forms of the pattern share one; the SQL
    compares the tag as written, so the forms of the forms are listed too (`drills` -> `drill`
    -> `drills`), which makes the match the same from either side."""
    if kind in ("prefix", "whitelist_prefix") or not pattern:
        return [pattern]
    *head, last = pattern.split("_")
    forms, frontier = {last}, {last}
    for _ in range(2):
        frontier = {f for word in frontier for f in (singular_form(word), plural_form(word))} - forms
        forms |= frontier
    return sorted("_".join([*head, form]) for form in forms if form)


def _schema(*names: str) -> pa.Schema:
    return pa.schema([(n, pa.string()) for n in names])
