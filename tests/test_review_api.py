"""booruset review's JSON API and pages on the bundled sample (ingest, curate, caption), through
Starlette's ASGI test client: paging, filters, hostile keys and filters, edits that the export
selection honours at once, bulk actions with undo, the token and the host check."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.export_data import base_config, prepared_workspace


@pytest.fixture(scope="module")
def review(tmp_path_factory, ray_local):
    from starlette.testclient import TestClient

    from review.app import ReviewApp
    from store.workspace import Workspace

    path = prepared_workspace(tmp_path_factory)
    ws = Workspace(str(path))
    app = ReviewApp(base_config(path), ws)
    return TestClient(app.asgi(["testserver"])), ws, app


def all_keys(ws) -> list[str]:
    return [r[0] for r in ws.connect().execute("select key from images order by key").fetchall()]


def tags_of(ws, key: str) -> list[str]:
    found = ws.connect().execute("select tags from image_tag_lists where key = $k", {"k": key}).fetchone()
    return list(found[0]) if found else []


def test_pages_walk_every_image_once_in_key_order(review):
    client, ws, _ = review
    seen, after = [], ""
    while True:
        answer = client.get("/api/images", params={"limit": 7, "after": after}).json()
        seen += [r["key"] for r in answer["images"]]
        if answer["next"] is None:
            break
        after = answer["next"]
    assert seen == all_keys(ws) and len(seen) > 7
    first = client.get("/api/images", params={"limit": 3}).json()["images"][0]
    assert set(first) >= {"key", "characters", "group", "accuracy", "flagged", "excluded"}
    grid = client.get("/")
    assert grid.status_code == 200 and grid.text.count('class="card') == min(60, len(seen))


def test_filters_quick_and_sql_select_the_same_images(review):
    client, ws, _ = review
    con = ws.connect()
    character = con.execute("select c from (select unnest(characters) c from image_meta) group by c "
                            "order by count(*) desc, c limit 1").fetchone()[0]
    expected = {r[0] for r in con.execute("select key from image_meta where list_contains(characters, $c)",
                                          {"c": character}).fetchall()}
    quick = client.get("/api/images", params={"character": character, "limit": 500}).json()["images"]
    quick = {r["key"] for r in quick}
    where = client.get("/api/images", params={"where": f"list_contains(characters, '{character}')",
                                               "limit": 500}).json()["images"]
    assert quick == expected == {r["key"] for r in where} and expected


@pytest.mark.parametrize("where", ["1=1; drop table images", "true) union all select * from images where (true",
                                   "no_such_column > 1", "copy images to '/tmp/x.csv'", "1=1; select 1",
                                   "key in (select content from read_text('/etc/passwd'))"])
def test_hostile_filters_are_refused_with_a_reason(review, where):
    client, ws, _ = review
    answer = client.get("/api/images", params={"where": where})
    assert answer.status_code == 400 and "error" in answer.json()
    assert client.get("/", params={"where": where}).status_code == 200  # the page says why instead
    assert len(all_keys(ws)) > 0


@pytest.mark.parametrize("where", ["cast(key as int) > 0", "error('no') is null"])
def test_filters_that_fail_as_they_run_are_refused_with_a_reason(review, where):
    """They pass the check's `limit 0` and fail on the first row they meet."""
    client, _, _ = review
    answer = client.get("/api/images", params={"where": where})
    assert answer.status_code == 400 and answer.json()["error"].startswith(f"filter {where!r}")
    grid = client.get("/", params={"where": where})
    assert grid.status_code == 200 and "filter" in grid.text
    key = all_keys(review[1])[0]
    assert client.get("/image", params={"key": key, "where": where}).status_code == 200
    bulk = client.post("/api/bulk", json={"where": where, "add_tags": ["x"]})
    assert bulk.status_code == 400 and "error" in bulk.json()


def test_a_filter_that_runs_too_long_is_stopped_and_refused(review):
    """The review table has one connection, which every request waits for: a filter that ran for
    minutes (a cross join in a subquery, typed or sent by any page of the browser to a loopback
    server) held every page, thumbnail lookup and edit until it ended."""
    import threading
    import time

    client, ws, app = review
    slow = "(select count(*) from range(60000) a, range(60000) b where a.range * 3 + b.range = 7) > 0"
    app.index.filter_seconds = 0.5
    try:
        started = time.monotonic()
        answer = client.get("/api/images", params={"where": slow})
        assert answer.status_code == 400 and "stopped" in answer.json()["error"]
        assert time.monotonic() - started < 5
        assert "stopped" in client.get("/", params={"where": slow}).text
        bulk = client.post("/api/bulk", json={"where": slow, "add_tags": ["slow_probe"], "preview": False})
        assert bulk.status_code == 400 and "stopped" in bulk.json()["error"]
        assert "slow_probe" not in tags_of(ws, all_keys(ws)[0])
        # a stopped filter leaves nothing behind: the next requests answer as ever
        waited: list[int] = []
        thread = threading.Thread(target=lambda: waited.append(client.get("/api/images", params={"where": slow})
                                                               .status_code))
        thread.start()
        assert client.get("/api/images", params={"limit": 3}).status_code == 200
        thread.join()
        assert waited == [400] and len(client.get("/api/images", params={"limit": 500}).json()["images"]) > 3
    finally:
        del app.index.filter_seconds  # the class's own again


@pytest.mark.parametrize("key", ["../../etc/passwd", "/etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "a\x00b",
                                 "' or 1=1 --", "<script>alert(1)</script>"])
def test_hostile_keys_reach_no_file(review, key):
    client, _, _ = review
    for path in ("/thumb", "/original", "/image"):
        assert client.get(path, params={"key": key}).status_code == 404
    assert client.get("/api/images/" + quote(key, safe="")).status_code == 404
    assert client.post("/api/edits", json={"key": key, "remove_tags": ["x"]}).status_code == 404


def test_image_api_and_page_show_everything_about_one_image(review):
    client, ws, _ = review
    key = all_keys(ws)[0]
    details = client.get(f"/api/images/{key}").json()
    assert details["row"]["key"] == key
    assert {t["tag"] for t in details["tags"] if t["position"] is not None} == set(tags_of(ws, key))
    assert details["export"]["name"] and details["export"]["txt"]
    page = client.get("/image", params={"key": key})
    assert page.status_code == 200 and "Export preview" in page.text
    thumb = client.get("/thumb", params={"key": key})
    assert thumb.status_code == 200 and thumb.content[:3] == b"\xff\xd8\xff"
    original = client.get("/original", params={"key": key})
    assert original.status_code == 200 and original.headers["x-content-type-options"] == "nosniff"
    assert details["row"]["member_offset"] is not None  # read with one seek in its shard
    assert hashlib.sha256(original.content).hexdigest() == details["row"]["sha256"]


def test_tag_edit_applies_at_once_and_undo_takes_it_back(review):
    client, ws, app = review
    key = all_keys(ws)[1]
    tag = tags_of(ws, key)[0]
    done = client.post("/api/edits", json={"key": key, "remove_tags": [tag], "add_tags": ["my_new_tag"]}).json()
    assert done["edits"] == 2 and done["batch"]
    assert tag not in tags_of(ws, key) and "my_new_tag" in tags_of(ws, key)
    details = client.get(f"/api/images/{key}").json()
    assert tag not in details["row"]["tags"] and f'"{tag}"' not in details["export"]["json"].split('"tag_scores"')[0]
    assert client.get("/api/images", params={"edited": "1", "limit": 500}).json()["images"][0]["key"] == key
    again = client.post("/api/edits", json={"key": key, "remove_tags": [tag]}).json()
    assert again["edits"] == 0 and again["batch"] is None  # nothing to change, nothing written
    undone = client.post("/api/undo", json={"batch": done["batch"]}).json()
    assert undone["edits"] == 2
    assert tag in tags_of(ws, key) and "my_new_tag" not in tags_of(ws, key)
    rows = ws.connect().execute("select count(*) from edits where key = $k", {"k": key}).fetchone()[0]
    assert rows == 4  # append-only: the edit and its undo


