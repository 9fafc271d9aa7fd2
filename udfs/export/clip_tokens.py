"""CLIP token counts, and KEY.txt cut to a CLIP token budget (export.clip_token_budget).

Stable Diffusion's text encoders read 75 tokens at a time (77 with the start and end tokens;
trainers take 75, 150 or 225): a KEY.txt past its budget is cut by the trainer wherever it
falls. The count is CLIP's own byte-pair encoding: OpenAI's vocabulary (data/clip, see its
NOTICE) in transformers' `CLIPTokenizer` (CLIP's normaliser, pre-tokeniser and BPE, on the
`tokenizers` library), which the project already has. The vocabulary is laid out from the BPE
file as CLIP's own SimpleTokenizer lays it out: bytes, bytes + "</w>", the merges, the two
special tokens.
"""

from __future__ import annotations

import gzip
import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

import regex  # \X, grapheme clusters (the tokenizers' own dependency)

VOCAB_PATH = Path(__file__).resolve().parents[2] / "data" / "clip" / "bpe_simple_vocab_16e6.txt.gz"
MERGES = 49152 - 256 - 2  # CLIP's vocabulary: 49408 tokens = 2 x 256 bytes + these merges + 2 special
# where a sentence may end: . ! ? ; and the closing quotes or brackets after them, then a space;
# 。！？ and their closing brackets, with no space after (group 1: the sentence's last character)
SENTENCE_END = re.compile(r"([.!?;]+[\"'”’»)\]]*)\s+|([。！？]+[」』）)\"”’]*)")
# Words whose period is no sentence end: a caption cut after "A portrait of Dr." or "..., e.g."
# ends in a fragment. English captions (what VLMs write) need only the common titles and Latin
# abbreviations; a missed one costs a cut at the sentence before, never a wrong one. A word with
# a period inside (U.S., a.m.) and a single letter (an initial: J. Smith) count too.
ABBREVIATIONS = frozenset("""mr mrs ms mx dr prof st mt ft jr sr rev gen col lt sgt capt vs etc e.g i.e cf ca approx
    fig no vol ch pp ed inc ltd co dept est""".split())
QUOTE_CLOSES = "\"'”’»"
# a list's numbers: "1. A girl ... 2. A boy": a sentence that is only a number is no sentence
LIST_NUMBER = re.compile(r"\(?\d{1,3}[.)]$")
# where a comma-separated part ends: a tag of a caption that lists tags, a clause of a sentence;
# not a comma between digits ("1,000 people" was cut to "1")
PART_END = re.compile(r"\s*(?:(?<!\d),|,(?!\d)|[，、])")


