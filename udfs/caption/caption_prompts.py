"""Prompts of the VLM captioners and of the rewriter (the same for the vLLM and OpenAI transports)."""

from __future__ import annotations

import json
import re

from udfs.caption.template_caption import words_of
from udfs.ingest.sidecars import printable

CAPTION_PROMPT = (
    "Write a descriptive caption for this image in a formal tone, in one paragraph.\n"
    "These tags describe the image; use the ones you can see:\n{tag_block}\n"
    "Draft caption written from the tags (correct it where the image disagrees):\n{draft}"
)
REWRITE_PROMPT = (
    "Rewrite this image caption to be shorter and plainer. Keep every fact; do not add any.\n"
    "These must stay in the caption: {keep}\n"
    "Caption: {caption}\n"
    "Shorter caption:"
)
SYSTEM_PROMPT = "You are a helpful image captioner."


def tag_block(tags: list[str], categories: list[str]) -> str:
    """The three-line block 'copyright: ... / character: ... / general tags: ...'."""
    lines = {"copyright": [], "character": [], "general": []}
    for tag, category in zip(tags, categories, strict=True):
        if category in ("copyright", "character"):
            lines[category].append(words_of(tag))
        elif category in (None, "", "general"):
            lines["general"].append(words_of(tag))
    return (f"copyright: {', '.join(lines['copyright'])}\n"
            f"character: {', '.join(lines['character'])}\n"
            f"general tags: {', '.join(lines['general'])}")


def prompt_for(options: dict, region: str) -> str:
    """The configured prompt of a whole-image caption, or of a 2x2 region's (`region` not "")."""
    return options["region_prompt"] if region else options["prompt"]


def caption_messages(tags: list[str], categories: list[str], draft: str, image_url: str | None,
                     template: str = CAPTION_PROMPT, system: str = SYSTEM_PROMPT, region: str = "") -> list[dict]:
    """OpenAI chat messages: the prompt text, then the image (when there is one) as a data URL.
    `region`: the 2x2 region the image is (the template's {region})."""
    text = template.format(tag_block=tag_block(tags, categories), draft=draft, region=region)
    content: list[dict] | str = text
    if image_url:
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def rewrite_messages(caption: str, keep: list[str], template: str = REWRITE_PROMPT) -> list[dict]:
    text = template.format(keep=", ".join(words_of(t) for t in keep) or "(none)", caption=caption)
    return [{"role": "user", "content": text}]


# What chat models wrap a caption in, none of it caption: a reasoning block (one never closed,
# cut off by max_tokens, runs to the end), an opener ("Sure! Here is a caption for the image:"),
# markdown (headings, code fences, bullet marks, emphasis), a closing note ("Note: ...", "Let me know ...").
REASONING = re.compile(r"<(think|thinking|reasoning)>.*?(?:</\1>|\Z)", re.S | re.I)
# Each part of a pattern that could scan a long reply is bounded (an opener's words, an emphasised
# phrase) or starts once per place (a note's spaces): a server's reply of 10,000 newlines or of
# "*a " repeated took seconds to minutes, growing with the square of its length, and held the
# captioner's actor while it did.
OPENER = re.compile(r"\A(?:(?:sure|certainly|of course|okay|ok|absolutely|alright)[.!,]\s*)?"
                    r"(?:here(?:['\u2019]s| is)\b[^:\n]{0,200}?\b(?:caption|description)\b[^:\n]{0,200}:\s*)?",
                    re.I)
HEADING = re.compile(r"^[ \t]*#{1,6}[ \t].*$", re.M)  # a title ("# Caption"), no part of the caption
# A server whose chat template or tokenizer config is wrong leaks the model's special tokens; one that
# misses the end of the turn goes on with turns the model makes up ("<|im_end|><|im_start|>user ...").
# The reply ends at its first end (or start) of a turn after its first words; other special tokens
# are taken out.
END_OF_TURN = re.compile(r"<\|(?:im_end|im_start|eot_id|eom_id|end|endoftext|end_of_text|start_header_id)\|>"
                         r"|</s>|<(?:end|start)_of_turn>|<eos>")
SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,60}\|>")
# a template with no generation prompt: the model writes its own turn's header first, role name and
# all ("<|im_start|>assistant\n", Llama 3's, Gemma's): the role is no part of the caption
TURN_HEADER = (r"(?:<\|im_start\|>|<\|start_header_id\|>|<start_of_turn>)[ \t]*(?i:assistant|model|gpt|bot)\b"
               r"(?:[ \t]*<\|end_header_id\|>)?")