def test_added_tags_take_the_form_of_curated_ones(review):
    """As typed they reached KEY.txt: `Long Hair` beside the curated long_hair and past
    exclude_tags, `red hair, blue eyes` as two tags to a trainer, a NUL byte, 5,000 characters."""
    client, ws, _ = review
    key = all_keys(ws)[4]
    before = tags_of(ws, key)
    done = client.post("/api/edits", json={"key": key, "add_tags": ["Edited  Tag", "red hair, blue eyes", "bow\x00tie",
                                                                  before[0].replace("_", " ").upper()]})
    assert done.status_code == 200
    after = tags_of(ws, key)
    assert after[:len(before)] == before and len(after) == len(set(after))  # the upper-case one is there already
    assert set(after) == set(before) | {"blue_eyes", "bowtie", "edited_tag", "red_hair"}
    client.post("/api/edits", json={"key": key, "remove_tags": ["EDITED TAG"]})
    assert "edited_tag" not in tags_of(ws, key)
    for body, reason in (({"add_tags": ["y" * 5000]}, "max_tag_chars"), ({"character": "z" * 5000}, "max_tag_chars"),
                         ({"add_tags": ["a\udc80"]}, "UTF-16"),
                         ({"caption": "bad \ud800 half"}, "UTF-16"), ({"character": "a, b"}, "one tag"),
                         # a person's caption is bounded as a captioner's (a 1 MB one reached KEY.txt)
                         ({"caption": "w" * 4001}, "caption.max_caption_chars")):
        # ASCII JSON: a half pair travels as its escape, as a browser or script would send it
        answer = client.post("/api/edits", content=json.dumps({"key": key, **body}),
                             headers={"Content-Type": "application/json"})
        assert answer.status_code == 400 and reason in answer.json()["error"], body
    client.post("/api/edits", json={"key": key, "character": "Someone (Review)"})
    assert client.get(f"/api/images/{key}").json()["row"]["characters"] == ["someone_(review)"]
    client.post("/api/edits", json={"key": key, "character": ""})


def test_caption_exclude_and_character_edits_reach_the_export_selection(review):
    client, ws, _ = review
    key = all_keys(ws)[2]
    client.post("/api/edits", json={"key": key, "caption": "A person wrote this.", "exclude": True,
                                    "character": "someone_(review)"})
    row = client.get(f"/api/images/{key}").json()
    assert row["export"]["txt"] == "A person wrote this." and '"caption_edited": true' in row["export"]["json"]
    assert row["row"]["excluded"] and row["row"]["characters"] == ["someone_(review)"]
    assert row["row"]["accuracy"] is None  # nothing scored the person's caption
    from jobs.export import sql_text
    con = ws.connect()
    params = {"drop_duplicates": False, "drop_flagged": False, "drop_excluded": True, "gone_inputs": []}
    exported = {r[0] for r in con.execute(sql_text("export_selection.sql"), params).fetchall()}
    assert key not in exported
    left_out = con.execute(sql_text("export_left_out.sql"), {**params, "first": "", "last": None}).fetchall()
    assert left_out == [("excluded in review", 1)]  # what the export's summary counts
    client.post("/api/edits", json={"key": key, "caption": "", "exclude": False, "character": ""})
    row = client.get(f"/api/images/{key}").json()["row"]
    assert not row["excluded"] and not row["caption_edited"] and row["characters"] == []


def test_bulk_remove_over_a_filter_previews_applies_and_undoes(review):
    client, ws, _ = review
    con = ws.connect()
    tag, count = con.execute("select tag, count(*) from tags group by tag order by count(*) desc, tag "
                             "limit 1").fetchone()
    body = {"tag": tag, "remove_tags": [tag]}
    preview = client.post("/api/bulk", json={**body, "preview": True}).json()
    assert preview["count"] >= count > 1
    done = client.post("/api/bulk", json={**body, "preview": False}).json()
    assert done["images"] == count and done["edits"] == count
    assert ws.connect().execute("select count(*) from image_tag_lists where list_contains(tags, $t)",
                                {"t": tag}).fetchone()[0] == 0
    client.post("/api/undo", json={"batch": done["batch"]})
    assert ws.connect().execute("select count(*) from image_tag_lists where list_contains(tags, $t)",
                                {"t": tag}).fetchone()[0] == count


def test_edited_text_is_escaped_on_the_page(review):
    client, ws, _ = review
    key = all_keys(ws)[3]
    client.post("/api/edits", json={"key": key, "add_tags": ["<script>alert(1)</script>"]})
    page = client.get("/image", params={"key": key}).text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_a_body_nested_too_deeply_for_the_json_reader_is_a_400(review):
    client, ws, _ = review
    for path in ("/api/edits", "/api/bulk", "/api/undo"):
        answer = client.post(path, content=b"[" * 100_000, headers={"Content-Type": "application/json"})
        assert answer.status_code == 400 and answer.json()["error"] == "the body is not JSON"  # was a 500


def test_thumbnails_of_a_workspace_review_cannot_write_are_served_uncached(review, tmp_path):
    """A read-only workspace (review reads it, README): every thumbnail was a 422 "cannot make a
    thumbnail: OSError", as its cache folder could not be written; the grid had no pictures."""
    from starlette.testclient import TestClient

    from review.app import ReviewApp
    from tests.export_data import base_config

    _, ws, _ = review
    app = ReviewApp(base_config(Path(ws.base)), ws)
    (tmp_path / "a-file").write_text("not a folder")
    app.thumbs.folder = tmp_path / "a-file" / "thumbs"  # no folder can be made there, as on a read-only mount
    answer = TestClient(app.asgi(["testserver"])).get("/thumb", params={"key": all_keys(ws)[0]})
    assert answer.status_code == 200 and answer.content[:3] == b"\xff\xd8\xff"
    assert [p.name for p in tmp_path.iterdir()] == ["a-file"]


def test_two_review_servers_editing_one_workspace_both_write(review):
    """Each edit holds the workspace for a moment: one server's edit was refused (409, "workspace
    busy: review") while the other's was being written."""
    import threading

    from starlette.testclient import TestClient

    from review.app import ReviewApp
    from tests.export_data import base_config

    first, ws, _ = review
    second = TestClient(ReviewApp(base_config(Path(ws.base)), ws).asgi(["testserver"]))
    key = all_keys(ws)[5]
    answers: list[int] = []

    def edits(client, name: str) -> None:
        for i in range(8):
            answers.append(client.post("/api/edits", json={"key": key, "caption": f"{name} {i}"}).status_code)

    threads = [threading.Thread(target=edits, args=(c, n)) for c, n in ((first, "a"), (second, "b"))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert answers == [200] * 16
    assert first.get(f"/api/images/{key}").json()["row"]["caption"] in ("a 7", "b 7")
    first.post("/api/edits", json={"key": key, "caption": ""})


def test_requests_that_a_browser_would_send_cross_site_are_refused(review):
    client, ws, _ = review
    key = all_keys(ws)[0]
    form = client.post("/api/edits", content=f'{{"key": "{key}", "exclude": true}}',
                       headers={"content-type": "text/plain"})
    assert form.status_code == 415
    assert client.get("/", headers={"host": "evil.example"}).status_code == 400


def test_no_other_site_can_show_the_pages_in_a_frame(review):
    """Clickjacking: any web site could show the review page of a loopback server (no token, the
    default) in an invisible frame over its own buttons, and a click or an `x` typed there excluded
    images, or applied a bulk action, with the person's own same-origin requests."""
    client, ws, _ = review
    key = all_keys(ws)[0]
    for path, params in (("/", {}), ("/image", {"key": key}), ("/api/images", {}), ("/original", {"key": key})):
        answer = client.get(path, params=params)
        assert answer.status_code == 200 and answer.headers["x-frame-options"] == "DENY"
        assert "frame-ancestors 'none'" in answer.headers.get_list("content-security-policy")
    assert "sandbox" in client.get("/original", params={"key": key}).headers.get_list("content-security-policy")


def test_another_site_cannot_make_the_browser_fetch_from_the_server(review):
    """Any web page could have the browser GET from a loopback server (no token, the default):
    `<img src="http://127.0.0.1:8765/api/images?where=...">` ran its SQL over the dataset, and how
    long the answer took (a slow subquery or not) told the page what the tables hold, a bit a
    request; its images showed the person's pictures. A browser says where a request comes from
    (Sec-Fetch-Site): from another site, only a link opened (a navigation to a page) is served."""
    client, ws, _ = review
    key = all_keys(ws)[0]
    embedded = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "no-cors", "sec-fetch-dest": "image"}
    for site in ("cross-site", "same-site"):  # same-site: a page of another port of this host
        for path in ("/api/images", "/thumb", "/original", "/image", "/", f"/api/images/{quote(key, safe='')}"):
            params = {"where": "true"} if path == "/api/images" else {"key": key}
            answer = client.get(path, params=params, headers={**embedded, "sec-fetch-site": site})
            assert answer.status_code == 403, path
    framed = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate", "sec-fetch-dest": "iframe"}
    assert client.get("/", headers=framed).status_code == 403
    link = {"sec-fetch-site": "cross-site", "sec-fetch-mode": "navigate", "sec-fetch-dest": "document"}
    assert client.get("/", headers=link).status_code == 200  # a link to the review page still opens
    assert client.get("/image", params={"key": key}, headers=link).status_code == 200
    own = {"sec-fetch-site": "same-origin", "sec-fetch-mode": "no-cors", "sec-fetch-dest": "image"}
    assert client.get("/thumb", params={"key": key}, headers=own).status_code == 200
    typed = {"sec-fetch-site": "none", "sec-fetch-mode": "navigate", "sec-fetch-dest": "document"}
    assert client.get("/", headers=typed).status_code == 200
    assert client.get("/api/images").status_code == 200  # a script or curl sends no Sec-Fetch-Site


