"""The `vllm` caption backend as a stream: units -> request rows -> ray.data.llm -> replies -> per-unit commit.

A unit is settled by a `ReplayCaptioner` (in a small pool of actors): it runs the shared
caption logic of udfs/caption/caption_unit.py (attempts, scoring, loop-back, rewrite, quality tags)
over the model replies the unit has so far. When that logic asks for replies it has not got
(attempt k of some images, or their rewrites), the actor writes those requests to the unit's
stream folder and stops; when it has all it needs, it writes the unit's parts and commits.

The driver only plans: it sends every pending unit to be settled, then runs one Ray Data pass
per round over the request files (CPU tasks read and shrink the images and build the prompts,
the processor of udfs/caption/vllm_captioner.py runs the model, tasks write each batch's replies next
to the unit's requests) and, counting the small acknowledgements the pass returns, settles
each unit as soon as its last reply is written. Images, prompts and replies never pass
through the driver.

Replies stay in `state/caption-stream/<unit>/` until the unit commits: a unit's id hashes its
inputs and options, so after a kill the next run replays them and asks only for the replies it
lacks. A kill loses at most the requests in flight. Each reply holds its request's digest
(vllm_captioner.request_digest): a committed unit keeps its replies by digest, with its key range,
in the reply cache of udfs/caption/reply_cache.py, and the unit that replaces it (an image added,
removed or changed inside it; an option that changes no request) is answered by them wherever it
asks the same: the CPU tasks find them, and those rows cross the engine as placeholders.
"""

from __future__ import annotations

import json
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray

from store.staging import read_unit_rows
from store.workspace import Workspace
from udfs.caption.caption_images import request_urls, unreadable_message
from udfs.caption.caption_prompts import caption_messages, clean_reply, prompt_for, rewrite_messages
from udfs.caption.caption_unit import TRANSIENT_KINDS, Hint, UnitCaptioner, unit_info
from udfs.caption.openai_transport import EndpointError
from udfs.caption.reply_cache import ReplyCache
from udfs.caption.reply_cache import read_replies as read_kept
from udfs.caption.rewriter import must_keep
from udfs.caption.vllm_captioner import request_digest

STREAM = "state/caption-stream"
REQUEST_SCHEMA = pa.schema([("unit", pa.string()), ("stage", pa.string()), ("key", pa.string()),
                            ("source", pa.string()), ("member", pa.string()), ("member_offset", pa.int64()),
                            ("bytes", pa.int64()), ("seed", pa.int64()),
                            ("text", pa.string()), ("tags", pa.list_(pa.string())),
                            ("categories", pa.list_(pa.string()))])
# error: "" or "<kind>: <message>"; request: the request's digest ("" for a row that was not asked, null
# in the files of a version before it); kept: answered by a reply a replaced unit kept
REPLY_SCHEMA = pa.schema([("stage", pa.string()), ("key", pa.string()), ("caption", pa.string()),
                          ("error", pa.string()), ("request", pa.string()), ("kept", pa.bool_())])
REWRITE = "rewrite"  # the stage name of rewrites; caption attempts are a0, a1, ...
REGION = "region:"  # the stages of 2x2 region captions: "region:top left", ...


class NeedReplies(Exception):
    """The replay reached a stage whose replies a unit has not got: the request rows to send.
    `stage` names the request file; its rows say their own stage (the four regions share a file)."""

    def __init__(self, stage: str, requests: list[dict]) -> None:
        super().__init__(f"{len(requests)} replies of stage {stage} missing")
        self.stage, self.requests = stage, requests

    def joined(self, regions: NeedReplies | None) -> NeedReplies:
        """This caption attempt's requests and the regions' in one file (both show images); a
        rewrite waits for the round after the regions."""
        if regions is None:
            return self
        if self.stage == REWRITE:
            return regions
        return NeedReplies(f"{self.stage}+{regions.stage}", self.requests + regions.requests)


class ReplayRewriter:
    """The rewriter of the stream: rewrites are replies of stage `rewrite`, asked for like captions."""

    def __init__(self, captioner: ReplayCaptioner, keep_categories: list[str]) -> None:
        self.captioner = captioner
        self.keep_categories = set(keep_categories)
        self.name = captioner.opts["rewrite_model"]

    def must_keep(self, tags: list[str], categories: list[str]) -> list[str]:
        return must_keep(tags, categories, self.keep_categories)

    def rewrite(self, rows: list[dict], captions: list[str], keep: list[list[str]]) -> list[str | Exception]:
        asks = [(caption, tags, [], 0) for caption, tags in zip(captions, keep, strict=True)]
        return self.captioner.replayed(REWRITE, rows, asks)


