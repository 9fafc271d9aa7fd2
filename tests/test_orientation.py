"""EXIF orientation: recorded at ingest with width/height as displayed, applied wherever booruset
decodes (models), and applied by exports that re-encode; byte copies keep the tag and say so."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
from export_data import base_config
from PIL import ExifTags, Image

from jobs import curate, export, ingest
from store.workspace import Workspace
from udfs.annotate.images import decode

pytestmark = pytest.mark.usefixtures("ray_local")


def turned_jpeg(orientation) -> bytes:
    """60x40 stored pixels, left half red, right half blue, tagged with `orientation`."""
    pixels = np.zeros((40, 60, 3), np.uint8)
    pixels[:, :30] = (255, 0, 0)
    pixels[:, 30:] = (0, 0, 255)
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=95, exif=exif)
    return out.getvalue()


def colour_at(image: Image.Image, x: float, y: float) -> str:
    r, _, b = image.convert("RGB").getpixel((int(x * (image.width - 1)), int(y * (image.height - 1))))
    return "red" if r > b else "blue"


def test_models_see_the_image_upright():
    image = decode(turned_jpeg(6))  # 6: turn 90 degrees clockwise to display
    assert image.size == (40, 60)
    assert colour_at(image, 0.5, 0.1) == "red" and colour_at(image, 0.5, 0.9) == "blue"


def test_orientation_recorded_and_applied_by_exports(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "turned.jpg").write_bytes(turned_jpeg(6))
    (folder / "turned.txt").write_text("1girl")
    (folder / "plain.jpg").write_bytes(turned_jpeg(1))
    (folder / "plain.txt").write_text("1girl")
    (folder / "bad_tag.jpg").write_bytes(turned_jpeg(42))  # out of range: treated as absent
    (folder / "bad_tag.txt").write_text("1girl")
    overrides = [f'ingest.inputs=["{folder}"]', "export.max_size=0", "export.drop_duplicates=false"]
    cfg = base_config(tmp_path / "ws", *overrides, f'export.out="{tmp_path / "upright"}"')
    ws = Workspace(str(tmp_path / "ws"))
    ingest.run(cfg, ws)
    rows = {r["key"].rsplit("/", 1)[-1]: r for r in ws.read_table("images").to_pylist()}
    assert (rows["turned"]["width"], rows["turned"]["height"], rows["turned"]["orientation"]) == (40, 60, 6)
    assert (rows["plain"]["width"], rows["plain"]["orientation"]) == (60, 1)
    assert (rows["bad_tag"]["width"], rows["bad_tag"]["orientation"]) == (60, 1)
    curate.run(cfg, ws)

    export.run(cfg, ws)
    samples = exported(tmp_path / "upright")
    image, meta = samples["turned"]
    assert image.size == (40, 60) and meta["orientation"] == 1 and (meta["width"], meta["height"]) == (40, 60)
    assert colour_at(image, 0.5, 0.1) == "red" and colour_at(image, 0.5, 0.9) == "blue"
    assert ExifTags.Base.Orientation not in image.getexif()  # upright pixels, no tag to apply twice
    assert samples["plain"][1]["orientation"] == 1

    copy_cfg = base_config(tmp_path / "ws", *overrides, f'export.out="{tmp_path / "copied"}"', "export.upright=false")
    export.run(copy_cfg, ws)
    image, meta = exported(tmp_path / "copied")["turned"]
    assert image.size == (60, 40) and meta["orientation"] == 6  # the original bytes, tag kept and reported
    assert image.getexif()[ExifTags.Base.Orientation] == 6
    manifest = {r["key"].rsplit("/", 1)[-1]: r for r in ws.read_table("export_manifest").to_pylist()}
    assert manifest["turned"]["orientation"] == 6 and not manifest["turned"]["reencoded"]


def exported(out) -> dict[str, tuple[Image.Image, dict]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted((out / "webdataset").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                stem, ext = member.name.rsplit(".", 1)
                samples.setdefault(stem, {})[ext] = tar.extractfile(member).read()
    result = {}
    for files in samples.values():
        meta = json.loads(files["json"])
        result[meta["key"].rsplit("/", 1)[-1]] = (Image.open(io.BytesIO(files["jpg"])), meta)
    return result


def test_probe_records_displayed_sizes_whoever_turns_the_pixels():
    """A JPEG keeps its tag (decoders turn it); Pillow turns a TIFF's pixels as it loads them and
    drops the tag, so its row says 1 and the size Pillow shows (once turned, not twice)."""
    from udfs.ingest.probe import probe_image

    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    tiff = io.BytesIO()
    Image.new("RGB", (90, 60)).save(tiff, "TIFF", exif=exif)
    for data, expected in ((turned_jpeg(6), (40, 60, 6)), (tiff.getvalue(), (60, 90, 1))):
        row = probe_image(data, 10**8)
        assert (row["width"], row["height"], row["orientation"]) == expected