def test_edits_wait_while_a_job_holds_the_workspace(review):
    from store.lock import WorkspaceLock

    client, ws, _ = review
    key = all_keys(ws)[0]
    with WorkspaceLock(ws, "curate"):
        busy = client.post("/api/edits", json={"key": key, "exclude": True})
    assert busy.status_code == 409 and "curate" in busy.json()["error"]


def test_an_edit_the_workspace_cannot_take_is_an_error_not_a_crash(review):
    """A workspace the server may read but not write (read-only keys on object storage): writing
    the edit failed with an OSError, a 500 and a traceback. Here the lock file cannot be opened
    (a folder in its place: the tests run as root, whom permissions do not stop)."""
    client, ws, _ = review
    key = all_keys(ws)[0]
    lock = Path(ws.base) / "lock"
    lock.unlink(missing_ok=True)
    lock.mkdir()
    try:
        refused = client.post("/api/edits", json={"key": key, "exclude": True})
    finally:
        lock.rmdir()
    assert refused.status_code == 503 and "could not be written" in refused.json()["error"]
    written = client.post("/api/edits", json={"key": key, "exclude": True})
    assert written.status_code == 200
    client.post("/api/undo", json={"batch": written.json()["batch"]})  # as it was, for the other tests


def test_a_token_guards_every_request(review):
    from starlette.testclient import TestClient

    from review.app import ReviewApp

    _, ws, app = review
    guarded = TestClient(ReviewApp(app.cfg, ws, token="s3cret").asgi(["testserver"]))
    assert guarded.get("/api/images").status_code == 401
    assert guarded.get("/api/images", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert guarded.get("/api/images", headers={"authorization": "Bearer s3cret"}).status_code == 200
    first = guarded.get("/?token=s3cret", follow_redirects=False)
    assert first.status_code == 303 and "token" not in first.headers["location"]
    guarded.cookies.clear()
    for cookie in first.cookies.jar:  # the cookie the first visit set (its name is the server's own)
        guarded.cookies.set(cookie.name, cookie.value)
    assert guarded.get("/").status_code == 200


def test_curate_applies_tag_and_character_edits_to_its_tables(review):
    from jobs import curate

    client, ws, app = review
    con = ws.connect()
    key = con.execute("select min(key) from tags where category = 'character'").fetchone()[0]
    tag = con.execute("select tag from tags where key = $k and category = 'general' order by rank limit 1",
                      {"k": key}).fetchone()[0]
    client.post("/api/edits", json={"key": key, "remove_tags": [tag], "add_tags": ["added_by_review"],
                                    "character": "someone_(review)"})
    excluded = all_keys(ws)[-1]
    client.post("/api/edits", json={"key": excluded, "exclude": True})
    curate.run(app.cfg, ws)
    con = ws.connect()
    curated = [r[0] for r in con.execute("select tag from tags where key = $k order by rank", {"k": key}).fetchall()]
    # an added tag comes last; the character set comes first (kohya's keep_tokens keep it)
    assert tag not in curated and curated[-1] == "added_by_review" and curated[0] == "someone_(review)"
    # the character set replaces the character tags: KEY.txt, the caption and KEY.json agree
    characters = con.execute("select list(tag) from tags where key = $k and category = 'character'",
                             {"k": key}).fetchone()[0]
    assert characters == ["someone_(review)"]
    # the tag step's own parts, replaced by the edited ones, are gone (never published)
    published = ws.published()["tables"]["tags"]
    generation = published[0].split("-")[1]
    assert all("-e-" in part for part in published)
    assert not list(Path(ws.table_dir("tags")).glob(f"curate-{generation}-p*"))
    meta = con.execute("select characters, n_characters from image_meta where key = $k", {"k": key}).fetchone()
    assert meta == (["someone_(review)"], 1)
    assert con.execute("select count(*) from groups where key = $k and path like '%someone_(review)%'",
                       {"k": key}).fetchone()[0] in (0, 1)  # grouped by it when the combination is big enough
    assert tags_of(ws, key) == curated  # image_tag_lists: the same edits, not applied twice
    balanced = {r[0] for r in con.execute("select key from balance").fetchall()}
    assert excluded not in balanced and key in balanced  # an excluded image weighs nothing in the balance


def test_a_character_set_to_a_tag_the_image_has_makes_that_tag_its_character(review):
    """A plain .txt's `eileen`, then set as the character: it stayed a general tag where it was."""
    from jobs import curate

    client, ws, app = review
    con = ws.connect()
    key, tag = con.execute("select key, arg_max(tag, rank) from tags as t where category = 'general' "
                           "and not exists (select 1 from edit_state as e where e.key = t.key "
                           "                and (field = 'character' or subject = t.tag)) "
                           "group by key order by key limit 1").fetchone()
    assert client.post("/api/edits", json={"key": key, "character": tag}).status_code == 200
    curate.run(app.cfg, ws)
    con = ws.connect()
    rows = con.execute("select tag, category from tags where key = $k order by rank", {"k": key}).fetchall()
    assert rows[0] == (tag, "character") and [t for t, _ in rows].count(tag) == 1
    assert [t for t, c in rows if c == "character"] == [tag]
    assert con.execute("select characters from image_meta where key = $k", {"k": key}).fetchone()[0] == [tag]


def test_cluster_members_come_nearest_first(review):
    import numpy as np

    import schemas

    client, ws, _ = review
    a, b, c = all_keys(ws)[5:8]
    base = np.random.default_rng(0).normal(size=schemas.CCIP_DIM).astype("float32")
    vectors = {a: base, b: base + 0.05, c: -base}
    ws.add_part("embeddings", "test-review-neighbours",
                [{"key": k, "crop": schemas.WHOLE_IMAGE, "model": "ccip", "x0": 0.0, "y0": 0.0, "x1": 1.0, "y1": 1.0,
                  "vector": v.tolist()} for k, v in vectors.items()])
    ws.add_part("clusters", "test-review-neighbours",
                [{"key": k, "crop": schemas.WHOLE_IMAGE, "cluster": 9001, "character": "test"} for k in vectors])
    clusters = client.get(f"/api/images/{a}").json()["clusters"]
    members = next(c_["members"] for c_ in clusters if c_["cluster"] == 9001)
    assert [m["key"] for m in members] == [b, c]
    assert members[0]["similarity"] > 0.99 and members[1]["similarity"] < -0.99


def test_an_empty_workspace_shows_an_empty_grid(tmp_path):
    from starlette.testclient import TestClient

    from jobs.config import load_config
    from review.app import ReviewApp
    from store.workspace import Workspace

    ws = Workspace(str(tmp_path / "empty"))
    ws.publish()
    client = TestClient(ReviewApp(load_config(None, []), ws).asgi(["testserver"]))
    assert client.get("/api/images").json() == {"images": [], "next": None}
    assert "no images match" in client.get("/").text


def test_undo_of_an_older_edit_leaves_a_later_one_standing(review):
    client, ws, _ = review
    key = all_keys(ws)[9]
    first = client.post("/api/edits", json={"key": key, "caption": "First words."}).json()
    client.post("/api/edits", json={"key": key, "caption": "Second words."})
    assert client.post("/api/undo", json={"batch": first["batch"]}).status_code == 404  # nothing it still decides
    assert client.get(f"/api/images/{key}").json()["row"]["caption"] == "Second words."
    unchanged = client.post("/api/edits", json={"key": key, "caption": "Second words."}).json()
    assert unchanged["edits"] == 0


NO_TAG_TEXT = ('export.text="tags"',
               'export.exclude_tag_categories=["general", "character", "copyright", "rating", "meta", "artist"]')


@pytest.mark.parametrize("formats, says", [
    (["kohya"], "left out of the export (kohya folders"),
    (["kohya", "everydream", "webdataset"], "left out of the kohya and everydream folders"),
    (["webdataset"], "writes it with an empty KEY.txt")])
def test_the_preview_of_an_image_with_no_text_says_what_the_export_does_with_it(review, formats, says):
    from starlette.testclient import TestClient

    from review.app import ReviewApp
    from tests.export_data import base_config

    _, ws, _ = review
    key = all_keys(ws)[0]
    cfg = base_config(Path(ws.base), *NO_TAG_TEXT, f"export.formats={json.dumps(formats)}")
    client = TestClient(ReviewApp(cfg, ws).asgi(["testserver"]))
    preview = client.get(f"/api/images/{key}").json()["export"]
    assert preview["txt"] == "" and says in preview["left_out"]
    assert says in client.get("/image", params={"key": key}).text  # the page says it, not an empty KEY.txt
    assert review[0].get(f"/api/images/{key}").json()["export"]["left_out"] is None  # it has a text by default


def test_an_image_the_preview_says_is_left_out_is_left_out_of_the_kohya_export(tmp_path_factory, ray_local):
    from jobs import export
    from review.app import ReviewApp
    from store.workspace import Workspace
    from tests.export_data import base_config, prepared_workspace

    path = prepared_workspace(tmp_path_factory)
    ws = Workspace(str(path))
    cfg = base_config(path, *NO_TAG_TEXT, 'export.formats=["kohya"]', "export.drop_duplicates=false",
                      "export.drop_flagged=false")
    app = ReviewApp(cfg, ws)
    said = {k for k in all_keys(ws) if app.details(k)["export"]["left_out"]}
    export.run(cfg, ws)
    rows = ws.connect().execute("select key, dropped from errors where stage = 'export' and kind = 'empty_text'"
                                ).fetchall()
    assert said == {k for k, _ in rows} == set(all_keys(ws)) and all(dropped for _, dropped in rows)
    assert not list((path / "export" / "kohya").rglob("*.txt"))


def test_the_page_says_when_a_caption_is_older_than_the_image_tags(tmp_path_factory, ray_local):
    """The warning follows the tags the accepted caption was written from: none on a fresh
    caption, shown after a tag edit, gone once `booruset caption` wrote it again, and back after
    an undo (the caption now has the edited tags)."""
    from starlette.testclient import TestClient

    from jobs import caption
    from review.app import ReviewApp
    from store.workspace import Workspace

    path = prepared_workspace(tmp_path_factory)
    ws = Workspace(str(path))
    cfg = base_config(path)
    client = TestClient(ReviewApp(cfg, ws).asgi(["testserver"]))
    key = ws.connect().execute("select min(key) from captions where accepted and backend <> 'own'").fetchone()[0]

    def warned() -> bool:
        page = client.get("/image", params={"key": key})
        assert page.status_code == 200
        return 'id="caption-older-than-tags"' in page.text

    assert not warned()
    batch = client.post("/api/edits", json={"key": key, "add_tags": ["red_scarf"]}).json()["batch"]
    assert warned()
    caption.run(cfg, ws)
    assert "red scarf" in ws.connect().execute("select caption from captions where key = $k and accepted",
                                               {"k": key}).fetchone()[0]
    assert not warned()
    client.post("/api/undo", json={"batch": batch})
    assert warned()


def test_a_picture_ingest_took_through_a_link_out_of_its_folder_is_shown(tmp_path, ray_local):
    """With ingest.follow_links_out ingest, export and the report read a linked picture; the review
    page answered 404 for it ("no such image"), and for its thumbnail. Without the option a link
    out of the folder (one put there after ingest) stays unread."""
    from starlette.testclient import TestClient

    from jobs import ingest
    from jobs.config import load_config
    from review.app import ReviewApp
    from store.workspace import Workspace
    from tests.hostile_data import encode, picture

    folder, outside = tmp_path / "in", tmp_path / "outside"
    folder.mkdir()
    outside.mkdir()
    (outside / "pic.png").write_bytes(encode(picture(), "PNG"))
    (folder / "linked.png").symlink_to(outside / "pic.png")
    ws = Workspace(str(tmp_path / "ws"))
    cfg = load_config(None, [f'workspace.path="{ws.root}"', "ray.num_cpus=2", "ingest.follow_links_out=true",
                             f'ingest.inputs=["{folder}"]'])
    ingest.run(cfg, ws)
    key = all_keys(ws)[0]
    client = TestClient(ReviewApp(cfg, ws).asgi(["testserver"]))
    original = client.get("/original", params={"key": key})
    assert original.status_code == 200 and original.content == (outside / "pic.png").read_bytes()
    assert client.get("/thumb", params={"key": key}).status_code == 200
    strict = TestClient(ReviewApp(load_config(None, [f'workspace.path="{ws.root}"']), ws).asgi(["testserver"]))
    assert strict.get("/original", params={"key": key}).status_code == 404


def test_an_edit_that_would_pass_max_tags_on_an_image_is_refused(review):
    """Tags per image are bounded as ingest bounds a sidecar's (ingest.max_tags): one POST of 5,000
    tags wrote 5,000 edits and gave the image 5,000 tags in KEY.txt; a bulk action writes that many
    for every image of its filter."""
    from starlette.testclient import TestClient

    from review.app import ReviewApp
    from tests.export_data import base_config

    _, ws, _ = review
    key = all_keys(ws)[8]
    has = len(tags_of(ws, key))
    client = TestClient(ReviewApp(base_config(Path(ws.base), f"ingest.max_tags={has + 2}"), ws).asgi(["testserver"]))
    edits = ws.connect().execute("select count(*) from edits").fetchone()[0]
    for path, body in (("/api/edits", {"key": key}), ("/api/bulk", {"tag": tags_of(ws, key)[0], "preview": False})):
        answer = client.post(path, json={**body, "add_tags": ["many_a", "many_b", "many_c"]})
        assert answer.status_code == 400 and "ingest.max_tags" in answer.json()["error"], path
    assert ws.connect().execute("select count(*) from edits").fetchone()[0] == edits  # nothing written
    done = client.post("/api/edits", json={"key": key, "add_tags": ["many_a", "many_b"]}).json()
    assert done["edits"] == 2 and len(tags_of(ws, key)) == has + 2
    swap = client.post("/api/edits", json={"key": key, "remove_tags": [tags_of(ws, key)[0]], "add_tags": ["many_c"]})
    assert swap.status_code == 200 and swap.json()["edits"] == 2  # one out, one in: still within
    for batch in (swap.json()["batch"], done["batch"]):
        client.post("/api/undo", json={"batch": batch})
    assert len(tags_of(ws, key)) == has


@pytest.mark.parametrize("host, address", [("127.0.0.1", "http://127.0.0.1:8765/"), ("0.0.0.0", "http://127.0.0.1:8765/"),
                                           ("::1", "http://[::1]:8765/"), ("::", "http://[::1]:8765/"),
                                           ("fe80::1", "http://[fe80::1]:8765/"), ("localhost", "http://localhost:8765/")])
def test_the_printed_address_opens_in_a_browser(host, address):
    """`--host ::1` printed http://::1:8765/, which no browser opens (an IPv6 address goes in brackets)."""
    from review.server import open_address

    assert open_address(host, 8765, None) == address
    assert open_address(host, 8765, "s3cret") == address + "?token=s3cret"


def test_a_picture_rewritten_since_ingest_is_not_shown_as_the_one_ingest_saw(tmp_path, ray_local):
    """A file replaced in the input folder after ingest (an edit, a re-encode): the page showed the
    new picture under the boxes, tags and caption made of the old one. The export refuses it
    (`missing_member`: not of the size ingest saw); so does the page now."""
    from starlette.testclient import TestClient

    from jobs import ingest
    from jobs.config import load_config
    from review.app import ReviewApp
    from store.workspace import Workspace
    from tests.hostile_data import encode, picture

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(picture(seed=1), "PNG"))
    ws = Workspace(str(tmp_path / "ws"))
    cfg = load_config(None, [f'workspace.path="{ws.root}"', "ray.num_cpus=2", f'ingest.inputs=["{folder}"]'])
    ingest.run(cfg, ws)
    (folder / "a.png").write_bytes(encode(picture(200, 150, seed=2), "PNG"))  # another picture, another size
    client = TestClient(ReviewApp(cfg, ws).asgi(["testserver"]))
    for path in ("/original", "/thumb"):
        assert client.get(path, params={"key": all_keys(ws)[0]}).status_code == 404, path