LEADING_TOKENS = re.compile(rf"\A(?:\s|{TURN_HEADER}|{END_OF_TURN.pattern}|{SPECIAL_TOKEN.pattern})*")
# a code fence (```, ```text, ~~~): a caption wrapped in one is the caption inside it. A line's
# opening ``` goes with a language name that is all its line holds, not with text after it (the
# caption itself: "```A girl smiles.", "```A girl smiles.```"); a ``` that ends a line closes one
FENCE = re.compile(r"^[ \t]*(?:```(?:[ \t]*[\w+#.-]{0,40}[ \t]*$)?|~~~[ \t]*[\w+#.-]{0,40}[ \t]*$)|```[ \t]*$", re.M)
LINE_MARKS = re.compile(r"^[ \t]*(?:[-*\u2022+][ \t]+|\d{1,2}[.)][ \t]+)", re.M)
# a letter or digit right inside the marks: "^_^" and ">_<" are kaomoji, not emphasis
EMPHASIS = re.compile(r"(?<!\w)(\*\*|__|\*|_|`)([^\W_](?:.{0,500}?[^\s_])?)\1(?!\w)")
CLOSING_NOTE = re.compile(r"(?:^[^\S\n]*|(?<=[.!?])\s*)\(?(?:notes?:|let me know\b|i hope (?:this|that)\b|feel free\b"
                          r"|would you like\b|do you want\b)", re.I | re.M)
LABELS = ("Shorter caption:", "Rewritten caption:", "Image caption:", "Caption:", "Description:")


# Where a sentence ends: a full stop, "!" or "?" (closing quotes and brackets with it) before a
# space or the end, or a CJK one, which needs no space after it.
SENTENCE_END = re.compile(r"[.!?\u2026][\"')\]\u201d\u2019]*(?=\s|\Z)"
                          r"|[\u3002\uff01\uff1f][\u300d\u300f\uff09\"\u201d]*")


def whole_reply(text: str) -> str:
    """A reply max_tokens cut off, up to the end of its last whole sentence: its last sentence is
    half said ("... in a field of sunflo"). A reasoning block's sentences are none of the caption's;
    a reply without a whole sentence is left as it is (a short budget's one-sentence caption)."""
    said = REASONING.sub(" ", text)
    ends = [m.end() for m in SENTENCE_END.finditer(said)]
    return said[: ends[-1]] if ends else said


def clean_reply(text: str | None) -> str:
    """A model's reply as a one-paragraph caption (no surrounding quotes, labels or blank lines,
    no control characters; half a UTF-16 pair, which Parquet cannot hold, as "?"), without what
    chat models wrap it in (REASONING, OPENER, markdown, a CLOSING_NOTE)."""
    text = printable(text or "")
    text = text[LEADING_TOKENS.match(text).end():]
    if end := END_OF_TURN.search(text):
        text = text[: end.start()]
    text = SPECIAL_TOKEN.sub("", text)
    text = json_caption(FENCE.sub("", REASONING.sub(" ", text)))
    text = EMPHASIS.sub(r"\2", LINE_MARKS.sub("", HEADING.sub("", text)))
    note = CLOSING_NOTE.search(text)
    if note and text[: note.start()].strip():  # a reply that is all note is left for the checks to refuse
        text = text[: note.start()]
    text = text.strip()
    # until nothing is taken off: a label or opener inside the quotes ('"Caption: A girl."'), or a
    # second opener, was left in the caption, and a caption cleaned again was another (the reply
    # recheck takes a caption that cleaning changes for chat text). A few times at most: "Sure. "
    # said 10,000 times is a hostile reply, and each pass reads all of it
    for _ in range(UNWRAP_PASSES):
        if (unwrapped := unwrap(text)) == text:
            break
        text = unwrapped
    return text


UNWRAP_PASSES = 8


def unwrap(text: str) -> str:
    """`text` without one opener, label and pair of quotes around it (clean_reply)."""
    if (opener := OPENER.match(text)) and opener.end():
        text = text[opener.end():]
        text = text[:1].upper() + text[1:]  # "Sure, a girl smiles." is "A girl smiles."
    for label in LABELS:
        if text[: len(label)].lower() == label.lower():
            text = text[len(label):].strip()
    text = " ".join(text.split())
    # the quotes around the whole reply, not those of a caption that begins and ends with a quote
    # ('"Hello," she says, "welcome."'); an apostrophe inside a word ("girl's") is no quote
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'" \
            and not re.search(rf"(?<!\w){text[0]}|{text[0]}(?!\w)", text[1:-1]):
        text = text[1:-1].strip()
    return text


CAPTION_KEYS = ("caption", "description", "text")


