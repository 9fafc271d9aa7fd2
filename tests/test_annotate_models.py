"""Equality of the batched annotate UDFs with the imgutils per-image functions.

The models are tiny random-weight ONNX files with the production contracts (tests/onnx_fakes.py)
and the real WD v3 label file, placed in an offline Hugging Face cache where imgutils finds
them. The same image bytes go through our decode -> preprocess -> batched actor path and
through imgutils' function; boxes, features and scores must agree within 1e-4.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from tests.conftest import shared_path
from tests.onnx_fakes import (
    CCIP_FILE,
    CCIP_REPO,
    DETECTORS,
    LABELS_FILE,
    LABELS_REPO,
    TAGGER_FILE,
    TAGGER_REPO,
    build_hf_cache,
    build_models_dir,
)
from udfs.annotate.annotate_rows import decode_images

TOL = 1e-4


@pytest.fixture(scope="module")
def fake_models(tmp_path_factory):
    """models_dir with every fake model, and the same files as the HF cache imgutils reads."""
    import huggingface_hub.constants as hf_constants

    labels = shared_path("tagdata", "wd_v3_selected_tags.csv")
    root = tmp_path_factory.mktemp("models")
    models_dir = build_models_dir(root / "models_dir", labels)
    cache = build_hf_cache(root / "hf_cache", models_dir)
    saved = (hf_constants.HF_HUB_CACHE, hf_constants.HF_HUB_OFFLINE)
    hf_constants.HF_HUB_CACHE, hf_constants.HF_HUB_OFFLINE = str(cache), True
    yield str(models_dir)
    hf_constants.HF_HUB_CACHE, hf_constants.HF_HUB_OFFLINE = saved


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _test_images() -> list[bytes]:
    """Images of the modes and shapes a booru holds: RGB, RGBA with transparency, grey, palette."""
    rng = np.random.default_rng(7)
    images = []
    for (w, h), mode in [((640, 480), "RGB"), ((300, 700), "RGBA"), ((512, 512), "L"), ((800, 360), "P"),
                         ((1000, 1400), "RGB")]:
        base = rng.integers(0, 256, (h // 20 + 1, w // 20 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((w, h), Image.BILINEAR)  # smooth blobs: boxes vary by image
        if mode == "RGBA":
            image = image.convert("RGBA")
            alpha = np.zeros((h, w), np.uint8)
            alpha[h // 4 : 3 * h // 4, w // 5 : 4 * w // 5] = 255
            image.putalpha(Image.fromarray(alpha))
        elif mode in ("L", "P"):
            image = image.convert(mode)
        images.append(_png(image))
    return images


def _batch(images: list[bytes], inputs: dict) -> dict[str, np.ndarray]:
    n = len(images)
    raw = {"unit": np.array(["u"] * n, dtype=object), "key": np.array([f"k{i}" for i in range(n)], dtype=object),
           "source": np.array(["s"] * n, dtype=object), "member": np.array(["m"] * n, dtype=object),
           "data": np.array(images, dtype=object)}
    return decode_images(raw, inputs, draft_size=0, keep_data=True)


def _spec(name: str, models_dir: str, **extra) -> dict:
    from jobs.config import load_config

    return {**load_config()["annotate"][name], "models_dir": models_dir, **extra}


def test_tagger_matches_get_wd14_tags(fake_models):
    from imgutils.tagging import get_wd14_tags

    from udfs.annotate.wd_tagger import WdTagger

    spec = _spec("tagger", fake_models)
    assert (spec["repo"], spec["file"], spec["labels_repo"], spec["labels_file"]) == (
        TAGGER_REPO, TAGGER_FILE, LABELS_REPO, LABELS_FILE)
    images = _test_images()
    batch = WdTagger(spec, "in_tagger", "out")(_batch(images, {"in_tagger": ["tagger", 448]}))
    assert list(batch["out_error"]) == [""] * len(images)
    floor = spec["score_floor"]
    for data, out in zip(images, batch["out"], strict=True):
        picture = Image.open(io.BytesIO(data))
        if picture.mode in ("L", "1"):  # as it looks: imgutils masks a grey picture with itself (images.py)
            picture = picture.convert("RGB")
        rating, general, character = get_wd14_tags(picture, general_threshold=floor, character_threshold=floor)
        ((crop, whole),) = json.loads(out)  # no person crops in the batch: the whole image's list only
        assert crop == -1
        ours = {cat: {t: s for t, c, s in whole if c == cat} for cat in ("rating", "general", "character")}
        for cat, theirs in (("rating", rating), ("general", general), ("character", character)):
            assert set(ours[cat]) == set(theirs), cat
            assert all(abs(ours[cat][t] - theirs[t]) < TOL for t in theirs), cat
        assert len(general) > 10 and len(rating) == 4  # the fake scores spread around the floor


@pytest.mark.parametrize("name", ["face", "head", "person"])
def test_detectors_match_imgutils(fake_models, name):
    from imgutils.detect import detect_faces, detect_heads, detect_person

    from udfs.annotate.yolo_detector import YoloDetector

    function = {"face": detect_faces, "head": detect_heads, "person": detect_person}[name]
    spec = _spec(name, fake_models)
    repo, folder, label, fixed = DETECTORS[name]
    assert (spec["repo"], spec["file"]) == (repo, f"{folder}/model.onnx")
    images = _test_images()
    detector = YoloDetector(spec, "in_yolo", "out")
    assert detector.max_batch == fixed  # the face export fixes batch 1: looped inside the actor
    batch = detector(_batch(images, {"in_yolo": ["yolo", [640, 640]]}))
    total = 0
    for data, out in zip(images, batch["out"], strict=True):
        theirs = function(Image.open(io.BytesIO(data)))
        ours = json.loads(out)
        assert [tuple(b[:4]) for b in ours] == [box for box, _, _ in theirs]
        assert [b[4] for b in ours] == [lab for _, lab, _ in theirs] and {b[4] for b in ours} <= {label}
        assert all(abs(b[5] - s) < TOL for b, (_, _, s) in zip(ours, theirs, strict=True))
        total += len(ours)
    assert total > len(images)  # the fake finds boxes, so the comparison compares something


def test_ccip_matches_imgutils_whole_and_crops(fake_models):
    from imgutils.metrics import ccip_extract_feature

    from udfs.annotate.ccip import CcipFeatures, crop_input, person_crops

    spec = _spec("ccip", fake_models)
    assert (spec["repo"], spec["file"]) == (CCIP_REPO, CCIP_FILE)
    images = _test_images()
    batch = _batch(images, {"in_ccip": ["ccip", 384]})
    persons = [[10, 20, 200, 300, "person", 0.9], [50, 5, 260, 200, "person", 0.8]]
    crops, boxes = [], []
    for data in images:
        cut, found = person_crops(data, 0, persons, spec["crop_padding"], spec["max_crops"])
        crops.append(np.stack([crop_input(c, spec["size"]) for c in cut]).tobytes())
        boxes.append(found)
    batch["ccip_crops"] = np.array(crops, dtype=object)
    out = CcipFeatures(spec, "in_ccip", "out")(batch)
    for data, vectors, found in zip(images, out["out"], boxes, strict=True):
        vectors = np.frombuffer(vectors, np.float32).reshape(-1, 768)
        image = Image.open(io.BytesIO(data))
        assert len(vectors) == 1 + len(found) == 3
        np.testing.assert_allclose(vectors[0], ccip_extract_feature(image), atol=TOL, rtol=0)
        for vector, (_, x0, y0, x1, y1) in zip(vectors[1:], found, strict=True):
            np.testing.assert_allclose(vector, ccip_extract_feature(image.crop((x0, y0, x1, y1))), atol=TOL, rtol=0)


def test_tagger_tags_each_person_crop_as_get_wd14_tags_tags_the_crop(fake_models):
    """crop_persons cuts each person once for both models; the tagger scores every crop in the
    same run as the whole image, each as imgutils scores image.crop(box), without ratings."""
    from imgutils.tagging import get_wd14_tags

    from udfs.annotate.annotate_rows import crop_persons
    from udfs.annotate.wd_tagger import WdTagger

    spec = _spec("tagger", fake_models)
    images = _test_images()[:2]
    batch = _batch(images, {"in_tagger": ["tagger", 448]})
    batch["data"] = np.array(images, dtype=object)
    persons = [[10, 20, 200, 300, "person", 0.9], [50, 5, 260, 200, "person", 0.8], [0, 0, 1, 1, "person", 0.7]]
    batch["out_person"] = np.array([json.dumps(persons)] * len(images), dtype=object)
    inputs = {"tagger_crops": ["tagger", 448], "ccip_crops": ["ccip", 384]}
    batch = crop_persons(batch, "out_person", 0, 0.05, 8, inputs)
    assert len(batch["ccip_crops"][0]) == 2 * 384 * 384 * 3  # the 1x1 box is too small to cut
    tagger = WdTagger(spec, "in_tagger", "out")
    # a crop's ratings are never kept, however high they score (the fake's ratings score ~0)
    high = np.full(len(tagger.names), 0.9)
    assert [c for _, c, _ in tagger.tags(high, whole=False)].count("rating") == 0
    assert [c for _, c, _ in tagger.tags(high, whole=True)].count("rating") == 4
    broken = high.copy()
    broken[tagger.rating] = [np.nan, 0.9, np.nan, 0.1]  # scores of a model that broke on a picture
    assert [s for _, c, s in tagger.tags(broken, whole=True) if c == "rating"] == [0.9, 0.1]
    assert tagger.tags(np.full(len(tagger.names), np.nan), whole=True) == []
    out = tagger(batch)
    floor = spec["score_floor"]
    for data, result, boxes in zip(images, out["out"], out["crop_boxes"], strict=True):
        (_, whole), *crops = json.loads(result)
        boxes = json.loads(boxes)
        assert [b[0] for b in boxes] == [0, 1] == [c for c, _ in crops] and "tagger_crops" not in out
        crops = [tags for _, tags in crops]
        assert any(c == "rating" for _, c, _ in whole)
        image = Image.open(io.BytesIO(data))
        for crop, (_, x0, y0, x1, y1) in zip(crops, boxes, strict=True):
            _, general, character = get_wd14_tags(image.crop((x0, y0, x1, y1)), general_threshold=floor,
                                                  character_threshold=floor)
            ours = {t: s for t, c, s in crop}
            assert set(ours) == set(general) | set(character) and all(c != "rating" for _, c, _ in crop)
            assert all(abs(ours[t] - s) < TOL for t, s in {**general, **character}.items())


def test_a_cpu_tagger_runs_cpu_batch_size_images_at_a_time_with_the_same_tags(fake_models):
    """On the CPU provider the tagger runs cpu_batch_size images per session.run (a GPU runs
    batch_size); chunks must come back in order, with the scores of one run over the batch."""
    from udfs.annotate.wd_tagger import WdTagger

    images = _test_images()
    outputs = {}
    for cpu_batch in (2, 32):
        tagger = WdTagger(_spec("tagger", fake_models, cpu_batch_size=cpu_batch), "in_tagger", "out", device="cpu")
        assert tagger.provider == "CPUExecutionProvider" and tagger.max_batch == cpu_batch
        outputs[cpu_batch] = tagger(_batch(images, {"in_tagger": ["tagger", 448]}))["out"]
    for chunked, whole in zip(outputs[2], outputs[32], strict=True):
        ((_, chunked_tags),), ((_, whole_tags),) = json.loads(chunked), json.loads(whole)
        assert [t[:2] for t in chunked_tags] == [t[:2] for t in whole_tags]
        assert np.allclose([t[2] for t in chunked_tags], [t[2] for t in whole_tags], atol=TOL)


def test_model_sessions_leave_the_cores_when_a_run_ends(fake_models):
    """onnxruntime's intra-op threads spin after each run by default, burning CPU the decode tasks
    of the same node need: every model session (each model actor's) is opened with spinning off."""
    from udfs.annotate.wd_tagger import WdTagger

    tagger = WdTagger(_spec("tagger", fake_models), "in_tagger", "out", device="cpu")
    options = tagger.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_model_sessions_hand_out_work_in_shrinking_blocks_with_the_same_scores(fake_models):
    """A busy node preempts one of a session's intra-op threads mid-operator: with fixed halves the
    other waits for it, with shrinking blocks (session.dynamic_block_base) it takes over the rest.
    Which thread computes a block changes no score: the tagger's scores equal a session's without."""
    import onnxruntime as ort

    from udfs.annotate.model_files import model_file
    from udfs.annotate.wd_tagger import WdTagger

    spec = _spec("tagger", fake_models, cpu_batch_size=32)
    tagger = WdTagger(spec, "in_tagger", "out", device="cpu")
    assert tagger.session.get_session_options().get_session_config_entry("session.dynamic_block_base") == "4"
    plain = ort.InferenceSession(model_file(spec["repo"], spec["file"], fake_models),
                                 providers=["CPUExecutionProvider"])
    rows = _batch(_test_images(), {"in_tagger": ["tagger", 448]})["in_tagger"]
    name, output = plain.get_inputs()[0].name, plain.get_outputs()[0].name
    assert np.array_equal(tagger.scores(rows), plain.run([output], {name: rows.astype(np.float32)})[0])


def test_the_float_input_buffer_kept_between_runs_gives_the_scores_of_fresh_arrays(fake_models):
    """WdTagger.float_input reuses one float32 buffer across session.runs: a smaller batch after a
    larger one, and a larger after a smaller, score exactly as a fresh float32 copy does."""
    from udfs.annotate.wd_tagger import WdTagger

    tagger = WdTagger(_spec("tagger", fake_models, cpu_batch_size=32), "in_tagger", "out", device="cpu")
    rows = _batch(_test_images(), {"in_tagger": ["tagger", 448]})["in_tagger"]
    name, output = tagger.session.get_inputs()[0].name, tagger.session.get_outputs()[0].name

    def fresh(part: np.ndarray) -> np.ndarray:
        return tagger.session.run([output], {name: part.astype(np.float32)})[0]

    for part in (rows[:3], rows[3:4], rows):  # larger, smaller, then larger than the buffer
        assert np.array_equal(tagger.scores(part), fresh(part))
    assert tagger.float_input(rows[:1]).base is tagger._float_buffer  # no new array per run


def test_one_bad_image_is_an_error_and_the_batch_goes_on(fake_models):
    from udfs.annotate.wd_tagger import WdTagger

    images = _test_images()[:2] + [b"not an image at all"]
    batch = WdTagger(_spec("tagger", fake_models), "in_tagger", "out")(_batch(images, {"in_tagger": ["tagger", 448]}))
    assert list(batch["ok"]) == [True, True, False]
    assert json.loads(batch["decode_error"][2])[0] == "decode_failed"
    assert len(json.loads(batch["out"][0])[0][1]) > 4 and batch["out"][2] == "[]"


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "P", "L", "LA", "I;16", "CMYK", "1"])
def test_regions_are_cut_from_every_image_mode(mode):
    """The 2x2 regions: four, each past the middle by the overlap, for any mode a booru holds
    (a palette or 16-bit picture must not fail the whole image)."""
    from udfs.annotate.images import region_images, tagger_input

    image = Image.new("RGB", (200, 100), (200, 30, 30)).convert(mode)
    regions = region_images(image, 0.1)
    assert [r.size for r in regions] == [(120, 60), (120, 60), (120, 60), (120, 60)]
    assert all(tagger_input(r, 64).shape == (64, 64, 3) for r in regions)
    assert [r.size for r in region_images(Image.new(mode, (1, 1)), 0.1)] == [(1, 1)] * 4


