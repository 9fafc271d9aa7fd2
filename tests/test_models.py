"""`booruset models fetch`: stage every configured model file in annotate.models_dir (hub layout),
from a staged folder (--source) or the hub; --list says what is there. Offline: the source is a
folder of the fake models in the hub layout."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import httpx
import huggingface_hub
import pytest
from huggingface_hub.errors import RemoteEntryNotFoundError

from jobs import cli, models
from jobs.config import load_config
from tests.onnx_fakes import (
    CCIP_FILE,
    CCIP_REPO,
    DETECTORS,
    LABELS_FILE,
    LABELS_REPO,
    TAGGER_FILE,
    TAGGER_REPO,
    build_models_dir,
)
from udfs.annotate import model_files
from udfs.annotate.model_files import ModelUnavailable, model_file

LABELS = "tag_id,name,category,count\n0,general,9,0\n1,1girl,0,100\n2,eileen,4,10\n"


@pytest.fixture
def source(tmp_path) -> Path:
    """The fake models (real input/output contracts) in the hub layout, as a share would hold them."""
    labels = tmp_path / "selected_tags.csv"
    labels.write_text(LABELS)
    return build_models_dir(tmp_path / "src", labels)


def expected() -> list[str]:
    """The files of the default models: every detector's model and model_type.json, CCIP, the tagger + labels."""
    names = [f"{repo}/{folder}/{leaf}" for repo, folder, _, _ in DETECTORS.values()
             for leaf in ("model.onnx", "model_type.json")]
    return sorted(names + [f"{CCIP_REPO}/{CCIP_FILE}", "deepghs/wd14_tagger_with_embeddings/SmilingWolf/"
                           "wd-swinv2-tagger-v3/model.onnx", "SmilingWolf/wd-swinv2-tagger-v3/selected_tags.csv"])