class ReplayCaptioner(UnitCaptioner):
    """Settles units of the stream: replays the caption logic over the unit's staged replies."""

    backend = "vllm"
    needs_tags = False
    sees_image = True

    def __init__(self, workspace: str, options: dict[str, Any]) -> None:
        super().__init__(workspace, options)
        self.replies: dict[tuple[str, str], dict] = {}
        self.unit = ""

    def make_rewriter(self, options: dict[str, Any]):
        if options["rewrite"] == "vllm":
            return ReplayRewriter(self, list(options["rewrite_keep_categories"]))
        return super().make_rewriter(options)

    def backend_name(self, row: dict) -> str:
        return f"vllm:{self.opts['vllm_model']}"

    def caption(self, rows: list[dict], hints: list[Hint], drafts: list[str], attempt: int) -> list[str | Exception]:
        asks = [(draft, hint.tags, hint.categories, hint.seed) for hint, draft in zip(hints, drafts, strict=True)]
        return self.replayed(f"a{attempt}", rows, asks)

    def caption_regions(self, images: list[dict], regions: list[str], hints: list[Hint],
                        drafts: list[str]) -> list[str | Exception]:
        asks = [(draft, hint.tags, hint.categories, hint.seed) for hint, draft in zip(hints, drafts, strict=True)]
        return self.replayed("regions", images, asks, [f"{REGION}{region}" for region in regions])

    def replayed(self, name: str, rows: list[dict], asks: list[tuple],
                 stages: list[str] | None = None) -> list[str | Exception]:
        """The staged replies for `rows`, of stage `name` (or each row's own of `stages`);
        NeedReplies (file `name`) with the requests of those missing."""
        stages = stages or [name] * len(rows)
        missing = [(stage, row, ask) for stage, row, ask in zip(stages, rows, asks, strict=True)
                   if (stage, row["key"]) not in self.replies]
        if missing:
            raise NeedReplies(name, [
                {"unit": self.unit, "stage": stage, "key": row["key"], "source": row.get("source") or "",
                 "member": row.get("member") or "", "member_offset": row.get("member_offset"),
                 "bytes": row.get("bytes"), "seed": seed,
                 "text": text, "tags": tags, "categories": cats}
                for stage, row, (text, tags, cats, seed) in missing])
        out: list[str | Exception] = []
        for stage, row in zip(stages, rows, strict=True):
            reply = self.replies[(stage, row["key"])]
            if reply["error"]:
                kind, _, message = reply["error"].partition(": ")
                out.append(EndpointError(kind, message))
            else:
                out.append(reply["caption"])
        return out

    def endpoints(self) -> list:
        """The `openai` rewriter's endpoint (the stream's own rewriter asks through the stream)."""
        endpoint = getattr(self.rewriter, "endpoint", None)
        return [endpoint] if endpoint is not None else []

    def settle(self, unit: str, path: str, previous: list[str] = (), first: bool = False) -> dict:
        """Commit the unit (its rows in the job's staged file `path`) if its replies are all there:
        {"unit", "info"}; else write the requests it lacks: {"unit", "stage", "requests", "path"}.
        Both say in "earlier" how many requests the replies of an earlier run (killed, or one a
        passing failure left the unit to) answered, at the `first` settle of this run.
        An `openai` rewriter asks through the unit's reply cache, as in the openai backend: what a
        killed run or the `previous` units it replaces got is not asked again."""
        self.unit = unit
        table = read_unit_rows(self.ws, path)
        self.replies = read_replies(self.ws, unit)
        earlier = sum(bool(r["request"]) for r in self.replies.values()) if first else 0
        cache, asked = self.keep_replies(unit, list(previous)), self.request_counts()
        need = None
        try:  # the regions are asked for with the first attempt: one round of the stream for both
            regions, region_errors = self.region_rows(table)
        except NeedReplies as missing:
            need = missing
        try:
            captions, errors = self.caption_unit(table)
        except NeedReplies as missing:
            need = missing.joined(need)
        if need is not None:
            requests = f"{self.ws.base}/{STREAM}/{unit}/requests/{need.stage}.parquet"
            self.ws.write_parquet(requests, pa.Table.from_pylist(need.requests, REQUEST_SCHEMA))
            return {"unit": unit, "stage": need.stage, "requests": len(need.requests), "path": requests,
                    "earlier": earlier}
        errors += region_errors
        info = unit_info(table, captions, errors, 0.0, len(regions))
        info["requests"] = dict(self.request_counts() - asked)  # the openai rewriter's (the driver adds the stream's)
        self.keep_for_later(unit, table, cache)
        self.commit(unit, captions, errors, regions, info)
        self.forget_replies(unit, info)
        return {"unit": unit, "info": info, "earlier": earlier}

    def keep_for_later(self, unit: str, table: pa.Table, cache: ReplyCache | None) -> None:
        """Before the unit commits: its replies by request digest, with its images' key range, in its
        reply cache (with the openai rewriter's, if any), for a unit that replaces it to be answered
        by them (failures are asked again)."""
        cache = cache or ReplyCache(self.ws, unit)  # a unit done again after a passing failure has kept some
        cache.add({r["request"]: r["caption"] for r in self.replies.values()
                   if r["request"] and not r["error"] and r["caption"] is not None
                   and r["request"] not in cache.replies})
        cache.settle(pc.min(table["key"]).as_py(), pc.max(table["key"]).as_py())

    def forget_replies(self, unit: str, info: dict) -> None:
        """A committed unit's stream folder goes; with passing failures (the next run does the
        unit again) its other replies stay, so that only the failed requests are asked again."""
        folder = f"{self.ws.base}/{STREAM}/{unit}"
        kept = [r for r in self.replies.values()
                if r["error"].partition(": ")[0] not in TRANSIENT_KINDS] if info["transient"] else []
        self.ws.fs.delete_dir(folder)  # killed before the write below: the next run asks them all again
        if kept:
            self.ws.write_parquet(f"{folder}/replies/{uuid.uuid4().hex}.parquet",
                                  pa.Table.from_pylist(kept, REPLY_SCHEMA))