def test_a_body_larger_than_any_edit_is_refused_unread(review):
    """A POST was read whole into memory whatever its size (a few GB of JSON took the server down);
    the largest edit (ingest.max_tags tags of max_tag_chars, a caption) is far below the bound."""
    from review.app import MAX_BODY

    client, _, _ = review
    key = all_keys(review[1])[0]
    huge = b'{"key": "' + key.encode() + b'", "caption": "' + b"w" * MAX_BODY + b'"}'
    for path in ("/api/edits", "/api/bulk", "/api/undo"):
        answer = client.post(path, content=huge, headers={"Content-Type": "application/json"})
        assert answer.status_code == 413 and "bytes" in answer.json()["error"], path
    largest = {"key": key, "add_tags": ["t" * 199 + f"{i:04d}"[-1] for i in range(1000)], "caption": "w" * 4000}
    assert len(json.dumps(largest)) < MAX_BODY


def test_a_tag_typed_with_a_category_prefix_is_the_tag_ingest_would_read(review):
    """`character:eileen` in a sidecar is the tag eileen; typed in review it became the tag
    `character:eileen` in KEY.txt (and `artist: someone` the tag `artist:_someone`)."""
    client, ws, _ = review
    key = all_keys(ws)[11]
    before = tags_of(ws, key)
    done = client.post("/api/edits", json={"key": key, "add_tags": ["character:Some One", "artist: someone else"]})
    assert done.status_code == 200 and done.json()["edits"] == 2
    assert set(tags_of(ws, key)) - set(before) == {"some_one", "someone_else"}
    client.post("/api/edits", json={"key": key, "remove_tags": ["artist:someone else"]})
    assert "someone_else" not in tags_of(ws, key)
    assert client.post("/api/undo", json={"batch": done.json()["batch"]}).status_code == 200
    assert tags_of(ws, key) == before