def booruset(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def lines_about(out: str, name: str) -> list[str]:
    return [ln for ln in out.splitlines() if ln.split("  ", 1)[-1].split(" ")[0].rstrip(":") == name]


def test_the_default_models_need_these_files():
    assert sorted(f.name for f in models.model_files(load_config())) == expected()
    only_cascade = load_config(None, ['annotate.models=["cascade_face"]'])
    assert models.model_files(only_cascade) == []  # bundled: nothing to fetch


def test_fetch_from_a_staged_folder_then_list_and_rerun(source, tmp_path, capsys):
    dst = tmp_path / "models"
    where = f'annotate.models_dir="{dst}"'
    code, out, _ = booruset(capsys, "models", "fetch", "--list", "--set", where)
    assert code == 1
    assert all(lines_about(out, name)[0].startswith("missing") for name in expected())

    code, out, _ = booruset(capsys, "models", "fetch", "--source", str(source), "--set", where)
    assert code == 0, out
    for name in expected():
        assert lines_about(out, name)[0].startswith("fetched"), out
        assert (dst / name).read_bytes() == (source / name).read_bytes()
    assert "9 fetched" in out.splitlines()[-1] and "0 failed" in out.splitlines()[-1]
    assert not list(dst.rglob("*.part"))

    code, out, _ = booruset(capsys, "models", "fetch", "--list", "--set", where)
    assert code == 0
    assert all(lines_about(out, name)[0].startswith("present") for name in expected())
    assert " KB, revision main)" in out  # sizes and revisions of the present files

    code, out, _ = booruset(capsys, "models", "fetch", "--source", str(source), "--set", where)
    assert code == 0
    assert all(lines_about(out, name)[0].startswith("already present") for name in expected())


def test_staged_models_are_what_model_file_reads(source, tmp_path, capsys):
    dst = tmp_path / "models"
    assert booruset(capsys, "models", "fetch", "--source", str(source), "--set", f'annotate.models_dir="{dst}"')[0] == 0
    assert model_file(CCIP_REPO, CCIP_FILE, str(dst)) == str(dst / CCIP_REPO / CCIP_FILE)


def test_a_required_file_missing_at_the_source_fails_with_a_reason(source, tmp_path, capsys):
    (source / CCIP_REPO / CCIP_FILE).unlink()
    code, out, _ = booruset(capsys, "models", "fetch", "--source", str(source),
                            "--set", f'annotate.models_dir="{tmp_path / "models"}"')
    assert code == 1
    (line,) = lines_about(out, f"{CCIP_REPO}/{CCIP_FILE}")
    assert line.startswith("failed") and str(source / CCIP_REPO / CCIP_FILE) in line
    assert "1 failed" in out.splitlines()[-1]
    assert (tmp_path / "models" / "SmilingWolf/wd-swinv2-tagger-v3/selected_tags.csv").is_file()  # the rest came


def test_an_optional_side_file_missing_at_the_source_is_fine(source, tmp_path, capsys):
    repo, folder, _, _ = DETECTORS["face"]
    side = f"{repo}/{folder}/model_type.json"
    (source / side).unlink()
    where = f'annotate.models_dir="{tmp_path / "models"}"'
    code, out, _ = booruset(capsys, "models", "fetch", "--source", str(source), "--set", where)
    assert code == 0, out
    assert lines_about(out, side)[0].startswith("not at the source")
    code, out, _ = booruset(capsys, "models", "fetch", "--list", "--set", where)
    assert code == 0 and lines_about(out, side) == [f"missing  {side} (optional)"]


def test_a_fetch_killed_mid_copy_leaves_nothing_that_counts_as_present(source, tmp_path, capsys, monkeypatch):
    def half_copy(src, dst):
        Path(dst).write_bytes(Path(src).read_bytes()[:10])
        raise OSError("No space left on device")

    monkeypatch.setattr(models.shutil, "copyfile", half_copy)
    dst = tmp_path / "models"
    code, out, _ = booruset(capsys, "models", "fetch", "--source", str(source), "--set", f'annotate.models_dir="{dst}"')
    assert code == 1
    assert all(lines_about(out, name)[0].startswith("failed") and "No space left" in lines_about(out, name)[0]
               for name in expected())
    assert not [p for p in dst.rglob("*") if p.is_file()]


def test_fetch_from_the_hub_offline_fails_per_file_at_once(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_files.hub_reachable.cache_clear()
    code, out, _ = booruset(capsys, "models", "fetch", "--set", f'annotate.models_dir="{tmp_path / "models"}"')
    assert code == 1
    assert all("cannot be reached" in lines_about(out, name)[0] for name in expected())
    model_files.hub_reachable.cache_clear()


COMMITS = {"main": "a" * 40, "v1": "b" * 40}


@pytest.fixture
def hub(source, monkeypatch) -> list[tuple[str, str, str]]:
    """A stand-in for the hub (which the tests cannot reach) serving the fake models at two
    revisions, with the contracts of hf_hub_url, get_hf_file_metadata and hf_hub_download's
    local_dir; the face detector's repository has no model_type.json. Returns the downloads."""
    downloads = []

    def missing(repo_id: str, filename: str) -> bool:
        return filename.endswith("model_type.json") and "face" in repo_id

    def not_found():
        return RemoteEntryNotFoundError("404", response=httpx.Response(404, request=httpx.Request("GET", "x")))

    def get_hf_file_metadata(url: tuple[str, str, str]):
        repo_id, filename, revision = url
        if missing(repo_id, filename):
            raise not_found()
        return huggingface_hub.HfFileMetadata(commit_hash=COMMITS.get(revision, revision), etag="", location="",
                                              size=0, xet_file_data=None)

    def hf_hub_download(repo_id: str, filename: str, revision: str, local_dir: Path) -> str:
        if missing(repo_id, filename):
            raise not_found()
        downloads.append((repo_id, filename, revision))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / repo_id / filename, path)
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_url", lambda repo, file, revision: (repo, file, revision))
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", get_hf_file_metadata)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    return downloads


def test_fetch_from_the_hub_downloads_into_the_layout(hub, source, tmp_path, capsys):
    dst = tmp_path / "models"
    code, out, _ = booruset(capsys, "models", "fetch", "--set", f'annotate.models_dir="{dst}"')
    assert code == 0, out
    face_side = f"{DETECTORS['face'][0]}/{DETECTORS['face'][1]}/model_type.json"
    assert lines_about(out, face_side)[0].startswith("not at the source")
    for name in [n for n in expected() if n != face_side]:
        assert lines_about(out, name)[0].startswith("fetched"), out
        assert (dst / name).read_bytes() == (source / name).read_bytes()
    # each file is downloaded at the commit "main" named when fetched, and recorded as such
    assert {revision for _, _, revision in hub} == {COMMITS["main"]}
    records = json.loads((dst / "booruset-models.json").read_text())
    assert sorted(records) == sorted(n for n in expected() if n != face_side)
    ccip = records[f"{CCIP_REPO}/{CCIP_FILE}"]
    assert ccip["revision"] == "main" and ccip["commit"] == COMMITS["main"]
    assert ccip["size"] == (dst / CCIP_REPO / CCIP_FILE).stat().st_size
    assert ccip["sha256"] == hashlib.sha256((dst / CCIP_REPO / CCIP_FILE).read_bytes()).hexdigest()


def test_a_download_that_fails_leaves_the_staged_file_in_place(hub, source, tmp_path, capsys, monkeypatch):
    """The file staged before was deleted before its replacement was asked for: a download cut
    by the network left no model at all."""
    dst = tmp_path / "models"
    where = f'annotate.models_dir="{dst}"'
    assert booruset(capsys, "models", "fetch", "--set", where)[0] == 0
    staged = (dst / CCIP_REPO / CCIP_FILE).read_bytes()

    def cut(repo_id: str, filename: str, revision: str, local_dir: Path) -> str:
        (Path(local_dir) / filename).parent.mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / filename).write_bytes(staged[:100])  # part of it, then the network goes
        raise ConnectionError("connection reset")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", cut)
    code, out, _ = booruset(capsys, "models", "fetch", "--set", where, "--set", "annotate.ccip.revision=v1")
    assert code != 0 and "connection reset" in out
    assert (dst / CCIP_REPO / CCIP_FILE).read_bytes() == staged
    assert not list(dst.glob(".download-*"))


