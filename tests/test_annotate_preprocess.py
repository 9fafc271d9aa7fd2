"""The tagger's preprocessing is imgutils' own, pixel for pixel, and does no work the tagger
never sees (no flattening on white, no OpenCV thread pool per decode task)."""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO


def _picture(rng: np.random.Generator, width: int, height: int, mode: str) -> Image.Image:
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))
    if mode == "RGBA":
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), np.uint8)))
    elif mode == "LA":
        image = image.convert("L")
        image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width), np.uint8)))
    elif mode == "P":
        image = image.convert("P")
        image.info["transparency"] = 0
    elif mode != "RGB":
        image = image.convert(mode)
    return image


# wide (the rows-only x pass), tall, square, already at the model's side, one pixel high
SHAPES = [(1280, 720), (1024, 653), (999, 1), (320, 720), (600, 600), (448, 300), (300, 448), (448, 448),
          (1500, 1499), (97, 31), (1, 999), (31, 97), (40, 5000)]


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA", "P", "1"])
def test_tagger_input_is_imgutils_pixel_for_pixel(mode):
    """For a grey or 1-bit picture, imgutils' of its RGB copy: imgutils pastes it through itself
    as a mask (test_grey_pictures_reach_the_tagger_as_they_look)."""
    from imgutils.tagging.wd14 import _prepare_image_for_tagging

    from udfs.annotate.images import tagger_input

    rng = np.random.default_rng(3)
    for width, height in SHAPES:
        for target in (448, 64):
            image = _picture(rng, width, height, mode)
            theirs = _prepare_image_for_tagging(image.convert("RGB") if mode in ("L", "1") else image, target)[0]
            ours = tagger_input(image, target)
            assert ours.dtype == np.uint8 and ours.flags.c_contiguous
            assert np.array_equal(ours.astype(np.float32), theirs), (width, height, mode, target)


def test_a_tall_picture_is_never_padded_to_a_whole_square(monkeypatch):
    """A webtoon strip (800 x 16,000 pixels, far under ingest.max_pixels) was pasted on a white
    16,000-pixel square, 768 MB, to make the tagger's 448 x 448 input (969 MiB more peak memory
    in the decode task than its 16,000 x 800 twin, and 1x20,000 took 1.5 GiB): no image made on
    the way holds more than a few million pixels, and the input is still imgutils' (above)."""
    from udfs.annotate import images

    made = []
    new = Image.new

    def recording_new(mode, size, *args, **kwargs):
        made.append(size[0] * size[1])
        return new(mode, size, *args, **kwargs)

    monkeypatch.setattr(images.Image, "new", recording_new)
    tall = Image.new("RGB", (200, 8000), (10, 200, 30))
    assert images.tagger_input(tall, 448).shape == (448, 448, 3)
    assert made and max(made) <= 1 << 22


@pytest.mark.parametrize("mode", ["L", "1"])
def test_grey_pictures_reach_the_tagger_as_they_look(mode):
    """A black square on white: imgutils' input is all white (the picture masks itself). Ours
    keeps the square, as the 2x2 regions' and CCIP's inputs of the same picture do."""
    from imgutils.tagging.wd14 import _prepare_image_for_tagging

    from udfs.annotate.images import tagger_input

    image = Image.new(mode, (128, 96), 255)
    image.paste(0, (32, 16, 96, 80))
    ours = tagger_input(image, 64)
    assert ours[32, 32].tolist() == [0, 0, 0] and ours[2, 32].tolist() == [255, 255, 255]
    assert np.array_equal(ours, tagger_input(image.convert("RGB"), 64))
    assert _prepare_image_for_tagging(image, 64)[0][32, 32].tolist() == [255, 255, 255]  # imgutils' blank


def test_tagger_alone_skips_the_flattening(monkeypatch):
    """The detectors' and CCIP's inputs start from the picture flattened on white; the tagger
    pastes onto its own square, so a tagger-only decode never flattens (a full-size paste and
    conversion per transparent picture)."""
    from udfs.annotate import annotate_rows

    image = _picture(np.random.default_rng(0), 200, 120, "RGBA")
    data = io.BytesIO()
    image.save(data, format="PNG")
    calls = []
    real = annotate_rows.to_rgb_on_white
    monkeypatch.setattr(annotate_rows, "to_rgb_on_white", lambda im: calls.append(im) or real(im))
    out = annotate_rows.make_inputs(data.getvalue(), {"in_tagger": ["tagger", 64]}, 0)
    assert out["in_tagger"].shape == (64, 64, 3) and calls == []
    annotate_rows.make_inputs(data.getvalue(), {"in_tagger": ["tagger", 64], "in_yolo": ["yolo", [64, 64]]}, 0)
    assert len(calls) == 1  # decoded and flattened once for every model that wants it


def test_annotate_preprocessing_runs_opencv_on_one_thread():
    """Ray runs many decode tasks per node and OpenCV's pool ignores OMP_NUM_THREADS: importing
    the preprocessing sets one thread (a fresh interpreter, so nothing else set it before)."""
    code = "import udfs.annotate.images, cv2; print(cv2.getNumThreads())"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "1"