@pytest.mark.parametrize("host", ["", "  "])
def test_an_empty_host_is_a_mistake_not_every_address(tmp_path, capsys, monkeypatch, host):
    """`--host "$HOST"` with HOST unset listened on every address of the machine and printed
    http://:PORT/ to open; an empty -w is refused the same way."""
    import review.server
    from jobs import cli
    from store.workspace import Workspace

    def serve(*args):
        raise AssertionError(f"served on {args[2]!r}")
    monkeypatch.setattr(review.server, "serve", serve)

    ws = Workspace(str(tmp_path / "ws"))
    ws.publish()
    with pytest.raises(SystemExit) as stopped:
        cli.main(["review", "-w", ws.root, "--host", host, "--port", "0"])
    assert stopped.value.code == 2 and "--host" in capsys.readouterr().err


def test_an_ipv6_host_may_be_written_in_brackets():
    """`--host [::1]` (as in the address a browser opens) was "Name or service not known"."""
    from jobs.cli import listen_host

    assert listen_host("[::1]") == "::1" and listen_host("::1") == "::1" and listen_host("0.0.0.0") == "0.0.0.0"


def test_two_servers_with_tokens_on_one_host_keep_their_own_cookies(review):
    """A browser keeps cookies by host, not port: the second review server opened (another
    workspace, another token) replaced the first one's cookie, and every page of the first
    was then 401 "token required"."""
    from starlette.testclient import TestClient

    from review.app import ReviewApp

    _, ws, app = review
    first, second = (TestClient(ReviewApp(app.cfg, ws, token=t).asgi(["testserver"]))
                     for t in ("first-token", "second-token"))
    browser: dict[str, str] = {}  # one host's cookies, as a browser keeps them for both ports
    for client, token in ((first, "first-token"), (second, "second-token")):
        opened = client.get(f"/?token={token}", follow_redirects=False)
        assert opened.status_code == 303
        browser.update({c.name: c.value for c in opened.cookies.jar})
    for client in (first, second):
        client.cookies.clear()
        for name, value in browser.items():
            client.cookies.set(name, value)
        assert client.get("/api/images").status_code == 200


@pytest.mark.parametrize("path, body", [
    ("/api/bulk", {"wehre": "false", "add_tags": ["everywhere"], "preview": False}),  # a misspelt filter
    ("/api/bulk", {"where": ["false"], "add_tags": ["everywhere"], "preview": False}),  # a filter not as text
    ("/api/bulk", {"character": 7, "add_tags": ["everywhere"], "preview": False}),
    ("/api/bulk", {"tag": "x", "caption": "a bulk caption", "preview": False}),  # not a bulk action
    ("/api/bulk", {"flagged": ["1"], "add_tags": ["everywhere"], "preview": False}),  # a quick filter not a flag
    ("/api/bulk", {"edited": "only", "add_tags": ["everywhere"], "preview": False}),
    ("/api/edits", {"add_tag": ["everywhere"]}),
    ("/api/edits", {"add_tags": 0}),  # not a list: answered 200, nothing written
    ("/api/edits", {"remove_tags": ""}),
    ("/api/bulk", {"remove_tags": False, "exclude": True, "preview": False}),
])
def test_a_filter_or_action_the_server_does_not_know_is_refused_not_ignored(review, path, body):
    """A bulk action with its filter misspelt, or not text, applied to every image of the workspace
    (the filter was ignored); an edit with a misspelt field answered 200 and wrote nothing."""
    client, ws, _ = review
    if path == "/api/edits":
        body = {"key": all_keys(ws)[0], **body}
    edits = ws.connect().execute("select count(*) from edits").fetchone()[0]
    answer = client.post(path, json=body)
    assert answer.status_code == 400 and "error" in answer.json()
    assert ws.connect().execute("select count(*) from edits").fetchone()[0] == edits


@pytest.mark.parametrize("preview", [None, 0, "false", "no", []])
def test_a_bulk_preview_that_is_not_true_or_false_is_refused(review, preview):
    """`"preview": null` (a script's unset variable) or 0 applied the bulk action to every image of
    its filter, where a missing preview only counts them; "false" only counted them."""
    client, ws, _ = review
    edits = ws.connect().execute("select count(*) from edits").fetchone()[0]
    answer = client.post("/api/bulk", json={"add_tags": ["bulk_preview_probe"], "preview": preview})
    assert answer.status_code == 400 and "preview" in answer.json()["error"]
    assert ws.connect().execute("select count(*) from edits").fetchone()[0] == edits
    assert client.post("/api/bulk", json={"add_tags": ["bulk_preview_probe"]}).json() == {"count": len(all_keys(ws))}


@pytest.mark.parametrize("params", [{"flaged": "1"}, {"flagged": "maybe"}, {"excluded": "only"}, {"wehre": "false"},
                                    {"edited": ["1", "0"]}])
def test_an_image_list_with_a_filter_it_does_not_know_is_refused_not_ignored(review, params):
    """GET /api/images answered every image of the workspace for a misspelt quick filter or one that
    is not true or false (README: refused rather than ignored), as the bulk action once did: a
    script editing "the flagged images" from that list edited them all."""
    client, ws, _ = review
    answer = client.get("/api/images", params=params)
    assert answer.status_code == 400 and "error" in answer.json()
    assert client.get("/api/images", params={"flagged": "true", "excluded": "0", "limit": 3}).status_code == 200


def test_an_undo_with_a_field_it_does_not_take_is_refused(review):
    """Every POST refuses a field it does not take (README): {"batch", "key"} undid the whole batch,
    every image of it, where the key said one."""
    client, ws, _ = review
    first, second = all_keys(ws)[1:3]
    done = client.post("/api/bulk", json={"where": f"key in ('{first}', '{second}')", "add_tags": ["undo_probe"],
                                          "preview": False}).json()
    assert done["images"] == 2
    answer = client.post("/api/undo", json={"batch": done["batch"], "key": first})
    assert answer.status_code == 400 and "key" in answer.json()["error"]
    assert "undo_probe" in tags_of(ws, first) and "undo_probe" in tags_of(ws, second)
    assert client.post("/api/undo", json={"batch": done["batch"]}).status_code == 200
    assert "undo_probe" not in tags_of(ws, first) + tags_of(ws, second)


