"""booruset review in a real browser, as a person uses it: the real command serves the prepared
sample on loopback, headless Chromium (the system one `make browser` installs, driven by
Playwright) filters the grid by a character, opens an image, removes a tag with the keyboard; then
caption and export run and the exported KEY.txt no longer has the tag. Screenshots of the grid
and the image page are left in test-artifacts/."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.export_data import base_config, prepared_workspace
from tests.test_run import booruset_command

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture
def served(tmp_path_factory, ray_local, request):
    """The prepared sample served by `booruset review` on the free loopback port it is given (port
    0: a port picked here and bound later by the server could be taken in between); more arguments
    for it by indirect parametrization. Yields the workspace and the address it prints."""
    path = prepared_workspace(tmp_path_factory)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    more = list(getattr(request, "param", []))
    server = subprocess.Popen([*booruset_command(), "review", "-w", str(path), "--port", "0", *more], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        started = time.monotonic()
        for line in server.stdout:
            opened = re.search(r"review: open (http://127\.0\.0\.1:\d+/\S*)", line)
            if opened:
                break
            assert time.monotonic() - started < 120, "review did not start"
        else:
            pytest.fail(f"review exited: {server.wait()}")
        yield path, opened.group(1)
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_a_port_in_use_is_one_line_and_no_address(served):
    """Another server on the port: this one says so and exits 2, printing no address to open."""
    path, url = served
    port = url.rsplit(":", 1)[1].strip("/")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    second = subprocess.run([*booruset_command(), "review", "-w", str(path), "--port", port], env=env,
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and "review: open" not in second.stdout
    assert f"cannot listen on 127.0.0.1:{port}" in second.stderr and "Traceback" not in second.stderr


def pick_image(path) -> tuple[str, str, str]:
    """A character, an exported image of it (on the filtered grid's first page: the sample is small),
    and a tag of it that the caption puts in words."""
    from store.workspace import Workspace

    con = Workspace(str(path)).connect()
    rows = con.execute("""select m.key, unnest(m.characters) as character, t.tags, c.caption
                          from image_meta m join image_tag_lists t using (key)
                          join captions c on c.key = m.key and c.accepted and not c.flagged
                          where m.key not in (select key from duplicates where not is_representative)
                          order by m.key""").fetchall()
    for key, character, tags, caption in rows:
        spoken = [t for t in tags if "_" in t and t.replace("_", " ") in caption.lower()]
        if spoken:
            return character, key, spoken[0]
    pytest.fail("no captioned image with a character and a multi-word tag in its caption")


def exported_txt(path, key: str) -> tuple[str, dict]:
    import json

    import webdataset as wds

    from store.workspace import Workspace

    con = Workspace(str(path)).connect()
    sample_key, shard = con.execute("select sample_key, path from export_manifest where key = $k and "
                                    "layout = 'webdataset'", {"k": key}).fetchone()
    for sample in wds.WebDataset(str(path / "export" / shard), shardshuffle=False):
        if sample["__key__"] == sample_key:
            return sample["txt"].decode(), json.loads(sample["json"])
    pytest.fail(f"{sample_key} not in {shard}")


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make browser)")
def test_filter_open_remove_a_tag_by_keyboard_and_export_honours_it(served):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (the test extra)")
    from jobs import caption, export

    path, url = served
    character, key, tag = pick_image(path)
    txt_before, _ = exported_txt_or_none(path, key)
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1300, "height": 1000})
        page.goto(url)
        page.fill("input[name=character]", character)
        page.click("#apply-filter")
        page.wait_for_load_state("load")
        cards = page.locator("#grid li.card")
        assert cards.count() >= 1
        for i in range(cards.count()):
            assert character in cards.nth(i).inner_text()
        page.wait_for_function("Array.from(document.images).slice(0, 4).every(i => i.complete && i.naturalWidth > 0)")
        page.screenshot(path=str(ARTIFACTS / "review-grid.png"), full_page=True)

        page.locator(f'#grid li.card[data-key="{key}"] a').click()
        page.wait_for_load_state("load")
        assert page.locator("#image-page").get_attribute("data-key") == key
        assert page.locator(f'#tags tr[data-tag="{tag}"]').get_attribute("data-present") == "yes"
        page.keyboard.press("t")
        page.keyboard.type(f"-{tag}")
        with page.expect_navigation():
            page.keyboard.press("Enter")
        assert page.locator(f'#tags tr[data-tag="{tag}"]').get_attribute("data-present") == "no"
        assert tag not in page.locator("#export-json").inner_text().split('"tag_scores"')[0]
        page.wait_for_function("document.getElementById('picture').complete")
        page.screenshot(path=str(ARTIFACTS / "review-image.png"), full_page=True)
        next_link = page.locator("#next-image")
        if next_link.count():
            with page.expect_navigation():
                page.keyboard.press("j")
            assert page.locator("#image-page").get_attribute("data-key") > key
        browser.close()

    cfg = base_config(path)
    ws = __import__("store.workspace", fromlist=["Workspace"]).Workspace(str(path))
    caption.run(cfg, ws)
    export.run(cfg, ws)
    txt, meta = exported_txt(path, key)
    assert tag not in meta["tags"]
    assert tag.replace("_", " ") not in txt.lower(), txt
    assert txt_before is None or txt != txt_before


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (make browser)")
@pytest.mark.parametrize("served", [["--token", "s3cret"]], indirect=True)
def test_the_address_with_the_token_opened_from_a_link_on_another_site_shows_the_grid(served):
    """The printed address clicked in a web page of another site (a web terminal, a notebook, a
    chat) answered "token required", and so did every reload: the token visit set the cookie and
    redirected, and a browser does not send a SameSite=Strict cookie in a navigation another site
    started, that redirect's included. Only a typed address worked."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed (the test extra)")

    _, url = served
    assert url.endswith("?token=s3cret")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page()
        page.route("http://terminal.example/", lambda route: route.fulfill(
            content_type="text/html", body=f'<a id="open" href="{url}">open review</a>'))
        page.goto("http://terminal.example/")
        with page.expect_navigation(url=url.split("?")[0]):
            page.click("#open")
        assert page.locator("#grid li.card").count() >= 1, page.content()[:300]
        page.reload()
        assert page.locator("#grid li.card").count() >= 1, page.content()[:300]
        browser.close()


def exported_txt_or_none(path, key: str) -> tuple[str | None, dict | None]:
    if not (path / "export").exists():
        return None, None
    return exported_txt(path, key)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