def read_replies(ws: Workspace, unit: str) -> dict[tuple[str, str], dict]:
    """(stage, key) -> reply of every reply file the unit has (from this run or a killed one)."""
    folder = f"{ws.base}/{STREAM}/{unit}/replies"
    selector = pafs.FileSelector(folder, allow_not_found=True)
    replies: dict[tuple[str, str], dict] = {}
    for info in sorted(ws.fs.get_file_info(selector), key=lambda i: i.path):
        if info.is_file and info.base_name.endswith(".parquet") and not info.base_name.startswith("."):
            for row in pq.read_table(info.path, filesystem=ws.fs, schema=REPLY_SCHEMA).to_pylist():
                replies.setdefault((row["stage"], row["key"]), row)
    return replies


# ---- the stream's CPU stages ------------------------------------------------------------------
def request_messages(batch: pa.Table, options: dict[str, Any], workspace: str = "",
                     previous: dict[str, list[str]] | None = None) -> pa.Table:
    """Request rows -> chat messages: caption stages with the image (read, shrunk, a data URL), region
    stages with the region's crop, rewrites as text; with each its digest, and the reply that the
    units its unit replaces (`previous`: unit -> their ids) kept of the same request, if any."""
    rows = batch.to_pylist()
    regions = [r["stage"][len(REGION):] if r["stage"].startswith(REGION) else "" for r in rows]
    shown = [i for i, r in enumerate(rows) if r["stage"] != REWRITE] if options["send_images"] else []
    overlap = float(options["region_overlap"]) if any(regions) else 0.0  # annotate's, passed on by the job
    urls = dict(zip(shown, request_urls([rows[i]["source"] for i in shown], [rows[i]["member"] for i in shown],
                                        [regions[i] for i in shown], int(options["image_max_side"]), overlap,
                                        [rows[i].get("member_offset") for i in shown],
                                        [rows[i].get("bytes") for i in shown]),
                    strict=True))
    borrowed = kept_replies(workspace, previous or {}, {r["unit"] for r in rows})
    messages, errors, digests, kept = [], [], [], []
    for i, r in enumerate(rows):
        if r["stage"] == REWRITE:
            asked = rewrite_messages(r["text"], r["tags"])
        elif options["send_images"] and urls.get(i) is None:
            messages.append("")
            errors.append(f"unreadable_image: {unreadable_message(r)}")
            digests.append("")
            kept.append(None)
            continue
        else:
            asked = caption_messages(r["tags"], r["categories"], r["text"], urls.get(i),
                                     template=prompt_for(options, regions[i]), region=regions[i])
        messages.append(json.dumps(asked))
        errors.append("")
        digests.append(request_digest(options, r["stage"] == REWRITE, asked, r["seed"]))
        # kept as the cleaner of its day left it: cleaned as a reply is now, as the openai backend's
        # kept replies are (a unit the reply checks run again is answered by its own)
        reply = borrowed.get(r["unit"], {}).get(digests[-1])
        kept.append(None if reply is None else clean_reply(reply))
    return pa.table({"unit": batch["unit"], "stage": batch["stage"], "key": batch["key"], "seed": batch["seed"],
                     "messages": pa.array(messages, pa.string()), "error": pa.array(errors, pa.string()),
                     "request": pa.array(digests, pa.string()), "kept": pa.array(kept, pa.string())})