def test_a_pinned_revision_is_fetched_recorded_and_read(hub, source, tmp_path, capsys, monkeypatch):
    """annotate.<model>.revision pins a model: fetch downloads that revision (replacing a file
    of another one), records it, and model_file reads a staged file only at that revision."""
    dst = tmp_path / "models"
    where = f'annotate.models_dir="{dst}"'
    assert booruset(capsys, "models", "fetch", "--set", where)[0] == 0
    pinned = "annotate.ccip.revision=v1"
    # the staged file is main's: with v1 configured it is not read (nor in the cache: unavailable)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_files.hub_reachable.cache_clear()
    with pytest.raises(ModelUnavailable, match="at revision v1 .*the staged file is revision main"):
        model_file(CCIP_REPO, CCIP_FILE, str(dst), "v1")
    model_files.hub_reachable.cache_clear()
    code, out, _ = booruset(capsys, "models", "fetch", "--list", "--set", where, "--set", pinned)
    assert code == 1
    assert lines_about(out, f"{CCIP_REPO}/{CCIP_FILE}") == [
        f"unusable  {CCIP_REPO}/{CCIP_FILE}: staged at revision main, configured v1"]

    hub.clear()
    code, out, _ = booruset(capsys, "models", "fetch", "--set", where, "--set", pinned)
    assert code == 0, out
    assert hub == [(CCIP_REPO, CCIP_FILE, COMMITS["v1"])]  # only the file of the model whose revision changed
    (line,) = lines_about(out, f"{CCIP_REPO}/{CCIP_FILE}")
    assert "revision v1, commit bbbbbbbbbbbb" in line and "replaced one staged at revision main" in line
    assert model_file(CCIP_REPO, CCIP_FILE, str(dst), "v1") == str(dst / CCIP_REPO / CCIP_FILE)
    assert model_file(CCIP_REPO, CCIP_FILE, str(dst), COMMITS["v1"]) == str(dst / CCIP_REPO / CCIP_FILE)
    code, out, _ = booruset(capsys, "models", "fetch", "--list", "--set", where, "--set", pinned)
    assert code == 0 and "revision v1, commit bbbbbbbbbbbb" in lines_about(out, f"{CCIP_REPO}/{CCIP_FILE}")[0]

    # a staged folder copied with --source carries its record: v1 there is v1 here
    copy = tmp_path / "copy"
    code, out, _ = booruset(capsys, "models", "fetch", "--source", str(dst), "--set", f'annotate.models_dir="{copy}"',
                            "--set", pinned)
    assert code == 0, out
    assert json.loads((copy / "booruset-models.json").read_text())[f"{CCIP_REPO}/{CCIP_FILE}"]["commit"] \
        == COMMITS["v1"]
    # a folder with no record of the revision cannot vouch for it
    code, out, _ = booruset(capsys, "models", "fetch", "--source", str(source),
                            "--set", f'annotate.models_dir="{tmp_path / "other"}"', "--set", pinned)
    assert code == 1
    assert "has no record of being revision v1" in lines_about(out, f"{CCIP_REPO}/{CCIP_FILE}")[0]


