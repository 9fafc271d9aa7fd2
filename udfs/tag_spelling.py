"""How a tag is spelled in the text trainers get, by imgutils' rule (imgutils.tagging.format):
underscores become spaces except in its kaomoji (`^_^`, `o_o`, `(o)_(o)`, ...), and the escape
for prompt syntax puts a backslash before `\\`, `(` and `)`.

The list and the pattern are read from imgutils' source as literals: importing the module runs
the imgutils.tagging package, whose camie tagger imports transformers (2 s in every fresh
worker), as udfs/curate/tag_rules.imgutils_character_lists says.
"""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path


@functools.cache
def imgutils_format() -> tuple[frozenset[str], re.Pattern]:
    """(kaomoji, characters to escape) of imgutils.tagging.format: its _KAOMOJIS and RE_SPECIAL."""
    import imgutils  # its own __init__ is light

    source = Path(imgutils.__file__).parent / "tagging" / "format.py"
    found = {}
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name) \
                and node.targets[0].id in ("_KAOMOJIS", "RE_SPECIAL"):
            value = node.value.args[0] if isinstance(node.value, ast.Call) and node.value.args else node.value
            found[node.targets[0].id] = ast.literal_eval(value)
    return frozenset(found["_KAOMOJIS"]), re.compile(found["RE_SPECIAL"])


def spaced(tag: str) -> str:
    """imgutils' remove_underline: the tag with spaces for underscores, a kaomoji as it is; and,
    beyond imgutils' list of them, any tag without a letter (";_;", "-_-", "<_<" are kaomoji too)."""
    tag = tag.strip()
    if tag in imgutils_format()[0] or not any(c.isalpha() for c in tag):
        return tag
    return tag.replace("_", " ")


def escaped(text: str) -> str:
    """imgutils' escape (tags_to_text's use_escape): `\\`, `(` and `)` with a backslash before."""
    return imgutils_format()[1].sub(r"\\\1", text)
