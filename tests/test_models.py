"""`booruset models fetch`: stage every configured model file in annotate.models_dir (hub layout),
from a staged folder (--source) or the hub; --list says what is there. Offline: the source is a
folder of the fake models in the hub layout."""

from __future__ import annotations

from pathlib import Path

import httpx
import huggingface_hub
import pytest
from huggingface_hub.errors import RemoteEntryNotFoundError

from jobs import cli, models
from jobs.config import load_config
from tests.onnx_fakes import CCIP_FILE, CCIP_REPO, DETECTORS, build_models_dir
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
    assert " KB)" in out  # sizes of the present files

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


def test_fetch_from_the_hub_downloads_into_the_layout(tmp_path, capsys, monkeypatch):
    # the hub itself cannot be reached from the tests: a stand-in with hf_hub_download's local_dir contract
    def hf_hub_download(repo_id: str, filename: str, local_dir: Path) -> str:
        if filename.endswith("model_type.json") and "face" in repo_id:
            raise RemoteEntryNotFoundError("404", response=httpx.Response(404, request=httpx.Request("GET", "x")))
        path = Path(local_dir) / filename
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{repo_id} {filename}")
        return str(path)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(models, "hub_reachable", lambda: True)
    dst = tmp_path / "models"
    code, out, _ = booruset(capsys, "models", "fetch", "--set", f'annotate.models_dir="{dst}"')
    assert code == 0, out
    face_side = f"{DETECTORS['face'][0]}/{DETECTORS['face'][1]}/model_type.json"
    assert lines_about(out, face_side)[0].startswith("not at the source")
    for name in [n for n in expected() if n != face_side]:
        assert lines_about(out, name)[0].startswith("fetched"), out
        assert (dst / name).read_text().replace(" ", "/") == name


@pytest.mark.parametrize("argv", [["models", "fetch"], ["models", "fetch", "--list"]])
def test_without_models_dir_it_says_how_to_set_it(argv, capsys):
    code, out, err = booruset(capsys, *argv)
    assert code == 2 and not out
    assert len(err.strip().splitlines()) == 1 and "--set annotate.models_dir=DIR" in err


def test_a_missing_source_folder_is_a_configuration_error(tmp_path, capsys):
    code, _, err = booruset(capsys, "models", "fetch", "--source", str(tmp_path / "nowhere"),
                            "--set", f'annotate.models_dir="{tmp_path / "models"}"')
    assert code == 2 and "not a folder" in err


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