def test_a_model_that_fixes_its_batch_above_one_runs_any_number_of_images(fake_models, tmp_path):
    """An export that fixes its batch at 4 (TensorRT-minded exports do) gets 4 rows per run:
    fewer images (a batch of 2, the last 1 of 5) are padded, and the boxes are those of a
    dynamic-batch export of the same weights. Every image failed 'invalid dimensions'."""
    from tests.onnx_fakes import yolo_model
    from udfs.annotate.yolo_detector import YoloDetector

    repo, folder, label, _ = DETECTORS["face"]
    found = {}
    for batch in (4, None):
        root = tmp_path / f"batch{batch}"
        yolo_model(root / repo / folder / "model.onnx", label, batch)
        detector = YoloDetector(_spec("face", str(root)), "in_yolo", "out", device="cpu")
        for n in (2, 5):
            out = detector(_batch(_test_images()[:n], {"in_yolo": ["yolo", [640, 640]]}))
            assert list(out["out_error"]) == [""] * n
            found[batch, n] = list(out["out"])
    assert found[4, 2] == found[None, 2] and found[4, 5] == found[None, 5]
    assert sum(len(json.loads(o)) for o in found[4, 5]) > 5


def _dynamic_output_width(path, name: str):
    """The ONNX file with its first output's second axis made dynamic: what the model gives is
    known only once it runs (the start's model check reads a number there)."""
    import onnx

    model = onnx.load(str(path))
    model.graph.output[0].type.tensor_type.shape.dim[1].dim_param = name
    onnx.save(model, str(path))