def kept_replies(workspace: str, previous: dict[str, list[str]], units: set[str]) -> dict[str, dict[str, str]]:
    """{unit: {request digest: reply}} that the units `previous` names for each of `units` kept."""
    wanted = {unit: previous[unit] for unit in units if previous.get(unit)}
    if not wanted:
        return {}
    ws = Workspace(workspace, create=False)
    return {unit: {rid: reply for other in others for rid, reply in read_kept(ws, other).items()}
            for unit, others in wanted.items()}


def write_replies(batch: pa.Table, workspace: str) -> pa.Table:
    """Write the batch's replies into their units' folders; return one acknowledgement per unit."""
    ws = Workspace(workspace, create=False)
    errors = batch["error"].to_pylist()
    if "__inference_error__" in batch.column_names:  # rows the engine failed skip postprocess
        failed = batch["__inference_error__"].to_pylist()
        errors = [f"model_error: {f}" if f else e for e, f in zip(errors, failed, strict=True)]
    captions = batch["caption"] if "caption" in batch.column_names else pa.nulls(batch.num_rows, pa.string())
    kept = pc.is_valid(batch["kept"])
    replies = pa.table({"unit": batch["unit"], "stage": batch["stage"], "key": batch["key"],
                        "caption": captions.cast(pa.string()), "error": pa.array(errors, pa.string()),
                        "request": batch["request"].cast(pa.string()), "kept": kept})
    acks: dict[str, list] = {"unit": [], "rows": [], "sent": [], "kept": []}
    for unit in pc.unique(replies["unit"]).to_pylist():
        mine = replies.filter(pc.equal(replies["unit"], unit)).select(REPLY_SCHEMA.names)
        ws.write_parquet(f"{ws.base}/{STREAM}/{unit}/replies/{uuid.uuid4().hex}.parquet", mine.cast(REPLY_SCHEMA))
        reused = pc.sum(mine["kept"].cast(pa.int64())).as_py() or 0
        asked = pc.sum(pc.not_equal(mine["request"], "").cast(pa.int64())).as_py() or 0  # not an unreadable one
        acks["unit"].append(unit)
        acks["rows"].append(mine.num_rows)
        acks["sent"].append(asked - reused)
        acks["kept"].append(reused)
    return pa.table({name: pa.array(values, pa.string() if name == "unit" else pa.int64())
                     for name, values in acks.items()})


# ---- the driver ---------------------------------------------------------------------------------
@ray.remote
class UnitSettler:
    def __init__(self, workspace: str, options: dict[str, Any]) -> None:
        self.captioner = ReplayCaptioner(workspace, options)

    def settle(self, unit: str, path: str, previous: list[str], first: bool) -> dict:
        return self.captioner.settle(unit, path, previous, first)


