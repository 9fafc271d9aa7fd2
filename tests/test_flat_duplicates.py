"""Near duplicates that mean it: flat and smooth images (whose pHash says nothing) are compared by
colour, identical files are always duplicates, detailed images still pair by pHash."""

from __future__ import annotations

import colorsys
import random
import shutil

import pytest
from PIL import Image, ImageDraw

from jobs import curate, ingest
from jobs.config import load_config
from store.workspace import Workspace

pytestmark = pytest.mark.usefixtures("ray_local")


def flat(rgb: tuple[int, int, int]) -> Image.Image:
    return Image.new("RGB", (256, 256), rgb)


def gradient(top: tuple[int, int, int], bottom: tuple[int, int, int]) -> Image.Image:
    mask = Image.linear_gradient("L").resize((256, 256))
    return Image.composite(flat(bottom), flat(top), mask)


def drawing(seed: int) -> Image.Image:
    """Shapes of many colours: an image with structure at the scale the pHash sees."""
    rng = random.Random(seed)
    image = flat((255, 255, 255))
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x, y = rng.randrange(200), rng.randrange(200)
        draw.ellipse((x, y, x + rng.randrange(20, 90), y + rng.randrange(20, 90)),
                     fill=tuple(rng.randrange(256) for _ in range(3)))
    return image


def sketch(seed: int) -> Image.Image:
    """A few faint grey lines on white: a picture with content whose detail is below
    curate.phash_min_detail (1 to 3), flat to the duplicates' rules."""
    rng = random.Random(seed)
    image = Image.new("RGB", (800, 800), (250, 250, 250))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(1, 6)):
        draw.line([(rng.randrange(800), rng.randrange(800)), (rng.randrange(800), rng.randrange(800))],
                  fill=(200, 200, 200), width=rng.randrange(2, 10))
    return image


def write_folder(folder) -> dict[str, str]:
    """The pictures, by name, with what each must be a duplicate of ("" = of nothing)."""
    folder.mkdir()
    expect = {}
    for i in range(19):  # 19 flat colours, hues apart
        r, g, b = (int(255 * c) for c in colorsys.hsv_to_rgb(i / 19, 0.8, 0.9))
        flat((r, g, b)).save(folder / f"flat_{i:02d}.png")
        expect[f"flat_{i:02d}"] = ""
    gradient((255, 0, 0), (0, 0, 255)).save(folder / "grad_red_blue.png")
    gradient((0, 255, 0), (255, 255, 0)).save(folder / "grad_green_yellow.png")
    expect |= {"grad_red_blue": "", "grad_green_yellow": ""}
    shutil.copy(folder / "flat_00.png", folder / "flat_00_copy.png")  # the same bytes
    flat((20, 40, 200)).save(folder / "blue.png")
    flat((20, 40, 200)).save(folder / "blue_again.jpg", quality=90)  # same colour, other bytes
    detailed = drawing(seed=7)
    detailed.save(folder / "detailed.png")
    detailed.resize((128, 128)).save(folder / "detailed_small.png")
    # its half-size JPEG has a pHash 2 bits away and the same colour: flat images paired only
    # with the very same pHash, so that a pale picture and its resized copy were no duplicates;
    # other sketches of that colour are 24 to 34 bits away
    sketch(0).save(folder / "sketch.png")
    sketch(0).resize((400, 400), Image.Resampling.LANCZOS).save(folder / "sketch_small.jpg", quality=90)
    for seed in (1, 2, 4):
        sketch(seed).save(folder / f"sketch_{seed}.png")
        expect[f"sketch_{seed}"] = ""
    expect |= {"sketch": "sketch_small", "sketch_small": "sketch"}
    expect |= {"flat_00": "flat_00_copy", "flat_00_copy": "flat_00", "blue": "blue_again",
               "blue_again": "blue", "detailed": "detailed_small", "detailed_small": "detailed"}
    return expect


def test_flat_images_pair_by_colour_identical_files_always(tmp_path):
    expect = write_folder(tmp_path / "in")
    cfg = load_config(None, [f'workspace.path="{tmp_path / "ws"}"', f'ingest.inputs=["{tmp_path / "in"}"]',
                             "ray.num_cpus=2", "curate.threads=2"])
    ws = Workspace(str(tmp_path / "ws"))
    ingest.run(cfg, ws)
    images = {r["key"].rsplit("/", 1)[-1]: r for r in ws.read_table("images").to_pylist()}
    assert images["flat_03"]["detail"] == 0 and images["detailed"]["detail"] > 20
    assert images["flat_03"]["phash"] == images["flat_04"]["phash"]  # why pHash alone cannot tell them apart
    assert images["flat_03"]["colour"] != images["flat_04"]["colour"]

    curate.run(cfg, ws)
    dups = {r["key"].rsplit("/", 1)[-1]: r for r in ws.read_table("duplicates").to_pylist()}
    groups: dict[str, set[str]] = {}
    for name, row in dups.items():
        groups.setdefault(row["dup_group"], set()).add(name)
    assert sorted(map(sorted, groups.values())) == [["blue", "blue_again"], ["detailed", "detailed_small"],
                                                    ["flat_00", "flat_00_copy"], ["sketch", "sketch_small"]]
    assert {name for name, partner in expect.items() if partner} == set(dups)
    assert dups["flat_00"]["reason"] == "identical"
    assert dups["blue"]["reason"] == "colour"
    assert dups["detailed_small"]["reason"] == "phash"
    assert images["sketch"]["detail"] < 4 and dups["sketch_small"]["reason"] == "colour"