def test_a_ccip_model_of_another_width_is_an_error_per_image_not_a_failed_writer(tmp_path):
    """A CCIP file whose feature axis is dynamic and gives 512 features passes the start's check;
    its rows then failed the writer task (a reshape to 768), and with it the job. Each image is
    a model_failed error naming the width."""
    from tests.onnx_fakes import ccip_model
    from udfs.annotate.annotate_parts import UnitTables
    from udfs.annotate.ccip import CcipFeatures

    _dynamic_output_width(ccip_model(tmp_path / CCIP_REPO / CCIP_FILE, dim=512), "features")
    batch = CcipFeatures(_spec("ccip", str(tmp_path)), "in_ccip", "out_ccip", device="cpu")(
        _batch(_test_images()[:2], {"in_ccip": ["ccip", 384]}))
    assert all("gives 512 features, not 768" in e for e in batch["out_ccip_error"])
    rows = [{**{c: batch[c][i] for c in batch}, "crop_boxes": "[]"} for i in range(2)]
    tables = UnitTables({"ccip": "ccip"}, rows)
    assert [e["kind"] for e in tables.parts["errors", "ccip"]] == ["model_failed"] * 2
    assert tables.parts["embeddings", "ccip"] == []


def test_a_tagger_scoring_other_than_its_labels_says_so_per_image(tmp_path):
    """A tagger whose label axis is dynamic (100 scores) beside a label file of 50: every image
    failed with numpy's 'operands could not be broadcast'; the error now names both counts."""
    from tests.onnx_fakes import tagger_model
    from udfs.annotate.wd_tagger import WdTagger

    _dynamic_output_width(tagger_model(tmp_path / TAGGER_REPO / TAGGER_FILE, 100), "labels")
    lines = shared_path("tagdata", "wd_v3_selected_tags.csv").read_text(encoding="utf-8").splitlines()[:51]
    (tmp_path / LABELS_REPO).mkdir(parents=True)
    (tmp_path / LABELS_REPO / LABELS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
    batch = WdTagger(_spec("tagger", str(tmp_path)), "in_tagger", "out", device="cpu")(
        _batch(_test_images()[:2], {"in_tagger": ["tagger", 448]}))
    assert all("scores 100 labels but its label file" in e and "has 50" in e for e in batch["out_error"])


def test_person_crops_that_cannot_be_cut_become_an_errors_row():
    """crop_persons decodes the image again to cut it: a failure there (bytes changed since, no
    memory) lost the image's crops with no trace. Now its message reaches the unit's errors and
    the image keeps its other rows."""
    from udfs.annotate.annotate_parts import UnitTables
    from udfs.annotate.annotate_rows import crop_persons

    good = _test_images()[0]
    batch = {"unit": np.array(["u", "u"]), "key": np.array(["a", "b"]), "source": np.array(["s", "s"]),
             "member": np.array(["a.png", "b.png"]), "ok": np.array([True, True]),
             "decode_error": np.array(["", ""], dtype=object), "width": np.array([300, 300]),
             "height": np.array([400, 400]), "data": np.array([good, good[:40]], dtype=object),
             "out_person": np.array([json.dumps([[10, 20, 200, 300, "person", 0.9]])] * 2, dtype=object)}
    out = crop_persons(batch, "out_person", 0, 0.05, 8, {"ccip_crops": ["ccip", 384]})
    assert out["crop_error"][0] == "" and len(out["ccip_crops"][0]) == 384 * 384 * 3
    assert out["crop_error"][1].startswith("person crops not cut: ") and out["ccip_crops"][1] == b""

    rows = [{k: v[i] for k, v in out.items()} for i in range(2)]
    errors = UnitTables({}, rows).parts[("errors", "decode")]
    assert [(e["key"], e["kind"], e["dropped"]) for e in errors] == [("b", "crop_failed", False)]