def test_a_pinned_revision_is_part_of_what_annotate_ran():
    """Changing a model's revision annotates the units again (the default keeps the identity
    units annotated before revisions were options have)."""
    from jobs.annotate import model_identity

    def identity(*overrides: str) -> str:
        cfg = load_config(None, list(overrides))
        spec = {**cfg["annotate"]["ccip"], "model": "m"}
        return model_identity("ccip", spec, cfg["annotate"])

    assert identity() == "m"
    assert identity("annotate.ccip.revision=v1") == "m@revision=v1"
    cfg = load_config(None, ["annotate.tagger.labels_revision=v2"])
    assert model_identity("tagger", {**cfg["annotate"]["tagger"], "model": "t"}, cfg["annotate"]) \
        == "t+crops8x0.05+noregions@labels_revision=v2"


def unusable_source(source: Path) -> dict[str, str]:
    """Three files of `source` spoilt as a failed copy or download leaves them, and the reason each gives."""
    face = f"{DETECTORS['face'][0]}/{DETECTORS['face'][1]}/model.onnx"
    (source / face).write_bytes(b"")
    ccip = source / CCIP_REPO / CCIP_FILE
    ccip.write_bytes(ccip.read_bytes()[:3000])
    labels = "SmilingWolf/wd-swinv2-tagger-v3/selected_tags.csv"
    (source / labels).write_text("<html><body>404 Not Found</body></html>\n")
    return {face: "is empty (0 bytes)", f"{CCIP_REPO}/{CCIP_FILE}": "cannot be read as an ONNX model",
            labels: "cannot be read as a label CSV"}


def test_unusable_files_are_not_staged_and_are_fetched_again(source, tmp_path, capsys):
    """A 0-byte, cut or foreign file copied by --source counted as fetched and present, and
    annotate then failed with a traceback naming no file."""
    dst = tmp_path / "models"
    where = f'annotate.models_dir="{dst}"'
    good = tmp_path / "good"
    shutil.copytree(source, good)
    spoilt = unusable_source(source)
    code, out, _ = booruset(capsys, "models", "fetch", "--source", str(source), "--set", where)
    assert code == 1
    for name, why in spoilt.items():
        (line,) = lines_about(out, name)
        assert line.startswith("failed") and str(source / name) in line and why in line, line
        assert not (dst / name).exists()
    assert "3 failed" in out.splitlines()[-1]

    # files spoilt where they are staged (copied by hand, cut since) are unusable, not present
    for name in spoilt:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / name, dst / name)
    tagger = dst / TAGGER_REPO / TAGGER_FILE
    tagger.write_bytes(tagger.read_bytes()[:-100])  # cut after fetch recorded its size
    code, out, _ = booruset(capsys, "models", "fetch", "--list", "--set", where)
    assert code == 1
    for name, why in spoilt.items():
        assert lines_about(out, name)[0].startswith(f"unusable  {name}: {why}")
    assert "not the" in lines_about(out, f"{TAGGER_REPO}/{TAGGER_FILE}")[0]
    assert "4 unusable" in out.splitlines()[-1]

    code, out, _ = booruset(capsys, "models", "fetch", "--source", str(good), "--set", where)
    assert code == 0, out
    for name in [*spoilt, f"{TAGGER_REPO}/{TAGGER_FILE}"]:
        assert "replaced a file that" in lines_about(out, name)[0]
        assert (dst / name).read_bytes() == (good / name).read_bytes()
    assert booruset(capsys, "models", "fetch", "--list", "--set", where)[0] == 0


@pytest.mark.parametrize("which", ["face", "ccip", "labels", "cut"])
def test_annotate_names_an_unusable_model_file_in_one_line(which, source, tmp_path, capsys):
    """annotate checks each model file before it starts: one line naming the file and the fix,
    exit 2, nothing written (it was a KeyError: 'names' from the driver, or actors failing)."""
    dst = tmp_path / "models"
    where = f'annotate.models_dir="{dst}"'
    assert booruset(capsys, "models", "fetch", "--source", str(source), "--set", where)[0] == 0
    spoilt = unusable_source(source)
    name = {"face": next(iter(spoilt)), "ccip": f"{CCIP_REPO}/{CCIP_FILE}",
            "labels": "SmilingWolf/wd-swinv2-tagger-v3/selected_tags.csv",
            "cut": f"{TAGGER_REPO}/{TAGGER_FILE}"}[which]
    if which == "cut":
        (dst / name).write_bytes((dst / name).read_bytes()[:-100])
    else:
        shutil.copyfile(source / name, dst / name)
    from store.workspace import Workspace

    ws = Workspace(str(tmp_path / "ws"))
    code, out, err = booruset(capsys, "annotate", "-w", ws.root, "--set", where)
    assert code == 2, (out, err)
    assert len(err.strip().splitlines()) == 1
    assert str(dst / name) in err and f"booruset models fetch --set annotate.models_dir={dst}" in err
    assert not ws.done_units("annotate") and not list(Path(ws.root).rglob("*.parquet"))


