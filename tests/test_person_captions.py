"""Captions that know who is where, end to end: ingest a composed picture of two sample sprites
side by side, annotate it (person detector, and the tagger on the whole picture and on each
person crop), curate (person_tags), caption with the template.

The models are tiny ONNX fakes with the production contracts (tests/onnx_fakes.py), arranged
for this picture: the person detector finds the two sprites wherever it looks, and the tagger's
hair-colour scores follow the mean colour of what it sees, set so that Eileen's crop scores red
hair and Lucy's black hair (real models cannot be had offline).
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tests.conftest import shared_path
from tests.onnx_fakes import (
    DETECTORS,
    LABELS_FILE,
    LABELS_REPO,
    TAGGER_FILE,
    TAGGER_REPO,
    colour_tagger,
    fixed_boxes_yolo,
)

CANVAS = (800, 720)
SPRITES = {"eileen_happy.png": 40, "lucy_happy.png": 380}  # left edge of each sprite on the canvas
BOXES = [(40, 0, 360, 720), (380, 0, 800, 720)]  # the sprites, in canvas pixels


def compose(path, backgrounds: tuple = ((255, 255, 255), (255, 255, 255))) -> Image.Image:
    """The two sprites side by side, each on its half's background colour."""
    canvas = Image.new("RGB", CANVAS, backgrounds[0])
    canvas.paste(backgrounds[1], (CANVAS[0] // 2, 0, *CANVAS))
    for name, left in SPRITES.items():
        sprite = Image.open(shared_path("samples", "renpy", name)).convert("RGBA")
        canvas.paste(sprite, (left, 0), sprite)
    canvas.save(path)
    return canvas


def seen_means(canvas: Image.Image, padding: float, regions: bool) -> tuple[list, list]:
    """The mean BGR (0..1) the tagger sees of each left and right thing: the person crops and,
    with `regions`, the 2x2 regions, through annotate's own cropping and tagger preprocessing."""
    from udfs.annotate.images import crop_box, region_images, tagger_input

    def mean(image: Image.Image) -> np.ndarray:
        return tagger_input(image, 448).reshape(-1, 3).mean(axis=0) / 255.0

    left, right = [[mean(canvas.crop(crop_box(*canvas.size, box, padding)))] for box in BOXES]
    if regions:
        top_left, top_right, bottom_left, bottom_right = region_images(canvas, 0.1)
        left += [mean(top_left), mean(bottom_left)]
        right += [mean(top_right), mean(bottom_right)]
    return left, right


def models_dir(root, canvas: Image.Image, padding: float, regions: bool):
    """The arranged fakes: the colour tagger scores red hair on what lies left, black hair on
    what lies right (along the line between the two person crops' mean colours)."""
    labels = shared_path("tagdata", "wd_v3_selected_tags.csv")
    names = pd.read_csv(labels)["name"].tolist()
    left, right = seen_means(canvas, padding, regions)
    direction = np.mean(left, axis=0) - np.mean(right, axis=0)
    low, high = min(direction @ m for m in left), max(direction @ m for m in right)
    assert low > high, "the composed picture's left and right look alike to the colour tagger"
    steep, middle = 24.0 / (low - high), (low + high) / 2  # logit >= +12 on the left, <= -12 on the right
    rules = {names.index("red_hair"): (steep * direction, -steep * middle),
             names.index("black_hair"): (-steep * direction, steep * middle)}
    colour_tagger(root / TAGGER_REPO / TAGGER_FILE, len(names), rules)
    (root / LABELS_REPO).mkdir(parents=True, exist_ok=True)
    (root / LABELS_REPO / LABELS_FILE).write_bytes(labels.read_bytes())
    repo, folder, label, _ = DETECTORS["person"]
    sx, sy = 640 / CANVAS[0], 640 / CANVAS[1]  # the detector sees the picture stretched to 640 x 640
    # scores 0.9 and 0.8: the detector lists its boxes best first, so Eileen is person 0
    boxes = [((x0 + x1) / 2 * sx, (y0 + y1) / 2 * sy, (x1 - x0) * sx, (y1 - y0) * sy, score)
             for (x0, y0, x1, y1), score in zip(BOXES, (0.9, 0.8), strict=True)]
    fixed_boxes_yolo(root / repo / folder / "model.onnx", label, boxes)
    (root / repo / folder / "model_type.json").write_text('{"model_type": "yolo"}')
    return root


@pytest.fixture
def duo(tmp_path, config, workspace, ray_local):
    return prepare(tmp_path, config, workspace)


def prepare(tmp_path, config, workspace, backgrounds: tuple = ((255, 255, 255), (255, 255, 255)),
            regions: bool = False):
    from jobs.config import merge

    folder = tmp_path / "in"
    folder.mkdir()
    canvas = compose(folder / "duo.png", backgrounds)
    # the sidecar: the image's tags as a booru would have them, hair colours of both girls mixed
    (folder / "duo.txt").write_text("2girls, red_hair, black_hair, smile, standing, outdoors")
    padding = float(config["annotate"]["ccip"]["crop_padding"])
    merge(config, {"ingest": {"inputs": [str(folder)]},
                   "annotate": {"models": ["person", "tagger"], "draft_size": 0,
                                "models_dir": str(models_dir(tmp_path / "models", canvas, padding, regions))},
                   "caption": {"concurrency": 1, "tags_from_text": False, "related_tags": False}})
    return config, workspace


def test_each_person_is_captioned_with_their_own_hair_and_place(duo):
    from jobs import annotate, caption, curate, ingest

    config, ws = duo
    for job in (ingest, annotate, curate, caption):
        job.run(config, ws)
    crops = ws.connect().execute("select crop, tag from tag_scores where crop >= 0 order by all").fetchall()
    assert crops == [(0, "red_hair"), (1, "black_hair")]
    persons = ws.read_table("person_tags").to_pylist()
    assert [(p["position"], p["tags"]) for p in persons] == [("left", ["red_hair"]), ("right", ["black_hair"])]
    (row,) = ws.read_table("captions").to_pylist()
    assert row["caption"].startswith("Two girls. On the left, a girl with red hair; on the right, a girl with "
                                     "black hair. They are ")
    assert row["not_scored"] == "built_from_tags"


def test_each_person_is_named_from_the_ccip_references(duo, tmp_path):
    """With CCIP and a reference picture per character, curate knows which crop is Eileen."""
    from jobs import annotate, caption, curate, ingest
    from jobs.config import merge
    from tests.onnx_fakes import CCIP_FILE, CCIP_REPO, ccip_model

    config, ws = duo
    ccip_model(Path(config["annotate"]["models_dir"]) / CCIP_REPO / CCIP_FILE)
    references = tmp_path / "references"
    for character, name in (("eileen_(ren'py)", "eileen_happy.png"), ("lucy_(ren'py)", "lucy_happy.png")):
        (references / character).mkdir(parents=True)
        (references / character / name).write_bytes(shared_path("samples", "renpy", name).read_bytes())
    (tmp_path / "in" / "duo.txt").write_text("2girls, red_hair, black_hair, smile, standing, outdoors, "
                                              "character:eileen_(ren'py), character:lucy_(ren'py)")
    merge(config, {"annotate": {"models": ["person", "ccip", "tagger"]}, "curate": {"references": str(references)}})
    for job in (ingest, annotate, curate, caption):
        job.run(config, ws)
    clusters = sorted((r["crop"], r["character"]) for r in ws.read_table("clusters").to_pylist())
    assert clusters == [(0, "eileen_(ren'py)"), (1, "lucy_(ren'py)")]
    persons = ws.read_table("person_tags").to_pylist()
    assert [p["tags"] for p in persons] == [["eileen_(ren'py)", "red_hair"], ["lucy_(ren'py)", "black_hair"]]
    (row,) = ws.read_table("captions").to_pylist()
    assert row["caption"].startswith("Two girls. On the left, Eileen with red hair; on the right, Lucy with black "
                                     "hair. They are standing.")


def test_the_2x2_option_tags_and_captions_four_regions_and_export_joins_them(tmp_path, config, workspace, ray_local):
    import webdataset as wds

    from jobs import annotate, caption, curate, export, ingest
    from jobs.config import merge

    # each half on a colour of its own, so that the colour tagger tells the halves' regions apart too
    config, ws = prepare(tmp_path, config, workspace, ((250, 90, 60), (50, 60, 140)), regions=True)
    merge(config, {"annotate": {"tagger": {"regions": True}}, "caption": {"regions": True},
                   "export": {"text": "regions", "out": str(tmp_path / "out")}})
    summaries = {job.__name__: job.run(config, ws) for job in (ingest, annotate, curate, caption, export)}
    regions = {r["region"]: r for r in ws.read_table("caption_regions").to_pylist()}
    assert sorted(regions) == ["bottom left", "bottom right", "top left", "top right"]
    # the summary counts every table the job writes: it said "rows out: captions 1" alone
    assert summaries["jobs.caption"].rows_out["caption_regions"] == 4
    # the left half is Eileen's (the colour tagger's red), the right half Lucy's
    for name, hair in (("top left", "red_hair"), ("bottom left", "red_hair"), ("top right", "black_hair"),
                       ("bottom right", "black_hair")):
        assert regions[name]["tags"] == [hair] and regions[name]["caption"] == f"{hair.replace('_', ' ').capitalize()}."
    (sample,) = list(wds.WebDataset(sorted(str(p) for p in (tmp_path / "out").rglob("*.tar")), shardshuffle=False))
    text = sample["txt"].decode()
    assert text == "top left: Red hair; top right: Black hair; bottom left: Red hair; bottom right: Black hair"


class ColourVLM:
    """A VLM double on loopback (no VLM's weights can be had offline, and a random one says
    nothing checkable): it answers each request with the mean colour and the size of the image it
    was shown, so a caption tells which crop reached the model. Requests of model "flaky" for the
    bottom right region are refused (400), as a real server refuses what it cannot take."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.prompts: list[str] = []
        vlm = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                status, reply = vlm.answer(body)
                payload = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def answer(self, body: dict) -> tuple[int, dict]:
        content = body["messages"][-1]["content"]
        text = content[-1]["text"] if isinstance(content, list) else content
        self.prompts.append(text)
        if body["model"] == "flaky" and text.startswith("This is the bottom right quarter"):
            return 400, {"error": "refused"}
        url = content[0]["image_url"]["url"]
        image = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
        r, g, b = (round(v) for v in np.asarray(image).reshape(-1, 3).mean(axis=0))
        return 200, {"choices": [{"message": {"role": "assistant",
                                              "content": f"mean {r} {g} {b} size {image.width}x{image.height}"}}]}

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def region_boxes(width: int, height: int, overlap: float) -> dict[str, tuple]:
    """Where each 2x2 region lies, with its overlap: the boxes the model must have been shown."""
    mid_x, mid_y, rx, ry = width // 2, height // 2, round(overlap * width), round(overlap * height)
    xs = {"left": (0, mid_x + rx), "right": (mid_x - rx, width)}
    ys = {"top": (0, mid_y + ry), "bottom": (mid_y - ry, height)}
    return {f"{v} {h}": (xs[h][0], ys[v][0], xs[h][1], ys[v][1]) for v in ys for h in xs}


def test_a_vlm_captions_each_2x2_region_from_its_own_crop(tmp_path, config, workspace, ray_local):
    """caption.regions with a VLM: each region's caption comes from that region's crop (the
    double names the mean colour and size of what it saw), with the region's own tags in the
    prompt; a region the server refuses keeps its template caption and leaves an errors row.
    Both VLM backends: openai (actors calling the server) and vllm (the ray.data.llm stream,
    through caption.vllm_url, as no GPU is here for an engine)."""
    from jobs import annotate, caption, curate, ingest
    from jobs.config import merge

    config, ws = prepare(tmp_path, config, workspace, ((250, 90, 60), (50, 60, 140)), regions=True)
    merge(config, {"annotate": {"tagger": {"regions": True}}})
    for job in (ingest, annotate, curate):
        job.run(config, ws)
    canvas = Image.open(tmp_path / "in" / "duo.png").convert("RGB")
    boxes = region_boxes(*canvas.size, float(config["annotate"]["tagger"]["region_overlap"]))
    truth = {name: np.asarray(canvas.crop(box)).reshape(-1, 3).mean(axis=0) for name, box in boxes.items()}
    vlm = ColourVLM()
    try:
        for backend, model in (("openai", "flaky"), ("vllm", "steady")):
            merge(config, {"caption": {
                "backend": backend, "regions": True, "base_url": vlm.url, "model": model, "vllm_url": vlm.url,
                "vllm_model": model, "api_key_env": "", "max_attempts": 1, "max_retries": 0, "backoff_s": 0.01,
                "vllm_concurrency": 1, "vllm_batch_size": 8}})
            vlm.prompts.clear()
            caption.run(config, ws)
            regions = {r["region"]: r for r in ws.read_table("caption_regions").to_pylist()}
            assert sorted(regions) == sorted(boxes)
            for name, row in regions.items():
                if model == "flaky" and name == "bottom right":
                    assert (row["backend"], row["caption"]) == ("template:english", "Black hair.")
                    continue
                said = re.fullmatch(r"mean (\d+) (\d+) (\d+) size (\d+)x(\d+)", row["caption"])
                seen = [int(v) for v in said.groups()]
                box = boxes[name]
                assert seen[3:] == [box[2] - box[0], box[3] - box[1]], (name, row["caption"])
                # the mean colour of its own crop (blurred at the borders, through JPEG), not another's
                nearest = min(truth, key=lambda other: np.abs(truth[other] - seen[:3]).sum())
                assert nearest == name and np.abs(truth[name] - seen[:3]).max() < 8, (name, row["caption"])
                assert row["backend"] == f"{backend}:{model}"
            asked = [p for p in vlm.prompts if p.startswith("This is the top left quarter")]
            assert len(asked) == 1 and "general tags: red hair" in asked[0]
            refused = [e for e in ws.read_table("errors").to_pylist() if e["stage"] == f"caption:{backend}"]
            if model == "flaky":
                assert [(e["kind"], e["dropped"]) for e in refused] == [("http_error", False)]
                assert "region bottom right" in refused[0]["message"]
            else:
                assert refused == []
            # the whole picture was captioned from the whole picture, and scored against the tagger
            (whole,) = [r for r in ws.read_table("captions").to_pylist() if r["accepted"]]
            shown = canvas.copy()
            shown.thumbnail((config["caption"]["image_max_side"],) * 2)
            assert whole["caption"].endswith(f"size {shown.width}x{shown.height}")
            assert whole["scored_against"] == "tagger"
    finally:
        vlm.close()
