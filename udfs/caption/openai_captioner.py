"""The `openai` caption backend: a map_batches class that calls an OpenAI-compatible endpoint.

Each actor keeps up to `max_concurrency` requests in flight (udfs/caption/openai_transport.py) and
routes images whose rating is in `route_ratings` to a second endpoint when one is configured.
"""

from __future__ import annotations

from typing import Any

from udfs.caption.caption_images import request_urls, unreadable_message
from udfs.caption.caption_prompts import caption_messages, clean_reply, prompt_for
from udfs.caption.caption_unit import Hint, UnitCaptioner
from udfs.caption.openai_transport import ChatEndpoint, EndpointError


def endpoint_from(options: dict[str, Any], prefix: str = "") -> ChatEndpoint:
    """The endpoint of options `<prefix>base_url`, `<prefix>model`, `<prefix>api_key_env`."""
    return ChatEndpoint(options[f"{prefix}base_url"], options[f"{prefix}model"], options[f"{prefix}api_key_env"],
                        timeout_s=float(options["timeout_s"]), max_retries=int(options["max_retries"]),
                        backoff_s=float(options["backoff_s"]), max_concurrency=int(options["max_concurrency"]))


class OpenAICaptioner(UnitCaptioner):
    """VLM captions over HTTP: the image, the three-line tag block and the template draft."""

    backend = "openai"
    needs_tags = False
    sees_image = True

    def __init__(self, workspace: str, options: dict[str, Any]) -> None:
        super().__init__(workspace, options)
        self.main = endpoint_from(options)
        self.routed = endpoint_from(options, "route_") if options.get("route_base_url") else None
        self.route_ratings = set(options.get("route_ratings") or [])

    def endpoints(self) -> list[ChatEndpoint]:
        return [*super().endpoints(), self.main, *([self.routed] if self.routed is not None else [])]

    def endpoint_for(self, row: dict) -> ChatEndpoint:
        if self.routed is not None and (row.get("rating") or "") in self.route_ratings:
            return self.routed
        return self.main

    def backend_name(self, row: dict) -> str:
        return f"openai:{self.endpoint_for(row).model}"

    def caption(self, rows: list[dict], hints: list[Hint], drafts: list[str], attempt: int) -> list[str | Exception]:
        images = self._image_urls(rows) if self.opts["send_images"] else [None] * len(rows)
        return self._ask(rows, hints, drafts, images, [""] * len(rows))

    def caption_regions(self, images: list[dict], regions: list[str], hints: list[Hint],
                        drafts: list[str]) -> list[str | Exception]:
        return self._ask(images, hints, drafts, self._image_urls(images, regions), regions)

    def _ask(self, rows: list[dict], hints: list[Hint], drafts: list[str], urls: list[str | None],
             regions: list[str]) -> list[str | Exception]:
        """One request per row (its image or region crop, hint and draft), each to its endpoint."""
        results: list[str | Exception | None] = [None] * len(rows)
        by_endpoint: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            if self.opts["send_images"] and urls[i] is None:
                message = unreadable_message(row)
                results[i] = EndpointError("unreadable_image", message)
            else:
                by_endpoint.setdefault(id(self.endpoint_for(row)), []).append(i)
        for indices in by_endpoint.values():
            endpoint = self.endpoint_for(rows[indices[0]])
            requests = [{"messages": caption_messages(
                            hints[i].tags, hints[i].categories, drafts[i], urls[i], region=regions[i],
                            template=prompt_for(self.opts, regions[i])),
                         "max_tokens": int(self.opts["max_tokens"]), "temperature": float(self.opts["temperature"]),
                         "seed": hints[i].seed} for i in indices]
            for i, reply in zip(indices, endpoint.chat_many(requests), strict=True):
                results[i] = clean_reply(reply) if isinstance(reply, str) else reply
        return results

    def _image_urls(self, rows: list[dict], regions: list[str] | None = None) -> list[str | None]:
        """What each request shows: the row's image, or its region `regions[i]` when given."""
        overlap = float(self.opts["region_overlap"]) if regions else 0.0  # annotate's, passed on by the job
        return request_urls([r.get("source") or "" for r in rows], [r.get("member") or "" for r in rows],
                            regions or [""] * len(rows), int(self.opts["image_max_side"]), overlap,
                            [r.get("member_offset") for r in rows], [r.get("bytes") for r in rows])