def test_a_label_file_of_another_length_than_the_tagger_is_refused(source, tmp_path, capsys):
    """The tagger's scores are named by position in the label file: one row more or fewer (a
    file of another tagger) named every score wrongly or failed each image with an IndexError."""
    dst = tmp_path / "models"
    labels = source / LABELS_REPO / LABELS_FILE
    labels.write_text(LABELS + "3,smile,0,5\n")
    assert booruset(capsys, "models", "fetch", "--source", str(source), "--set", f'annotate.models_dir="{dst}"')[0] == 0
    from store.workspace import Workspace

    ws = Workspace(str(tmp_path / "ws"))
    code, _, err = booruset(capsys, "annotate", "-w", ws.root, "--set", f'annotate.models_dir="{dst}"')
    assert code == 2
    assert "scores 3 labels but its label file" in err and "has 4" in err


@pytest.mark.parametrize("argv", [["models", "fetch"], ["models", "fetch", "--list"]])
def test_without_models_dir_it_says_how_to_set_it(argv, capsys):
    code, out, err = booruset(capsys, *argv)
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and "--set annotate.models_dir=DIR" in err


def test_a_missing_source_folder_is_a_configuration_error(tmp_path, capsys):
    code, _, err = booruset(capsys, "models", "fetch", "--source", str(tmp_path / "nowhere"),
                            "--set", f'annotate.models_dir="{tmp_path / "models"}"')
    assert code == 2 and "not a folder" in err


@pytest.mark.parametrize("list_only", [False, True])
def test_a_models_dir_that_is_a_file_is_one_line(list_only, source, tmp_path, capsys):
    """A file where the folder should be: fetch printed a NotADirectoryError line per model file and
    --list called every file missing, as if the folder were empty. (A read-only folder, which root
    cannot make here, is refused by the same check as export.out's.)"""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for models_dir in (blocker, blocker / "models"):
        listing = ["--list"] if list_only else []
        code, out, err = booruset(capsys, "models", "fetch", "--source", str(source), *listing,
                                  "--set", f'annotate.models_dir="{models_dir}"')
        assert code == 2 and not out
        assert err.strip() == (f"booruset: configuration error: annotate.models_dir {str(models_dir)!r} cannot be "
                               f"made: {str(blocker)!r} is a file")
    assert blocker.read_text() == "not a folder"


def test_a_read_only_share_that_holds_every_file_is_already_fetched(source, tmp_path, capsys, monkeypatch):
    """fetch on a read-only share where every model is staged (a cluster's idempotent setup step)
    says "already present" and exits 0; one with a file to fetch is refused in one line. root can
    write anywhere here, so the read-only mount is os.access answering no, as it does (EROFS)."""
    models_dir = tmp_path / "share"
    staged = ["models", "fetch", "--source", str(source), "--set", f'annotate.models_dir="{models_dir}"']
    assert booruset(capsys, *staged)[0] == 0
    monkeypatch.setattr("jobs.config.os.access", lambda path, mode: False)
    code, out, err = booruset(capsys, *staged)
    assert code == 0 and not err and "0 fetched" in out and "already present" in out
    next(p for p in models_dir.rglob("*.onnx")).unlink()
    code, out, err = booruset(capsys, *staged)
    assert code == 2 and not out and "cannot be written" in err