def test_an_edit_with_a_long_list_of_tags_to_remove_answers_at_once(review):
    """Each tag to add was looked for in the list of tags to remove, one by one: 900 tags to add and
    a million to remove (an 11 MB body, under the 16 MiB an edit may be) held the server, every
    request waiting, for 12 s on one image, and a bulk action for that long on each image."""
    import time

    client, ws, _ = review
    key = all_keys(ws)[10]
    added = [f"long_add_{i}" for i in range(900)]
    body = {"key": key, "add_tags": added, "remove_tags": [f"r{i}" for i in range(1_000_000)]}
    started = time.monotonic()
    done = client.post("/api/edits", json=body)
    assert done.status_code == 200 and done.json()["edits"] == 900
    assert time.monotonic() - started < 8  # reading the body and its tags: 3 s; the edit was 12 s more
    client.post("/api/undo", json={"batch": done.json()["batch"]})
    assert not set(added) & set(tags_of(ws, key))


def test_an_image_over_max_tags_may_still_swap_a_tag(review):
    """Its curated tags (a sidecar's, bounded by ingest.max_tags, and the tagger's) may be more than
    ingest.max_tags: an edit that leaves it no more tags than it has, such as one tag for another,
    is within the bound; one that adds is refused."""
    from starlette.testclient import TestClient

    from review.app import ReviewApp
    from tests.export_data import base_config

    _, ws, _ = review
    key = all_keys(ws)[9]
    has = tags_of(ws, key)
    client = TestClient(ReviewApp(base_config(Path(ws.base), f"ingest.max_tags={len(has) - 2}"), ws)
                        .asgi(["testserver"]))
    grown = client.post("/api/edits", json={"key": key, "add_tags": ["over_a"]})
    assert grown.status_code == 400 and "ingest.max_tags" in grown.json()["error"]
    swap = client.post("/api/edits", json={"key": key, "remove_tags": [has[-1]], "add_tags": ["over_a"]})
    assert swap.status_code == 200 and swap.json()["edits"] == 2
    client.post("/api/undo", json={"batch": swap.json()["batch"]})
    assert tags_of(ws, key) == has


def test_an_image_whose_object_storage_is_down_is_unavailable_not_missing_nor_a_server_error(tmp_path, monkeypatch):
    """An image on object storage whose endpoint does not answer (source_members raises StoreError:
    tests/test_ingest.py): 503 with the store's message for the original and the thumbnail (the
    original was a 500, the thumbnail "cannot make a thumbnail", as if the image were undecodable)."""
    from starlette.testclient import TestClient

    import review.app
    import review.image_bytes
    from jobs.config import load_config
    from review.app import ReviewApp
    from store.uris import StoreError
    from store.workspace import Workspace

    def down(*_args, **_kwargs):
        raise StoreError("object storage failed reading s3://ws-bucket/in/: run again once it answers")

    monkeypatch.setattr(review.app, "image_bytes", down)
    monkeypatch.setattr(review.image_bytes, "image_bytes", down)
    ws = Workspace(str(tmp_path / "ws"), create=True)
    ws.add_part("images", "hand", [{"key": "in/a", "source": "s3://ws-bucket/in/?endpoint_override=h:9000",
                                    "member": "a.png", "width": 96, "height": 64, "format": "PNG", "mode": "RGB",
                                    "n_frames": 1, "bytes": 10, "sha256": "0" * 64}])
    client = TestClient(ReviewApp(load_config(None, [f'workspace.path="{ws.root}"']), ws).asgi(["testserver"]))
    for path in ("/original", "/thumb"):
        answer = client.get(path, params={"key": "in/a"})
        assert answer.status_code == 503 and "object storage failed reading s3://ws-bucket/in/" in answer.text, path


def test_an_image_marked_as_no_duplicate_is_exported_on_its_own_and_curate_takes_it_out_of_its_group(
        tmp_path_factory, ray_local):
    """A false near-duplicate match left the image out of every export, and nothing but a global
    curate.phash_distance could give it back. `not_duplicate` keeps it in the export at once, and
    curate's next run takes it out of its group; set back to false, it is a duplicate again."""
    from starlette.testclient import TestClient

    from jobs import curate, export
    from review.app import ReviewApp
    from store.workspace import Workspace

    path = prepared_workspace(tmp_path_factory)
    ws = Workspace(str(path))
    cfg = base_config(path, f'export.out="{path / "out"}"', 'export.formats=["webdataset"]')
    client = TestClient(ReviewApp(cfg, ws).asgi(["testserver"]))

    def exported() -> set[str]:
        export.run(cfg, ws)
        return {k for (k,) in ws.connect().execute("select distinct key from export_manifest").fetchall()}

    con = ws.connect()
    key, group = con.execute("select key, dup_group from duplicates where not is_representative "
                             "order by key limit 1").fetchone()
    alone = con.execute("select min(key) from images where key not in (select key from duplicates)").fetchone()[0]
    assert key not in exported() and group in exported()
    assert client.post("/api/edits", json={"key": alone, "not_duplicate": True}).status_code == 400
    assert client.post("/api/edits", json={"key": key, "not_duplicate": "yes"}).status_code == 400

    assert client.post("/api/edits", json={"key": key, "not_duplicate": True}).status_code == 200
    assert "back into its group" in client.get(f"/image?key={quote(key)}").text
    assert {key, group} <= exported()  # at once, before curate runs again
    curate.run(cfg, ws)
    assert not ws.connect().execute("select count(*) from duplicates where key = $k", {"k": key}).fetchone()[0]
    assert {key, group} <= exported()

    assert client.post("/api/edits", json={"key": key, "not_duplicate": False}).status_code == 200
    curate.run(cfg, ws)
    assert key not in exported() and group in exported()


def test_the_duplicate_group_marks_the_copy_the_export_keeps(tmp_path_factory, ray_local):
    """A representative excluded in review: the export keeps the group's next copy, but the image
    page (its strip's "kept", the API's is_representative) still named the excluded one, and the
    copy the export writes as a near duplicate left out."""
    from starlette.testclient import TestClient

    from review.app import ReviewApp
    from store.workspace import Workspace

    path = prepared_workspace(tmp_path_factory)
    ws = Workspace(str(path))
    first, second = all_keys(ws)[:2]
    ws.add_part("duplicates", "hand", [{"key": k, "dup_group": first, "is_representative": k == first,
                                        "reason": "phash"} for k in (first, second)])
    client = TestClient(ReviewApp(base_config(path), ws).asgi(["testserver"]))

    def kept() -> list[str]:
        found = client.get(f"/api/images/{quote(second)}").json()["duplicates"]
        return [d["key"] for d in found if d["is_representative"]]

    assert kept() == [first]
    assert client.post("/api/edits", json={"key": first, "exclude": True}).status_code == 200
    assert kept() == [second]
    page = client.get("/image", params={"key": first}).text
    assert f'title="{second} (phash, kept)"' in page and f'title="{first} (phash)"' in page


def test_a_caption_of_blanks_goes_back_to_the_generated_one(review):
    """A caption of spaces alone was stored as a person's caption, and the export then wrote the
    tags as the image's text: blanks are no caption, as "" is not."""
    client, ws, _ = review
    key = all_keys(ws)[4]
    generated = client.get(f"/api/images/{key}").json()["row"]["caption"]
    client.post("/api/edits", json={"key": key, "caption": "  Someone wrote this.  "})
    row = client.get(f"/api/images/{key}").json()["row"]
    assert row["caption_edited"] and row["caption"] == "Someone wrote this."
    assert client.post("/api/edits", json={"key": key, "caption": " \n\t "}).status_code == 200
    row = client.get(f"/api/images/{key}").json()["row"]
    assert not row["caption_edited"] and row["caption"] == generated