def json_caption(text: str) -> str:
    """The caption of a reply that is a JSON object holding one ({"caption": "A girl smiles."},
    {"description": ...}, or its only text value); any other reply as it is."""
    said = text.strip()
    if not (said.startswith("{") and said.endswith("}")):
        return text
    try:
        value = json.loads(said)
    except (ValueError, RecursionError):
        return text
    if not isinstance(value, dict):
        return text
    fields = {str(k).lower(): v for k, v in value.items()}
    found = [fields[k] for k in CAPTION_KEYS if isinstance(fields.get(k), str)]
    texts = [v for v in fields.values() if isinstance(v, str)]
    return found[0] if found else texts[0] if len(texts) == 1 and len(fields) == 1 else text


# A model declining: never a caption, however it scores ("I am sorry, but as an AI I cannot ...").
# Only at the start of the reply (or "as an AI, I" anywhere): a caption may well hold "sorry" or
# "cannot". "Sorry" and "apologies" decline only when "I" follows ("Sorry. I can't", "My apologies,
# but I cannot"; "Sorry signs hang over the door" is a caption).
# The same in the other languages these models answer in: an apology with "I cannot" (Chinese
# "抱歉，我无法", Spanish "Lo siento, no puedo"), Japanese "申し訳ありませんが" (not
# "申し訳なさそうな", apologetic, a caption's word), and at the start of a reply a Chinese "我不能" /
# "我无法" (I cannot): a caption speaks of the picture, never as "I" (one that quotes "我不能" holds
# it after a quote mark, not first).
DECLINE_ELSEWHERE = (r"(?:很|非常)?(?:抱歉|对不起)[，,、。！!\s]*(?:但是?[，,\s]*)?我(?:无法|不能)"
                     r"|申し訳(?:ありません|ございません)(?:が|。|、)"
                     r"|lo (?:siento|lamento)\W+(?:pero\W+)?no (?:puedo|me es posible)")
REFUSAL = re.compile(r"\A\W*(?:(?:i'?m|i am) (?:sorry|afraid|unable|not able|not comfortable)\b"
                     r"|(?:sorry|(?:my )?apologies)\W+(?:but\W+)?i\b|i apologi[sz]e|unfortunately\W+i\b"
                     r"|i (?:cannot|can't|can not|won't|will not|do not feel|don't feel)\b"
                     rf"|{DECLINE_ELSEWHERE}|我(?:无法|不能))"
                     r"|\bas (?:an ai|a language model)(?: language model| assistant| model)?,? i\b", re.I)
# A decline after a first sentence ("Here is a caption. However, I cannot describe the rest of
# it."): half a caption, or none, with the model's words about it. Later in a reply only a whole
# sentence of declining the task is one: it starts right after a sentence's end (not after a
# quote mark: 'A boy bows. "I'm sorry," he says.' is a caption), says "I" cannot / won't / am not
# comfortable, and what: describe, caption, provide, ... ("a girl who cannot swim" is no
# sentence of "I"; "I cannot determine her name" is a model unsure of something, not declining).
# Where a later sentence starts: after a sentence's end and its spaces, or a line's first
# character. Each place is one start (the spaces possessive, a line's start after no space): a reply
# of 20,000 newlines took 40 s, each of them a start that scanned the rest.
LATER_SENTENCE = r"(?:[.!?\u2026]\s++|[\u3002\uff01\uff1f]\s*+|(?<!\s)\n\s*+)"
LATER_REFUSAL = re.compile(
    rf"{LATER_SENTENCE}(?:(?:however|but|unfortunately|sadly|that said)\W++)?"
    r"(?:(?:i'?m|i am) (?:sorry|afraid)\W++(?:but\W++)?)?"
    r"(?:i (?:cannot|can't|can not|won't|will not|must decline to|do not feel comfortable|don't feel comfortable"
    r"|am not comfortable|am unable to|am not able to)|i'?m (?:unable to|not able to|not comfortable))"
    r"(?:\s++\w++){0,3}?\s++(?:describ|caption|provid|assist|compl[yi]|fulfil|generat|creat|writ|produc|continu"
    r"|elaborat|depict|discuss|engag|go into|help (?:with|you))"
    rf"|{LATER_SENTENCE}(?:(?:但是?|不过|然而)[，,\s]*)?(?:{DECLINE_ELSEWHERE})", re.I)


