"""The review web app (Starlette, server-rendered Jinja2 pages, a little plain JS; no build step).

Pages: / (the grid), /image?key= (one image). JSON API: GET /api/images, GET /api/images/{key},
POST /api/edits, POST /api/bulk, POST /api/undo. Images: /thumb?key=, /original?key=.

Safety: a key from a request is only ever looked up in the workspace's tables; the filter is
checked as export.where is; every value reaches SQL as a parameter; pages are autoescaped. With a
token, every request must carry it (cookie, `Authorization: Bearer`, or `?token=` once). On loopback,
requests must name this server's host (DNS rebinding; elsewhere the token guards them), and POSTs must
be JSON (a cross-site form cannot send that without a CORS preflight, which this server never grants).
No other site may show a page in a frame (clickjacking), nor have the browser fetch from it
(Sec-Fetch-Site): from another site only a link opened to a page is served.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from pathlib import Path
from urllib.parse import urlencode

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from jobs.config import Config, ConfigError
from review.details import image_details
from review.edits import EditLog, EditRequest
from review.image_bytes import Thumbnails, image_bytes
from review.selection import Filters, ReviewIndex
from store.lock import WorkspaceBusy
from store.uris import StoreError, redacted
from store.workspace import Workspace

HERE = Path(__file__).resolve().parent
PAGE = 60  # grid page size
MAX_LIMIT = 500
# The largest edit is ingest.max_tags tags of max_tag_chars characters (each up to 6 bytes as a
# JSON escape) and a caption: a few MB. A body past this is not read (it was read whole, any size).
MAX_BODY = 16 << 20
THUMB_SIZE = 256
MISSING = "image missing from its source, or not of the size ingest saw (rewritten since ingest?)"
# The fields each POST takes: any other is refused, not ignored (a misspelt filter of a bulk action
# left it to every image of the workspace).
EDIT_FIELDS = frozenset({"key", "add_tags", "remove_tags", "caption", "exclude", "character", "not_duplicate"})
FILTER_TEXTS = ("where", "character", "group", "tag")
FILTER_FLAGS = ("flagged", "duplicates", "errors", "excluded", "edited")
BULK_FIELDS = frozenset({*FILTER_TEXTS, *FILTER_FLAGS, "add_tags", "remove_tags", "exclude", "preview"})
UNDO_FIELDS = frozenset({"batch"})
IMAGES_FIELDS = frozenset({*FILTER_TEXTS, *FILTER_FLAGS, "after", "limit"})  # GET /api/images
# a quick filter's values (a checkbox sends "1"); any other is refused, not read as off (which
# left a bulk action to every image)
FLAG_TEXTS = frozenset({"", "0", "1", "false", "true", "off", "on", "no", "yes"})
MEDIA_TYPES = {"jpeg": "image/jpeg", "jpg": "image/jpeg", "png": "image/png", "webp": "image/webp",
               "gif": "image/gif", "bmp": "image/bmp", "tiff": "image/tiff", "avif": "image/avif"}


class ReviewApp:
    """The app's state: the workspace, its review table, the edit log and the thumbnails."""

    def __init__(self, cfg: Config, ws: Workspace, token: str | None = None) -> None:
        self.cfg, self.ws, self.token = cfg, ws, token
        self.max_tag_chars = int(cfg["ingest"]["max_tag_chars"])  # added tags are bounded as ingest's
        self.max_tags = int(cfg["ingest"]["max_tags"])  # and so are the tags of an image
        self.max_caption_chars = int(cfg["caption"]["max_caption_chars"])  # a caption as a captioner's
        self.index = ReviewIndex(ws)
        self.log = EditLog(ws)
        thumbs = Path(ws.base) / "review" / "thumbs" if ws.local else Path.home() / ".cache" / "booruset" / "thumbs"
        # a picture ingest took through a link out of its folder is read as export reads it
        self.follow_links_out = bool(cfg["ingest"]["follow_links_out"])
        self.thumbs = Thumbnails(thumbs, THUMB_SIZE, self.follow_links_out)
        self.templates = Jinja2Templates(directory=str(HERE / "templates"))  # autoescapes .html
        self.templates.env.filters["redacted"] = redacted  # an input's address may name its credentials

    # ---- pages --------------------------------------------------------------------------
    def grid(self, request: Request) -> Response:
        filters = filters_of(request.query_params)
        after = request.query_params.get("after") or None
        error, rows, following, previous = None, [], None, None
        try:
            rows, following = self.index.page(filters, after, PAGE)
            previous = self.index.before(filters, rows[0]["key"], PAGE) if after and rows else None
        except ConfigError as exc:
            error = str(exc)
        query = filter_query(filters)
        return self.templates.TemplateResponse(request, "grid.html", {
            "rows": rows, "filters": filters, "error": error, "query": query,
            "next": f"?{query}&{urlencode({'after': following})}" if following else None,
            "previous": None if previous is None else f"?{query}&{urlencode({'after': previous})}",
            "total": self.index.total(), "build_seconds": self.index.build_seconds})

    def image(self, request: Request) -> Response:
        key = request.query_params.get("key", "")
        filters = filters_of(request.query_params)
        details = self.details(key)
        if details is None:
            return PlainTextResponse("no such image in this workspace", status_code=404)
        try:
            previous, following = self.index.neighbours(filters, key)
        except ConfigError:
            previous = following = None
        query = filter_query(filters)
        return self.templates.TemplateResponse(request, "image.html", {
            **details, "key": key, "query": query,
            "previous": None if previous is None else f"image?{urlencode({'key': previous})}&{query}",
            "next": None if following is None else f"image?{urlencode({'key': following})}&{query}",
            "grid": f"./?{query}"})

    def thumb(self, request: Request) -> Response:
        row = self.index.row(request.query_params.get("key", ""))
        if row is None:
            return PlainTextResponse("no such image", status_code=404)
        try:
            data = self.thumbs.get(row["key"], row["sha256"], row["source"], row["member"], row.get("member_offset"),
                                   row.get("bytes"))
        except StoreError as exc:  # the input's object storage does not answer: not the image's fault
            return PlainTextResponse(str(exc), status_code=503)
        except Exception as exc:  # noqa: BLE001 - an undecodable image: say so, the page goes on
            return PlainTextResponse(f"cannot make a thumbnail: {type(exc).__name__}", status_code=422)
        if data is None:
            return PlainTextResponse(MISSING, status_code=404)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    def original(self, request: Request) -> Response:
        row = self.index.row(request.query_params.get("key", ""))
        if row is None:
            return PlainTextResponse("no such image", status_code=404)
        try:
            data = image_bytes(row["source"], row["member"], row.get("member_offset"), self.follow_links_out,
                               row.get("bytes"))
        except StoreError as exc:  # the input's object storage does not answer: not missing, unavailable
            return PlainTextResponse(str(exc), status_code=503)
        if data is None:
            return PlainTextResponse(MISSING, status_code=404)
        media = MEDIA_TYPES.get(str(row["format"]).lower(), "application/octet-stream")
        # the bytes are the user's files: never let a browser run them as a page
        return Response(data, media_type=media, headers={"X-Content-Type-Options": "nosniff",
                                                         "Content-Security-Policy": "sandbox"})

    # ---- JSON API -----------------------------------------------------------------------
    def api_images(self, request: Request) -> Response:
        if error := query_error(request.query_params):
            return JSONResponse({"error": error}, status_code=400)
        filters = filters_of(request.query_params)
        try:
            limit = min(MAX_LIMIT, max(1, int(request.query_params.get("limit", PAGE))))
        except ValueError:
            return JSONResponse({"error": "limit must be a number"}, status_code=400)
        try:
            rows, following = self.index.page(filters, request.query_params.get("after") or None, limit)
        except ConfigError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse({"images": [plain(without_credentials(r)) for r in rows], "next": following})

    def api_image(self, request: Request) -> Response:
        details = self.details(request.path_params["key"])
        if details is None:
            return JSONResponse({"error": "no such image"}, status_code=404)
        return JSONResponse(plain({**details, "row": without_credentials(details["row"])}))

    async def api_edits(self, request: Request) -> Response:
        return await self.in_thread(request, self.edit)

    async def api_bulk(self, request: Request) -> Response:
        return await self.in_thread(request, self.bulk)

    async def api_undo(self, request: Request) -> Response:
        return await self.in_thread(request, self.undo)

    async def in_thread(self, request: Request, action) -> Response:
        """The JSON body, then `action(body)` in a worker thread: DuckDB and the file writes block,
        and a rebuild of the review table takes seconds that the event loop must not wait out."""
        body = await json_body(request)
        if isinstance(body, Response):
            return body
        return await run_in_threadpool(action, body)

    def edit(self, body: dict) -> Response:
        """{key, add_tags, remove_tags, caption, exclude, character, not_duplicate}: the edits of one image."""
        if error := unknown_fields(body, EDIT_FIELDS):
            return JSONResponse({"error": error}, status_code=400)
        key = body.get("key")
        with self.index.lock:  # the row the changes are made from is the one they replace
            row = self.index.row(key) if isinstance(key, str) else None
            if row is None:
                return JSONResponse({"error": "no such image"}, status_code=404)
            try:
                changes = EditRequest.from_json(body, self.max_tag_chars, self.max_caption_chars,
                                                self.max_tags).changes(row)
            except ValueError as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            return self.write(changes)

    def bulk(self, body: dict) -> Response:
        """{filter fields..., add_tags, remove_tags, exclude, preview}: the count, or the edits."""
        wrong = [name for name in FILTER_TEXTS if body.get(name) is not None and not isinstance(body[name], str)]
        not_flags = [name for name in FILTER_FLAGS if not is_flag(body.get(name))]
        # a preview that is not a bool is refused: null or 0 applied the action to every image of the filter
        preview = body.get("preview", True)
        if error := (unknown_fields(body, BULK_FIELDS) or (wrong and f"{wrong[0]} must be text (a filter)")
                     or (not_flags and f"{not_flags[0]} must be true or false (a quick filter)")
                     or (not isinstance(preview, bool) and "preview must be true or false")):
            return JSONResponse({"error": error}, status_code=400)
        with self.index.lock:
            try:
                filters = filters_of(body)
                edit = EditRequest.from_json({k: body.get(k) for k in ("add_tags", "remove_tags", "exclude")},
                                             self.max_tag_chars, max_tags=self.max_tags)
                if preview:
                    return JSONResponse({"count": self.index.count(filters)})
                wanted = ("key", "tags", "caption", "caption_edited", "excluded", "characters")
                changes = [c for row in self.index.rows(filters, wanted) for c in edit.changes(row)]
            except (ConfigError, ValueError) as exc:
                return JSONResponse({"error": str(exc)}, status_code=400)
            return self.write(changes)

    def undo(self, body: dict) -> Response:
        """{batch}: the edits that take back what that batch still decides."""
        if error := unknown_fields(body, UNDO_FIELDS):
            return JSONResponse({"error": error}, status_code=400)
        batch = body.get("batch")
        if not isinstance(batch, str) or not batch:
            return JSONResponse({"error": "batch must be the id an edit returned"}, status_code=400)
        # worked out with the workspace held (EditLog.undo): not from this server's table, which
        # lacks another server's edit written meanwhile
        return self.written(lambda: self.log.undo(batch),
                            nothing="nothing of that batch to undo (unknown, or edited since)")

    def write(self, changes: list[dict]) -> Response:
        return self.written(lambda: (self.log.append(changes), changes))

    def written(self, append, nothing: str | None = None) -> Response:
        """The answer to `append()`, which writes a batch of edits and returns its id and edits
        (`nothing`: a 404 that says so when there were none)."""
        with self.index.lock:  # one edit at a time, and no page read between the write and the refresh
            before = self.index.generation
            try:
                batch, changes = append()
            except WorkspaceBusy as exc:
                return JSONResponse({"error": f"{exc}; edits are possible again when it ends"}, status_code=409)
            except OSError as exc:  # a workspace this server may read but not write (read-only keys)
                return JSONResponse({"error": f"the edit could not be written to the workspace: {exc}"},
                                    status_code=503)
            if batch:
                self.index.after_edit(sorted({c["key"] for c in changes}), before)
        if nothing and not changes:
            return JSONResponse({"error": nothing}, status_code=404)
        return JSONResponse({"batch": batch, "edits": len(changes), "images": len({c["key"] for c in changes})})

    def details(self, key: str) -> dict | None:
        return image_details(self.index, key, self.cfg["export"], self.cfg["curate"]["cluster_model"])

    # ---- the ASGI app -------------------------------------------------------------------
    def asgi(self, hosts: list[str]) -> Starlette:
        routes = [Route("/", self.grid), Route("/image", self.image), Route("/thumb", self.thumb),
                  Route("/original", self.original), Route("/api/images", self.api_images),
                  Route("/api/images/{key:path}", self.api_image),
                  Route("/api/edits", self.api_edits, methods=["POST"]),
                  Route("/api/bulk", self.api_bulk, methods=["POST"]),
                  Route("/api/undo", self.api_undo, methods=["POST"]),
                  Route("/static/review.js", static_file("review.js", "text/javascript")),
                  Route("/static/review.css", static_file("review.css", "text/css"))]
        app = Starlette(routes=routes, middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)])
        return NoFraming(OwnSiteOnly(TokenCheck(app, self.token) if self.token else app))