def edits_scans_without_key_filter(con, sql: str) -> list[dict]:
    """The scans of `edits` (the only table with a `field` and a `batch`) in the plan of `sql` that
    read its keys with no filter on the key: each one reads every edit of the workspace."""
    import json as json_module

    found = []

    def walk(node: dict) -> None:
        info = node.get("extra_info", {})
        columns = info.get("Projections", [])
        columns = [columns] if isinstance(columns, str) else columns
        filters = info.get("Filters", [])
        filters = [filters] if isinstance(filters, str) else filters
        if {"key", "field", "batch"} <= set(columns) and not any("key" in f for f in filters):
            found.append(info)
        for child in node.get("children", []):
            walk(child)

    for node in json_module.loads(con.execute(f"explain (format json) {sql}").fetchall()[0][1]):
        walk(node)
    return found


def test_one_image_row_reads_only_that_image_edits(tmp_path):
    """The review page refreshes an edited image's row, and the image page reads its tags, with a key
    filter on image_tag_lists and the review query: that filter must reach the scans of `edits`.
    Through a materialized CTE, an anti join and `exists` subqueries it did not, and every such
    query sorted every edit of the workspace (1.7 s for one edit after a bulk action on 300,000
    images, 0.1 s once the filter reaches the scans)."""
    from datetime import UTC, datetime

    from review.selection import KEEP_ALL, REVIEW_QUERY
    from store.workspace import Workspace
    from tests.curate_data import image_rows

    ws = Workspace(str(tmp_path / "ws"))
    keys = ["a/1", "a/2", "a/3"]
    ws.add_part("images", "i", image_rows(keys))
    ws.add_part("tags", "t", [{"key": k, "tag": t, "category": "general", "score": 0.9, "rank": r}
                              for k in keys for r, t in enumerate(["red_hair", "smile"])])
    now = datetime.now(UTC)
    ws.add_part("edits", "e", [
        {"key": "a/1", "field": "tags", "old": "smile", "new": None, "time": now, "seq": 0, "batch": "b1"},
        {"key": "a/2", "field": "tags", "old": None, "new": "hat", "time": now, "seq": 1, "batch": "b1"},
        {"key": "a/3", "field": "not_duplicate", "old": "false", "new": "true", "time": now, "seq": 2, "batch": "b1"}])
    con = ws.connect()
    assert edits_scans_without_key_filter(con, "select * from image_tag_lists where key = 'a/2'") == []
    review_one = f"select * from ({REVIEW_QUERY}) where key = 'a/2'"
    for name, value in KEEP_ALL.items():
        review_one = review_one.replace(f"${name}", "[]::varchar[]" if value == [] else str(value).lower())
    assert edits_scans_without_key_filter(con, review_one) == []
    # and the rows are still right: a removed tag gone, an added one last, the flags of each image
    lists = dict(con.execute("select key, tags from image_tag_lists order by key").fetchall())
    assert lists == {"a/1": ["red_hair"], "a/2": ["red_hair", "smile", "hat"], "a/3": ["red_hair", "smile"]}
    rows = con.execute(f"select key, edited, not_duplicate from ({REVIEW_QUERY}) order by key", KEEP_ALL).fetchall()
    assert rows == [("a/1", True, False), ("a/2", True, False), ("a/3", True, True)]


def test_an_edits_part_is_in_key_order_in_row_groups_a_key_filter_can_skip(tmp_path, monkeypatch):
    """A bulk action over many images writes one edits part: as one row group (pyarrow's default is a
    million rows), a query of one image's edits read every row of it; in key order and in row groups,
    it reads the group of that key. The merge of many parts keeps that."""
    import pyarrow.parquet as pq

    from review import edits
    from store.workspace import Workspace

    monkeypatch.setattr(edits, "ROW_GROUP", 4, raising=False)
    monkeypatch.setattr(edits, "COMPACT_AT", 3)
    ws = Workspace(str(tmp_path / "ws"))
    log = edits.EditLog(ws)
    keys = [f"a/{i:02d}" for i in (7, 3, 11, 0, 9, 1, 5, 10, 2, 8, 4, 6)]  # in no order, as a person edits
    for batch in (keys, keys[:2], keys[2:5]):
        log.append([{"key": k, "field": "exclude", "old": "false", "new": "true"} for k in batch])

    def key_ranges(part: str) -> list[tuple[str, str]]:
        meta = pq.ParquetFile(f"{ws.table_dir('edits')}/{part}.parquet").metadata
        column = meta.schema.names.index("key")
        return [(meta.row_group(g).column(column).statistics.min, meta.row_group(g).column(column).statistics.max)
                for g in range(meta.num_row_groups)]

    [merged] = ws.published()["owned"]["review"]["edits"]  # the third batch merged the three parts
    ranges = key_ranges(merged)
    assert len(ranges) == 5 and all(hi <= lo for (_, hi), (lo, _) in zip(ranges, ranges[1:], strict=False))
    assert ws.connect().execute("select count(*) from edits").fetchone()[0] == 17


@pytest.mark.parametrize("storage", ["local", "s3"])
def test_a_bulk_action_remakes_only_the_key_ranges_of_its_images(tmp_path, monkeypatch, request, storage):
    """A bulk action over more images than are refreshed one by one rebuilt the whole review table
    (10 s at 300,000 images, every page waiting on it, for an action on one folder of 10,000): only
    the build's key ranges that hold its images are made again, and the table is then what a new
    build makes."""
    from starlette.testclient import TestClient

    from review import selection
    from review.app import ReviewApp
    from store.workspace import Workspace
    from tests.curate_data import image_rows

    monkeypatch.setattr(selection, "BUILD_CHUNK", 4)
    monkeypatch.setattr(selection, "REFRESH_EACH", 2)
    root = str(tmp_path / "ws")
    if storage == "s3":  # the tables are datasets registered on each cursor, not views
        from s3_server import AWS

        for name, value in AWS.items():
            monkeypatch.setenv(name, value)
        endpoint = request.getfixturevalue("s3_endpoint")
        root = f"s3://ws-bucket/review-ranges?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    ws = Workspace(root)
    keys = [f"{folder}/{i}" for folder in ("a", "b", "c") for i in range(6)]
    ws.add_part("images", "i", image_rows(keys))
    ws.add_part("tags", "t", [{"key": k, "tag": t, "category": "general", "score": 0.9, "rank": r}
                              for k in keys for r, t in enumerate(["red_hair", "smile"])])
    app = ReviewApp(base_config(tmp_path / "ws"), ws)  # the config's workspace is not read: ws is given
    client = TestClient(app.asgi(["testserver"]))
    assert app.index.total() == len(keys)
    builds, ranges, remake = [], [], app.index.refresh_ranges
    app.index.build = lambda generation: builds.append(generation)
    app.index.refresh_ranges = lambda made, published: ranges.append(made) or remake(made, published)

    def table(index) -> list[tuple]:
        return index.fresh().execute("select * exclude (sha256) from review_rows order by key").fetchall()

    answer = client.post("/api/bulk", json={"where": "key like 'b/%'", "remove_tags": ["smile"], "preview": False})
    assert answer.status_code == 200 and answer.json()["images"] == 6
    assert builds == [] and ranges == [[("a/4", "b/2"), ("b/2", "c/0")]]  # 2 of the 5 ranges of 4 images
    del app.index.build, app.index.refresh_ranges
    assert table(app.index) == table(selection.ReviewIndex(ws))
    assert [r["key"] for r in client.get("/api/images", params={"edited": "1", "limit": 100}).json()["images"]] == \
        keys[6:12]
    undone = client.post("/api/undo", json={"batch": answer.json()["batch"]})
    assert undone.status_code == 200 and "smile" in app.index.row("b/3")["tags"]
    assert table(app.index) == table(selection.ReviewIndex(ws))


def test_a_caption_loaded_without_quality_tags_shows_on_the_image_page(tmp_path):
    """captions rows a user loads (Workspace.add_part) may leave quality_tags null, as the schema
    allows; the image page joined them as a list and was a 500 with a traceback."""
    from starlette.testclient import TestClient

    from jobs.config import load_config
    from review.app import ReviewApp
    from store.workspace import Workspace
    from tests.curate_data import image_rows

    ws = Workspace(str(tmp_path / "ws"))
    ws.add_part("images", "i", image_rows(["a/1"]))
    ws.add_part("captions", "c", [{"key": "a/1", "attempt": 0, "backend": "loaded", "caption": "a girl on a hill",
                                   "accuracy": 0.8, "accepted": True, "flagged": False}])
    client = TestClient(ReviewApp(load_config(None, []), ws).asgi(["testserver"]))
    page = client.get("/image", params={"key": "a/1"})
    assert page.status_code == 200 and "a girl on a hill" in page.text
    assert client.get("/api/images/a/1").json()["captions"][0]["quality_tags"] is None


