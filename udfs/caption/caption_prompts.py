"""Prompts of the VLM captioners and of the rewriter (the same for the vLLM and OpenAI transports)."""

from __future__ import annotations

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


def clean_reply(text: str | None) -> str:
    """A model's reply as a one-paragraph caption (no surrounding quotes, labels or blank lines,
    no control characters; half a UTF-16 pair, which Parquet cannot hold, as "?")."""
    text = printable(text or "").strip()
    for label in ("Shorter caption:", "Caption:"):
        if text.startswith(label):
            text = text[len(label):].strip()
    text = " ".join(text.split())
    if len(text) > 1 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text