class StreamDriver:
    """Plans the rounds, counts acknowledgements, hands units to the settlers; holds no rows."""

    def __init__(self, ws: Workspace, units: list[dict], opts: dict[str, Any],
                 on_settled: Callable[[int], None]) -> None:
        self.ws, self.opts, self.on_settled = ws, opts, on_settled  # on_settled(images): a unit committed
        self.inputs = {u["unit"]: u["path"] for u in units}  # the files the job staged the units' rows in
        # the committed units each replaces, whose kept replies answer its requests (jobs/caption.reply_sources)
        self.previous = {u["unit"]: list(u.get("previous") or []) for u in units if u.get("previous")}
        self.asked: dict[str, Counter[str]] = {}  # requests sent and answered by kept replies, by unit
        # the settlers mostly wait for the engine; a full CPU each would starve the stream's tasks
        self.settlers = [UnitSettler.options(num_cpus=0.25).remote(ws.root, opts)
                         for _ in range(max(1, min(int(opts["concurrency"]), len(units))))]
        self.in_flight: dict[ray.ObjectRef, str] = {}
        self.requests: list[dict] = []
        self.infos: list[dict] = []
        self._next = 0
        self.settled: set[str] = set()  # units settled at least once in this run

    def run(self) -> list[dict]:
        remove_stale_streams(self.ws, set(self.inputs))
        for unit in self.inputs:
            self.settle(unit)
        self.harvest(wait=True)
        for _ in range(int(self.opts["max_attempts"]) + 2):  # attempts (regions with the first), the rewrite, a spare
            if not self.requests:
                return self.infos
            requests, self.requests = self.requests, []
            for rewrite in (False, True):
                group = [r for r in requests if (r["stage"] == REWRITE) == rewrite]
                if group:
                    self.run_pass(group, rewrite)
        raise RuntimeError(f"caption stream: {len(self.requests)} units still asking for replies after every round")

    def settle(self, unit: str) -> None:
        settler = self.settlers[self._next % len(self.settlers)]
        self._next += 1
        first = unit not in self.settled
        self.settled.add(unit)
        self.in_flight[settler.settle.remote(unit, self.inputs[unit], self.previous.get(unit, []), first)] = unit

    def harvest(self, wait: bool) -> None:
        """Collect settled units (all of them when `wait`): commits counted, requests kept for the next round."""
        while self.in_flight:
            ready, _ = ray.wait(list(self.in_flight), num_returns=len(self.in_flight) if wait else 1,
                                timeout=None if wait else 0)
            if not ready:
                return
            for ref in ready:
                del self.in_flight[ref]
                result = ray.get(ref)
                # requests the replies of an earlier run answered: "kept from an earlier run", as in
                # the openai backend (they were counted only where a replaced unit kept them)
                self.asked.setdefault(result["unit"], Counter()).update(reused=result.pop("earlier", 0))
                if "info" in result:
                    # what this run asked for it (its summary's requests): the stream's, the openai rewriter's
                    requests = Counter(result["info"].get("requests") or {})
                    requests.update(self.asked.pop(result["unit"], {}))
                    result["info"]["requests"] = dict(requests)
                    self.infos.append(result["info"])
                    self.on_settled(int(result["info"]["images"]))
                    self.ws.publish_now_and_then()
                else:
                    self.requests.append(result)

    def run_pass(self, group: list[dict], rewrite: bool) -> None:
        """One Ray Data pass over the request files of `group`; each unit settles on its last reply."""
        from udfs.caption.vllm_captioner import build_processor

        expected = {r["unit"]: int(r["requests"]) for r in group}
        ds = ray.data.read_parquet([r["path"] for r in group], filesystem=self.ws.fs, schema=REQUEST_SCHEMA)
        previous = {unit: self.previous[unit] for unit in expected if unit in self.previous}
        ds = ds.map_batches(request_messages, batch_format="pyarrow", batch_size=int(self.opts["vllm_batch_size"]),
                            fn_kwargs={"options": self.opts, "workspace": self.ws.root, "previous": previous},
                            num_cpus=0.5)
        ds = build_processor(self.opts, rewrite=rewrite)(ds)
        ds = ds.map_batches(write_replies, batch_format="pyarrow", batch_size=None,
                            fn_kwargs={"workspace": self.ws.root}, num_cpus=0.25)
        seen: Counter[str] = Counter()
        for acks in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for ack in acks.to_pylist():
                unit = ack["unit"]
                seen[unit] += ack["rows"]
                self.asked.setdefault(unit, Counter()).update(sent=ack["sent"], reused=ack["kept"])
                if seen[unit] == expected[unit]:
                    self.settle(unit)
            self.harvest(wait=False)
        for unit in expected:  # a unit short of replies asks again for the ones it lacks
            if seen[unit] != expected[unit]:
                self.settle(unit)
        self.harvest(wait=True)


def remove_stale_streams(ws: Workspace, current: set[str]) -> None:
    """Delete the stream folders of units no longer planned (their inputs or options changed)."""
    selector = pafs.FileSelector(f"{ws.base}/{STREAM}", allow_not_found=True)
    for info in ws.fs.get_file_info(selector):
        if info.type == pafs.FileType.Directory and info.base_name not in current:
            ws.fs.delete_dir(info.path)


def caption_units_stream(ws: Workspace, units: list[dict], opts: dict[str, Any],
                         on_settled: Callable[[int], None]) -> list[dict]:
    """Caption `units` through the stream; the infos of the units committed."""
    return StreamDriver(ws, units, opts, on_settled).run()