def test_an_undo_does_not_sort_every_edit_of_the_workspace(review):
    """An undo asked edit_state whether its batch still decides each of its edits: a window over
    every edit of the workspace (0.15 s per undo after a bulk action on 300,000 images, growing with
    the log); whether a later edit of the same image, field and subject exists answers it from the
    batch's own rows (0.015 s). The undo tests above check what it takes back."""
    import json as json_module

    from review.edits import UNDO_SQL

    client, ws, _ = review
    key = all_keys(ws)[0]
    batch = client.post("/api/edits", json={"key": key, "add_tags": ["undo_plan_tag"]}).json()["batch"]
    whole = []

    def walk(node: dict) -> None:
        scans = [c for c in node.get("children", []) if c["name"] == "READ_PARQUET"]
        if node["name"] == "WINDOW" and any("Filters" not in c.get("extra_info", {}) for c in scans):
            whole.append(node["extra_info"])
        for child in node.get("children", []):
            walk(child)

    con = ws.connect()
    plan = con.execute("explain (format json) " + UNDO_SQL.replace("$batch", f"'{batch}'")).fetchall()[0][1]
    for node in json_module.loads(plan):
        walk(node)
    assert whole == []
    assert con.execute(UNDO_SQL, {"batch": batch}).fetchall() == [(key, "tags", "undo_plan_tag", None)]


def test_a_picture_replaced_and_ingested_again_gets_a_thumbnail_url_of_its_own(tmp_path, ray_local):
    """The grid's thumbnails were /thumb?key=KEY, kept by the browser for an hour: a picture
    replaced in its folder and ingested again (a new sha256, a new thumbnail on the server) still
    showed the old thumbnail on the page. The URL names the picture now."""
    import re

    from starlette.testclient import TestClient

    from jobs import ingest
    from jobs.config import load_config
    from review.app import ReviewApp
    from store.workspace import Workspace
    from tests.hostile_data import encode, picture

    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(encode(picture(seed=1), "PNG"))
    ws = Workspace(str(tmp_path / "ws"))
    cfg = load_config(None, [f'workspace.path="{ws.root}"', "ray.num_cpus=2", f'ingest.inputs=["{folder}"]'])

    def thumb_url() -> str:
        ingest.run(cfg, ws)
        client = TestClient(ReviewApp(cfg, ws).asgi(["testserver"]))
        found = re.findall(r'src="(thumb\?[^"]*)"', client.get("/").text)
        assert len(found) == 1 and client.get("/" + found[0].replace("&amp;", "&")).status_code == 200
        return found[0]

    before = thumb_url()
    (folder / "a.png").write_bytes(encode(picture(seed=2), "PNG"))  # another picture
    assert thumb_url() != before


def test_a_filter_longer_than_any_condition_is_refused_and_checked_filters_stay_small(review):
    """A filter of any length was parsed (DuckDB's tokenizer and parser: ~10 s for 8 MB, which no
    timer stops, the one connection held) and kept among the checked filters, 257 of them (~4 GB
    of 8 MB filters). Sent by anyone who can reach the server, or by a page's link to it."""
    from review.selection import MAX_FILTER_CHARS

    client, ws, app = review
    long = "key = 'x' or " * (MAX_FILTER_CHARS // 13 + 1) + "true"
    answer = client.get("/api/images", params={"where": long})
    assert answer.status_code == 400 and f"over {MAX_FILTER_CHARS}" in answer.json()["error"]
    bulk = client.post("/api/bulk", json={"tag": "x" * (MAX_FILTER_CHARS + 1), "preview": True})
    assert bulk.status_code == 400 and f"over {MAX_FILTER_CHARS}" in bulk.json()["error"]
    assert client.get("/api/images", params={"where": long[-MAX_FILTER_CHARS:].split(" or ", 1)[1]}).status_code == 200
    # filters just under the bound, each checked once: what is kept of them stays a few MB
    for i in range(300):
        assert client.get("/api/images", params={"tag": f"{i:04d}" + "t" * (MAX_FILTER_CHARS - 4),
                                                 "limit": 1}).status_code == 200
    kept = sum(len(text) for f in app.index.checked for text in (f.where, f.character, f.group, f.tag))
    assert kept < 8_000_000


def test_the_credentials_in_an_object_storage_address_are_shown_nowhere(tmp_path):
    """pyarrow takes an input's credentials in its address (`s3://KEY:SECRET@bucket/...`): the 503
    of an image whose store failed dropped the address's options but said the key and secret, and
    the image page showed them with the image's source and in the export's KEY.json it previews
    (the export wrote them there too: every trainer's copy of the set held them)."""
    from starlette.testclient import TestClient

    from jobs.config import load_config
    from review.app import ReviewApp
    from store.uris import redacted, store_failure
    from store.workspace import Workspace

    source = "s3://AKIDEXAMPLE:s3cr3t%2Fx@ws-bucket/in/?endpoint_override=h:9000"
    failure = str(store_failure(OSError("AWS Error ACCESS_DENIED during GetObject operation: denied"), source))
    assert "s3://***@ws-bucket/in/" in failure and "s3cr3t" not in failure and "AKIDEXAMPLE" not in failure
    assert redacted("s3://ws-bucket/a@b/c.tar") == "s3://ws-bucket/a@b/c.tar"  # an @ in the path is no user
    assert redacted("/data/in@home/a.tar") == "/data/in@home/a.tar"
    ws = Workspace(str(tmp_path / "ws"), create=True)
    ws.add_part("images", "hand", [{"key": "in/a", "source": source, "member": "a.png", "width": 96, "height": 64,
                                    "format": "PNG", "mode": "RGB", "n_frames": 1, "bytes": 10, "sha256": "0" * 64}])
    client = TestClient(ReviewApp(load_config(None, [f'workspace.path="{ws.root}"']), ws).asgi(["testserver"]))
    page = client.get("/image", params={"key": "in/a"})
    assert page.status_code == 200 and "ws-bucket/in/" in page.text
    assert "s3cr3t" not in page.text and "AKIDEXAMPLE" not in page.text
    assert "s3://***@ws-bucket/in/" in page.text.split('id="export-json"')[1]
    # the JSON API's rows (a script's copy, logged and pasted) say the address as the page does
    details = client.get("/api/images/in/a")
    assert details.status_code == 200 and details.json()["row"]["source"].startswith("s3://***@ws-bucket/in/")
    for answer in (details, client.get("/api/images")):
        assert answer.status_code == 200 and "s3cr3t" not in answer.text and "AKIDEXAMPLE" not in answer.text


def test_an_undo_leaves_standing_an_edit_another_server_wrote_while_it_waited(review):
    """An undo's edits were worked out before the workspace was taken: another review server's
    edit of the same field, written in between, was overwritten by the undo of an older one."""
    import threading
    import time

    from starlette.testclient import TestClient

    from review.app import ReviewApp
    from review.edits import EditLog
    from store.lock import WorkspaceLock
    from tests.export_data import base_config

    client, ws, _ = review
    key = all_keys(ws)[11]
    mine = client.post("/api/edits", json={"key": key, "caption": "Mine."}).json()["batch"]
    client.get(f"/api/images/{key}")  # the review table up to date: the undo is quick to reach the workspace
    answers: list = []
    with WorkspaceLock(ws, "another review server", 0):
        undo = threading.Thread(target=lambda: answers.append(client.post("/api/undo", json={"batch": mine})))
        undo.start()
        time.sleep(1.0)  # the undo waits for the workspace (up to SHORT_WAIT_S)
        EditLog(ws).write([{"key": key, "field": "caption", "old": "Mine.", "new": "Theirs."}])
    undo.join()
    assert answers[0].status_code == 404, answers[0].json()  # nothing of it still decides
    other = TestClient(ReviewApp(base_config(Path(ws.base)), ws).asgi(["testserver"]))
    assert other.get(f"/api/images/{key}").json()["row"]["caption"] == "Theirs."
    assert client.get(f"/api/images/{key}").json()["row"]["caption"] == "Theirs."
    client.post("/api/edits", json={"key": key, "caption": ""})