# A later sentence of "I cannot ..." that the caption gives to someone or something in the picture
# (memes, comic panels and signs speak in the first person, quoted without quote marks as often as
# with): 'I cannot continue, he says.', "I won't discuss it, her shirt reads.", "... is written
# beside her", or a line after "reads:". Only its own sentence is looked at (up to
# ATTRIBUTION_REACH characters from its start): the check stays linear in the reply.
ATTRIBUTED = re.compile(r",\s*(?!(?:as|because|since|which|that|so|but|and|if|though)\b)(?:[\w']+\s+){0,3}"
                        r"(?:says?|said|reads?|writes?|wrote|shouts?|shouted|asks?|asked|exclaims?|whispers?|"
                        r"yells?|cries|cried|thinks?|thought|(?:is|are|was|were) told)\b"
                        r"|\b(?:is|are|was|were) (?:written|printed|shown|displayed)\b"
                        # the same in the languages of DECLINE_ELSEWHERE: "..., dice el cartel", "...，她说",
                        # "...，牌子上写着", "...と書かれている", "...と言っている"
                        r"|,\s*(?:dicen?|dec[ií]a|grita|pregunta|susurra|exclama|se lee|reza)\b"
                        r"|\b(?:est[aá]n?|estaba) escrit[oa]s?\b"
                        r"|[，,、](?!\s*我)[^，,、]{0,6}(?:说(?!明)|說(?!明)|写着|寫著|喊道|问道)"
                        r"|と(?:書かれ|書いて|記され|言っ|言う|言い|叫|話し|つぶや|呟)", re.I)
QUOTED_LINE = re.compile(r"\b(?:says?|said|reads?|read|written|text|bubble|sign)\s*:\s*\Z", re.I)
SENTENCE_STOP = re.compile(r"[.!?\u2026\u3002\uff01\uff1f\n]")
ATTRIBUTION_REACH = 300


# A reply that opens with a quotation and goes on after it opens with the picture's text, not the
# model's words: '"I can't believe it!" shouts a girl', a sign's "“我不能去”，女孩说", "「申し訳
# ありませんが、本日は休業です」と書かれた看板". REFUSAL looks at a reply's start past any quote
# mark (\A\W*, for a decline the model put in quotes): it is looked at after the quotation.
QUOTE_PAIRS = {'"': re.compile(r'"'), "\u201c": re.compile("\u201d"), "'": re.compile(r"'(?!\w)"),
               "\u300c": re.compile("\u300d"), "\u300e": re.compile("\u300f"), "\u00ab": re.compile("\u00bb")}


def after_opening_quotation(said: str) -> int:
    """Where the quotation `said` opens with ends, when a caption goes on after it; 0 when it opens
    with none, or is all one quotation (a decline the model put in quotes)."""
    start = len(said) - len(said.lstrip())
    closing = QUOTE_PAIRS.get(said[start:start + 1])
    found = closing.search(said, start + 1) if closing else None
    if found is None or not any(ch.isalnum() for ch in said[found.end():]):
        return 0
    return found.end()


def refusal(text: str) -> bool:
    said = text.replace("\u2019", "'").replace("\u2018", "'")  # "I\u2019m sorry"
    said = said[after_opening_quotation(said):]
    if REFUSAL.search(said) is not None:
        return True
    for found in LATER_REFUSAL.finditer(said):
        stop = SENTENCE_STOP.search(said, found.end(), found.end() + ATTRIBUTION_REACH)
        sentence = said[found.start() + 1:stop.start() if stop else found.end() + ATTRIBUTION_REACH]
        if not ATTRIBUTED.search(sentence) and not QUOTED_LINE.search(said, max(0, found.start() - 40),
                                                                      found.start()):
            return True
    return False


ECHO_MIN_WORDS = 5  # a prompt sentence this long in a reply is the prompt repeated, not a caption's words


def normal_words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9']+", text.lower()))


class EchoCheck:
    """Whether a reply repeats the prompt instead of captioning: it holds a line of the prompts'
    instructions or the tag block, or it is the draft caption handed back (the template of the
    tags, which a caption is never scored against: it was built from them)."""

    def __init__(self, templates: list[str]) -> None:
        lines = {normal_words(piece) for t in templates for piece in re.split(r"\{[a-z_]+\}|\n|[.;:!?](?:\s|$)", t)}
        self.lines = sorted(line for line in lines if len(line.split()) >= ECHO_MIN_WORDS)

    def why(self, reply: str, draft: str | None = None) -> str | None:
        words = f" {normal_words(reply)} "
        line = next((line for line in self.lines if f" {line} " in words), None)
        if line is not None:
            return f"the reply repeats the prompt ({line!r})"
        if "general tags:" in reply.lower():
            return "the reply repeats the prompt's tag block"
        if draft and words.strip() == normal_words(draft):
            return "the reply is the draft caption it was given, handed back"
        return None