class NoFraming:
    """ASGI middleware: no response of this server is shown in another site's frame. A loopback
    server needs no token, so a page framed invisibly over another site's buttons (clickjacking)
    would take the person's clicks and keys as their own edits."""

    HEADERS = [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'")]

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def framed(message) -> None:
            if message["type"] == "http.response.start":  # beside a response's own policy (/original's sandbox)
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)
        return await self.app(scope, receive, framed)


class TokenCheck:
    """ASGI middleware: every request carries the token (a cookie once `?token=` was given)."""

    def __init__(self, app, token: str) -> None:
        self.app, self.token = app, token
        # a browser keeps one cookie per name and host whatever the port: named after the token, the
        # cookie of another review server on this host (another token) does not replace this one
        self.cookie = f"booruset_review_{hashlib.sha256(token.encode()).hexdigest()[:12]}"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = Request(scope)
        given = (request.query_params.get("token") or request.cookies.get(self.cookie)
                 or request.headers.get("authorization", "").removeprefix("Bearer ").strip())
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            return await PlainTextResponse("token required: open the address booruset review printed",
                                           status_code=401)(scope, receive, send)
        if request.query_params.get("token"):  # first visit: keep it in a cookie, drop it from the address
            response = RedirectResponse(str(request.url.remove_query_params("token")), status_code=303)
            # lax, not strict: a browser sends no strict cookie in a navigation another site started
            # (the address clicked in a web terminal, this redirect included, every reload of it);
            # what another site could do with a lax one, OwnSiteOnly refuses but for opening a page
            response.set_cookie(self.cookie, self.token, httponly=True, samesite="lax")
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class OwnSiteOnly:
    """ASGI middleware: a request the browser says another site made (Sec-Fetch-Site) is refused,
    but for a link opened to a page. Any web page could have the browser GET from a loopback
    server, which needs no token: its SQL filter ran over the dataset (how long the answer took told
    the page what the tables hold) and its images showed the person's pictures. A request without
    the header (curl, a script, an old browser) is not a browser's cross-site one to judge."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Request(scope).headers
        link = (headers.get("sec-fetch-mode") == "navigate" and headers.get("sec-fetch-dest") == "document"
                and scope["method"] in ("GET", "HEAD"))
        if headers.get("sec-fetch-site") in ("cross-site", "same-site") and not link:
            return await PlainTextResponse("refused: a request another site made", status_code=403)(
                scope, receive, send)
        return await self.app(scope, receive, send)


def static_file(name: str, media_type: str):
    data = (HERE / "static" / name).read_bytes()

    def serve(_: Request) -> Response:
        return Response(data, media_type=media_type)
    return serve


async def json_body(request: Request) -> dict | Response:
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        return JSONResponse({"error": "send JSON (Content-Type: application/json)"}, status_code=415)
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > MAX_BODY:
            return JSONResponse({"error": f"the body is over {MAX_BODY} bytes: no edit is that large"},
                                status_code=413)
    try:
        body = json.loads(bytes(data))
    except (ValueError, RecursionError):  # RecursionError: thousands of nested brackets (a 500 before)
        return JSONResponse({"error": "the body is not JSON"}, status_code=400)
    return body if isinstance(body, dict) else JSONResponse({"error": "send a JSON object"}, status_code=400)


def unknown_fields(body: dict, known: frozenset[str]) -> str | None:
    """The reason to refuse a body with a field `known` lacks (None: all are known)."""
    unknown = sorted(set(body) - known)
    return f"unknown field {unknown[0]!r} (known: {', '.join(sorted(known))})" if unknown else None


def query_error(params) -> str | None:
    """The reason to refuse GET /api/images's query (None: none): a parameter it does not take, one
    given twice, or a quick filter that is not true or false. Ignored, each listed every image."""
    twice = sorted({name for name in params if len(params.getlist(name)) > 1})
    not_flags = [name for name in FILTER_FLAGS if not is_flag(params.get(name))]
    return (unknown_fields(dict(params), IMAGES_FIELDS) or (twice and f"{twice[0]} is given more than once")
            or (not_flags and f"{not_flags[0]} must be true or false (a quick filter)") or None)


def is_flag(value) -> bool:
    """Whether a quick filter's value in a JSON body is one: absent, a bool, or a checkbox's text."""
    if value is None or isinstance(value, bool):
        return True
    return isinstance(value, str | int) and str(value).lower() in FLAG_TEXTS


def filters_of(values) -> Filters:
    """Filters from query parameters or a JSON body."""
    def flag(name: str) -> bool:
        value = values.get(name)
        return value is True or str(value).lower() in ("1", "true", "on", "yes")

    def text(name: str) -> str:
        value = values.get(name)
        return value if isinstance(value, str) else ""

    return Filters(where=text("where"), character=text("character"), group=text("group"), tag=text("tag"),
                   flagged=flag("flagged"), duplicates=flag("duplicates"), errors=flag("errors"),
                   excluded=flag("excluded"), edited=flag("edited"))


def filter_query(filters: Filters) -> str:
    values = {k: v for k, v in vars(filters).items() if v}
    return urlencode({k: ("1" if v is True else v) for k, v in values.items()})


def without_credentials(row: dict) -> dict:
    """An image's row for the JSON API: its source address with the credentials it may name
    replaced (store.uris.redacted), as the pages show it. A script's copy of the rows is
    logged and pasted; a key and secret are no business of it."""
    return {**row, "source": redacted(row["source"])} if row.get("source") else row


def plain(value):
    """JSON-ready: timestamps as ISO text, tuples as lists."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value