@lru_cache(maxsize=1)
def clip_tokenizer():
    """transformers' CLIPTokenizer over CLIP's BPE vocabulary (one per process)."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    with gzip.open(VOCAB_PATH) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : MERGES + 1]]
    chars = list(bytes_to_unicode().values())
    vocab = chars + [c + "</w>" for c in chars] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={token: i for i, token in enumerate(vocab)}, merges=merges)


@lru_cache(maxsize=4096)  # fitting a text counts its final form; KEY.json reports that count again
def clip_tokens(text: str) -> int:
    """CLIP tokens of `text`, without the start and end tokens (what a trainer's 75 counts)."""
    return len(clip_tokenizer()(text, add_special_tokens=False)["input_ids"])


def fit_tags(words: list[str], keep: int, budget: int, join) -> tuple[str, int]:
    """`join(words)` with the lowest-ranked words (the last; never the first `keep`) left out
    until it is within `budget` CLIP tokens; (text, words left out).

    The first guess adds up each word's tokens and one per comma (one batched tokenizer call);
    exact counts of the joined text then settle it, usually at once (a word ending in
    punctuation can share a token with the comma after it)."""
    text = join(words)
    if len(words) <= keep or clip_tokens(text) <= budget:
        return text, 0
    sizes = [len(ids) for ids in clip_tokenizer()(words, add_special_tokens=False)["input_ids"]]
    n, total = 0, 0
    while n < len(words) and (n < keep or total + sizes[n] + (n > 0) <= budget):
        total, n = total + sizes[n] + (n > 0), n + 1
    while n > keep and clip_tokens(join(words[:n])) > budget:
        n -= 1
    while n < len(words) and clip_tokens(join(words[: n + 1])) <= budget:
        n += 1
    return join(words[:n]), len(words) - n


def fit_caption(text: str, budget: int) -> tuple[str, bool]:
    """`text` within `budget` CLIP tokens: its longest run of whole sentences that fits, else its
    longest run of whole comma-separated parts (a caption that lists tags, "1girl, long hair,
    ...", is cut between two tags, not inside one and before a comma), else its longest run of
    whole words, else (a first word longer than the budget: Japanese or Chinese, written without
    spaces) its longest start of whole characters that fits; (text, whether it was cut). A caption
    without spaces was cut to nothing, and its image left out of the folder layouts as one with
    no text."""
    if clip_tokens(text) <= budget:
        return text, False
    kept = ""
    for end in sentence_ends(text):
        longer = text[:end].strip()
        if clip_tokens(longer) > budget:
            break
        kept = longer
    if kept:
        return kept, True
    parts = [text[:end.start()] for end in PART_END.finditer(text)]
    n = longest_fit(len(parts), lambda k: parts[k - 1] if k else "", budget)
    if n and parts[n - 1].strip():
        return parts[n - 1].strip(), True
    words = text.split()
    n = longest_fit(len(words), lambda k: " ".join(words[:k]), budget)
    while n > 1 and abbreviation(words[n - 1]):  # "A portrait of", not "A portrait of Dr."
        n -= 1
    if n:
        return " ".join(words[:n]), True
    # at a character as a reader sees one (a grapheme cluster: a flag, an emoji of several, e and
    # its combining accent), not at a code point inside one
    chars = regex.findall(r"\X", text)
    n = longest_fit(len(chars), lambda k: "".join(chars[:k]).rstrip(), budget)
    return "".join(chars[:n]).rstrip(), True


def sentence_ends(text: str) -> Iterator[int]:
    """The positions in `text` after each of its sentences (SENTENCE_END), but not after an
    abbreviation's period, a list's number, nor a quote its sentence goes on after."""
    start = 0
    for end in SENTENCE_END.finditer(text):
        mark = end.group(1)
        if mark is not None and mark[-1] in QUOTE_CLOSES and text[end.end():end.end() + 1].islower():
            continue  # 'She shouts "Look out!" at the boy': the sentence goes on after the quote
        if mark is not None and mark[0] == ".":
            first = end.start(1)  # of the word the period ends (a walk back over it, not a split of the text)
            while first > start and not text[first - 1].isspace():
                first -= 1
            word = text[first:end.start(1)]
            if not word or abbreviation(word + mark) or LIST_NUMBER.match(text[start:end.end(1)].strip()):
                continue
        start = end.end()
        yield end.end(1) if mark is not None else end.end()


def abbreviation(word: str) -> bool:
    """Whether `word` (with its period) is an abbreviation whose period ends no sentence."""
    word = word.lstrip("\"'“‘«([").rstrip("\"'”’»)]")
    if not word.endswith(".") or word.endswith(".."):
        return False
    stem = word[:-1].lower()
    dotted = "." in stem and stem.replace(".", "").isalpha()  # e.g, U.S, a.m
    return stem in ABBREVIATIONS or (len(stem) == 1 and stem.isalpha()) or dotted


def longest_fit(size: int, prefix, budget: int) -> int:
    """The largest k <= size with prefix(k) within `budget` CLIP tokens (counts grow with k)."""
    low, high = 0, size
    while low < high:
        mid = (low + high + 1) // 2
        if clip_tokens(prefix(mid)) <= budget:
            low = mid
        else:
            high = mid - 1
    return low