@pytest.mark.parametrize("models_dir", ["", "/shared/models"])
def test_the_skip_message_says_hf_download_and_models_fetch(models_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_files.hub_reachable.cache_clear()
    with pytest.raises(ModelUnavailable) as caught:
        model_file("booruset-test/no-such-repo", "sub/model.onnx", models_dir)
    model_files.hub_reachable.cache_clear()
    message = str(caught.value)
    assert "hf download booruset-test/no-such-repo sub/model.onnx" in message
    assert "booruset models fetch --set annotate.models_dir=" in message
    assert "huggingface-cli" not in message
    if models_dir:
        assert "--local-dir /shared/models/booruset-test/no-such-repo" in message


@pytest.mark.parametrize(("row", "why"), [("3,,0,5", "has rows with no name (data row 4)"),
                                          ("3,1girl,0,5", "names '1girl' twice (data rows 2 and 4)")])
def test_a_label_file_with_a_nameless_or_repeated_row_is_unusable(row, why, source, tmp_path, capsys):
    """Scores are named by position in the label file: a row with no name was read as a NaN
    tag name, a repeated name gives one image two scores for one tag."""
    labels = source / LABELS_REPO / LABELS_FILE
    labels.write_text(LABELS + row + "\n")
    code, out, _ = booruset(capsys, "models", "fetch", "--source", str(source),
                            "--set", f'annotate.models_dir="{tmp_path / "models"}"')
    assert code == 1
    assert why in lines_about(out, f"{LABELS_REPO}/{LABELS_FILE}")[0]


def test_a_tag_named_null_is_a_tag(tmp_path):
    """pandas' defaults read the names null, nan, none, n/a as missing values (NaN tags)."""
    from udfs.annotate.wd_tagger import load_labels

    path = tmp_path / "selected_tags.csv"
    path.write_text(LABELS + "3,null,0,5\n4,none,0,5\n5,n/a,0,5\n")
    assert load_labels(str(path))[0] == ["general", "1girl", "eileen", "null", "none", "n/a"]


def test_a_detector_whose_output_is_not_the_contract_is_refused(source, tmp_path, capsys):
    """A face model whose output is [batch, 3] (not YOLO's [batch, 4 + classes, anchors]) failed
    every image in imgutils' post-processing, each a model errors row; now annotate refuses it."""
    from onnx import TensorProto, helper

    from store.workspace import Workspace

    repo, folder, _, _ = DETECTORS["face"]
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["images"], ["output0"], axes=[2, 3], keepdims=0)], "flat",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 3, 640, 640])],
        [helper.make_tensor_value_info("output0", TensorProto.FLOAT, ["batch", 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    for key, value in {"imgsz": "[640, 640]", "names": "{0: 'face'}"}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    path = source / repo / folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    ws = Workspace(str(tmp_path / "ws"))
    code, _, err = booruset(capsys, "annotate", "-w", ws.root, "--set", f'annotate.models_dir="{source}"')
    assert code == 2
    assert f"{path} has output shape ['batch', 3], not a detector's" in err


def test_a_ccip_model_of_another_width_is_refused(source, tmp_path, capsys):
    """embeddings.vector holds CCIP_DIM floats: a feature model of another width failed every
    writer task in Ray (ValueError: cannot reshape), and annotate with a traceback."""
    from store.workspace import Workspace
    from tests.onnx_fakes import ccip_model

    ccip_model(source / CCIP_REPO / CCIP_FILE, dim=1024)
    ws = Workspace(str(tmp_path / "ws"))
    code, _, err = booruset(capsys, "annotate", "-w", ws.root, "--set", f'annotate.models_dir="{source}"')
    assert code == 2
    assert f"{source / CCIP_REPO / CCIP_FILE} gives 1024 features, not CCIP's 768" in err


def test_run_checks_the_model_files_before_ingest(source, tmp_path, capsys):
    """`booruset run` with an unusable model file stops before it ingests anything (annotate
    found it only after ingest, which can take hours), and leaves no workspace behind."""
    name = next(iter(unusable_source(source)))
    code, _, err = booruset(capsys, "run", "-w", str(tmp_path / "ws"), "--set", f'annotate.models_dir="{source}"')
    assert code == 2 and str(source / name) in err and "is empty (0 bytes)" in err
    assert not (tmp_path / "ws").exists()


def test_an_unusable_optional_side_file_is_not_left_as_fine(source, tmp_path, capsys):
    """model_type.json may be absent (the detector is then a YOLO), but one that does not read
    (here cut to half) fails the detector's loader: fetch says failed when it cannot replace
    it, and annotate names it."""
    from store.workspace import Workspace

    repo, folder, _, _ = DETECTORS["face"]
    side = f"{repo}/{folder}/model_type.json"
    dst = tmp_path / "models"
    where = f'annotate.models_dir="{dst}"'
    assert booruset(capsys, "models", "fetch", "--source", str(source), "--set", where)[0] == 0
    (dst / side).write_text('{"model_ty')
    (source / side).unlink()
    code, out, _ = booruset(capsys, "models", "fetch", "--source", str(source), "--set", where)
    assert code == 1
    (line,) = lines_about(out, side)
    assert line.startswith("failed") and "the staged file is 10 bytes, not the 22" in line
    code, _, err = booruset(capsys, "annotate", "-w", Workspace(str(tmp_path / "ws")).root, "--set", where)
    assert code == 2 and f"{dst / side} is 10 bytes, not the 22" in err
    (Path(dst) / "booruset-models.json").unlink()  # staged by hand: no record of its size, still caught
    code, _, err = booruset(capsys, "annotate", "-w", Workspace(str(tmp_path / "ws")).root, "--set", where)
    assert code == 2 and f"{dst / side} cannot be read as JSON" in err


def _channels_last(path: Path, name: str) -> None:
    """The ONNX file's first input declared [batch, h, w, 3] (a channels-last export)."""
    import onnx

    model = onnx.load(str(path))
    dims = model.graph.input[0].type.tensor_type.shape.dim
    side = dims[2].dim_value
    for dim, value in zip(dims[1:], (side, side, 3), strict=True):
        dim.dim_value = value
    model.graph.input[0].name = name
    onnx.save(model, str(path))


@pytest.mark.parametrize("case", ["detector_nhwc", "ccip_nhwc", "ccip_size"])
def test_a_model_whose_input_is_not_what_annotate_feeds_it_is_refused(case, source, tmp_path, capsys):
    """A channels-last detector or CCIP export, or annotate.ccip.size other than the side the CCIP
    file fixes, passed the start's check, and onnxruntime then refused every image ('invalid
    dimensions'): a model_failed errors row per image, for the whole collection. One line now."""
    from store.workspace import Workspace

    repo, folder, _, _ = DETECTORS["face"]
    path = {"detector_nhwc": source / repo / folder / "model.onnx",
            "ccip_nhwc": source / CCIP_REPO / CCIP_FILE, "ccip_size": source / CCIP_REPO / CCIP_FILE}[case]
    if case != "ccip_size":
        _channels_last(path, "images" if case == "detector_nhwc" else "input")
    size = ["--set", "annotate.ccip.size=224"] if case == "ccip_size" else []
    ws = Workspace(str(tmp_path / "ws"))
    code, _, err = booruset(capsys, "annotate", "-w", ws.root, "--set", f'annotate.models_dir="{source}"', *size)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert str(path) in err
    assert {"detector_nhwc": "not a detector's [batch, 3, height, width]",
            "ccip_nhwc": "not CCIP's [batch, 3, size, size]",
            "ccip_size": "annotate.ccip.size is 224 but the model takes 384 x 384"}[case] in err


def test_two_models_writing_the_same_model_name_are_refused(source, tmp_path, capsys):
    """annotate.head set to the face model's file: both wrote detections with model
    'face_detect_v1.4_s', each face twice under one name that no query can tell apart (and the
    summary merged their providers and model time). One line now."""
    from store.workspace import Workspace

    repo, folder, _, _ = DETECTORS["face"]
    ws = Workspace(str(tmp_path / "ws"))
    code, _, err = booruset(capsys, "annotate", "-w", ws.root, "--set", f'annotate.models_dir="{source}"', "--set",
                            f'annotate.head.repo="{repo}"', "--set", f'annotate.head.file="{folder}/model.onnx"')
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "annotate.face and annotate.head both write model 'face_detect_v1.4_s'" in err


def test_a_cascade_path_that_is_no_cascade_is_refused(tmp_path, capsys):
    """annotate.cascade_face.path naming a file that is no OpenCV cascade started Ray, and every
    cascade actor died in OpenCV ('SystemError: ... returned a result with an exception set'):
    the job failed with a traceback. One line at the start now, naming the file."""
    from store.workspace import Workspace

    bad = tmp_path / "faces.xml"
    bad.write_text("not a cascade\n")
    ws = Workspace(str(tmp_path / "ws"))
    code, _, err = booruset(capsys, "annotate", "-w", ws.root, "--set", 'annotate.models=["cascade_face"]',
                            "--set", f'annotate.cascade_face.path="{bad}"')
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"{bad} cannot be read as an OpenCV cascade" in err
