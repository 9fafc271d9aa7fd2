"""The command line: a person's mistakes give one line and exit 2 before Ray starts; failures
(disk full, read-only storage) give one line, exit 1 and a log file with the traceback."""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import pyarrow.fs as pafs
import pytest
from s3_server import s3_filesystem

from jobs import cli
from jobs.config import load_config
from tests.conftest import REPO
from tests.export_data import prepared_workspace

BOORUSET = Path(sys.executable).with_name("booruset")


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what earlier fixtures printed
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    # lines forwarded late from the session's Ray workers (other tests' actors) start with "(... pid=N)"
    lines = [ln for ln in err.strip().splitlines() if not re.match(r"^(\x1b\[\d+m)?\(.* pid=\d+", ln)]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.mark.parametrize(("argv", "hint"), [
    (["export", "--whre", "x = 1"], "unrecognized arguments: --whre x = 1 (did you mean --where?)"),
    (["ingest", "--inptu=a"], "unrecognized arguments: --inptu=a (did you mean --input?)"),
    (["curate", "--zzz"], "unrecognized arguments: --zzz"),
])
def test_an_unknown_option_is_refused_by_its_command_naming_the_one_meant(capsys, argv, hint):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err.startswith(f"usage: booruset {argv[0]} ")  # the command's usage, not the top level's
    assert err.strip().splitlines()[-1] == f"booruset {argv[0]}: error: {hint}"


@pytest.mark.parametrize(("argv", "says"), [
    (["ingets", "-w", "ws"], "argument COMMAND: invalid choice: 'ingets' (did you mean ingest?)"),
    (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate' (choose from ingest, annotate, curate, "),
    # a command's option before the command: "invalid choice: 'ws'", and "unrecognized arguments:
    # --config=x.toml (did you mean --config?)"
    (["-w", "ws", "sql", "select 1"], "-w goes after the command: booruset sql -w ..."),
    (["--config=x.toml", "report"], "--config goes after the command: booruset report --config=x.toml ..."),
])
def test_a_misspelt_command_or_an_option_before_it_is_a_usage_error_that_says_so(capsys, argv, says):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.strip().splitlines()[-1].startswith(f"booruset: error: {says}")


@pytest.fixture
def sample_ws(tmp_path_factory, ray_local) -> Path:
    """A workspace with the sample ingested, curated and captioned (a fresh copy)."""
    return prepared_workspace(tmp_path_factory)


# ---- sql ------------------------------------------------------------------------------------


def test_sql_syntax_error_is_one_line(capsys, sample_ws):
    code, _, err = run_cli(capsys, "sql", "-w", str(sample_ws), "selec * from images")
    assert code == 2
    assert one_line(err).startswith("booruset sql: Parser Error: syntax error at or near \"selec\"")


def test_sql_unknown_table_is_one_line(capsys, sample_ws):
    code, _, err = run_cli(capsys, "sql", "-w", str(sample_ws), "select * from imagez")
    assert code == 2
    line = one_line(err)
    assert "Catalog Error" in line and "imagez" in line and "images" in line  # DuckDB's "did you mean"


def test_sql_answers(capsys, sample_ws):
    code, out, _ = run_cli(capsys, "sql", "-w", str(sample_ws), "select count(*) as n from images")
    assert code == 0 and "24" in out


@pytest.mark.parametrize("command", ["sql", "annotate", "curate", "caption", "export", "report"])
def test_commands_refuse_a_path_that_is_not_a_workspace(capsys, tmp_path, command):
    path = tmp_path / "nothing_here"
    args = [command, "-w", str(path)] + (["select 1"] if command == "sql" else [])
    code, _, err = run_cli(capsys, *args)
    assert code == 2
    assert one_line(err).startswith(f"booruset: no workspace at {path}")
    assert not path.exists()  # nothing created there


# ---- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "expected"), [
    ("ray.max_error_rate=abc", "ray.max_error_rate = 'abc' (str): expected a number from 0 to 1"),
    ("ingest.max_pixels=abc", "ingest.max_pixels = 'abc' (str): expected a whole number >= 1"),
    ("ingest.max_pixels=1.5", "ingest.max_pixels = 1.5 (float): expected a whole number >= 1"),
    ('ingest.inputs="/path"', "ingest.inputs = '/path' (str): expected a list of strings"),
    ("export.exclude_tags=[1, 2]", "export.exclude_tags[0] = 1 (int): expected a string"),
    ("export.max_count=-5", "export.max_count = -5 (int): expected a whole number >= 1"),
    # values out of their option's domain (jobs/config.DOMAINS, NAMES, WORDS): all went through
    ("ray.max_error_rate=inf", "ray.max_error_rate = inf (float): expected a number from 0 to 1"),
    ("ray.max_error_rate=nan", "ray.max_error_rate = nan (float): expected a number from 0 to 1"),
    ("ray.max_error_rate=1.5", "ray.max_error_rate = 1.5 (float): expected a number from 0 to 1"),
    ("caption.asp_probabilities.copyright=1.5",
     "caption.asp_probabilities.copyright = 1.5 (float): expected a number from 0 to 1"),
    ("curate.max_multiply=inf", "curate.max_multiply = inf (float): expected a number >= 0.01"),
    ("annotate.tagger.batch_size=0", "annotate.tagger.batch_size = 0 (int): expected a whole number >= 1"),
    ("caption.accuracy_step=60", "caption.accuracy_step = 60 (int): expected a whole number from 1 to 50"),
    ("caption.unit_size=0", "caption.unit_size = 0 (int): expected a whole number >= 1"),
    ("export.jpeg_quality=500", "export.jpeg_quality = 500 (int): expected a whole number from 1 to 100"),
    ("curate.fh_ratio_bins=[0.0, nan]", "curate.fh_ratio_bins[1] = nan (float): expected a number >= 0"),
    ('curate.face_label=""', "curate.face_label = '' (str): expected a name, not empty"),
    ('curate.person_label="  "', "curate.person_label = '  ' (str): expected a name, not empty"),
    ('annotate.device="gpu"', "annotate.device = 'gpu' (str): expected one of 'auto', 'cuda', 'cpu'"),
    ("caption.send_images=yes", "caption.send_images = 'yes' (str): expected true or false"),
    ("annotate.cascade_face.min_size=abc", "annotate.cascade_face.min_size = 'abc' (str): expected a whole number"),
    ("annotate.cascade_face.nope=1", "unknown option annotate.cascade_face.nope"),
    # a path of blanks: a folder named " " in the current one
    ('export.out=" "', "export.out ' ' is blank: give a path, or \"\" for its default"),
    ('ingest.inputs=["\t"]', "ingest.inputs '\\t' is blank"),
    ("nosection.x=1", "unknown config section [nosection]"),
    # rows of a list-of-rows option are checked place by place (they failed in a caption worker)
    ('caption.quality_bands=[[0.5, "x"], ["y", 0.2]]', "caption.quality_bands[1][0] = 'y' (str): expected a number"),
    ("caption.quality_bands=[[0.5]]", "caption.quality_bands[0][1] = nothing: expected a list of [number, string]"),
    ('caption.quality_bands=[0.5, "x"]', "caption.quality_bands[0] = 0.5 (float): expected a list of [number, string]"),
    # values no parser takes: a one-line error, not a RecursionError or ValueError traceback (exit 1)
    ("export.formats=" + "[" * 5000, "--set export.formats: the value is nested too deeply"),
    ("caption.seed=" + "9" * 5000, "caption.seed = '9999"),
])
def test_bad_config_values_are_one_line_before_ray_starts(capsys, tmp_path, override, expected):
    import ray

    was_running = ray.is_initialized()
    code, _, err = run_cli(capsys, "ingest", "-w", str(tmp_path / "ws"), "--set", override)
    assert code == 2
    assert one_line(err).startswith(f"booruset: configuration error: {expected}")
    assert ray.is_initialized() == was_running
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize(("command", "override", "expected"), [
    ("curate", 'curate.cluster_method="bogus"', "curate.cluster_method must be optics or dbscan"),
    ("curate", 'curate.memory_limit="lots"', "curate.memory_limit 'lots'"),
    ("curate", "curate.lsh_bits=60", "curate.lsh_bits must be between 1"),
    # the workspace's own DuckDB: the report failed with a traceback and a log file (exit 1)
    ("report", 'workspace.duckdb_memory_limit="lots"', "workspace.duckdb_memory_limit 'lots': Parser Error"),
    ("sql", 'workspace.duckdb_memory_limit="2 gigs"', "workspace.duckdb_memory_limit '2 gigs': Parser Error"),
    ("export", "export.bucket_step=0", "export.buckets needs 1 <= bucket_step"),
])
def test_options_a_worker_would_stumble_on_are_configuration_errors(capsys, sample_ws, command, override, expected):
    """They failed inside the Ray worker: exit 1, a traceback log, after the job had started."""
    extra = ["--set", "export.buckets=true", "--set", "export.max_size=512"] if command == "export" else []
    extra += ["select 1"] if command == "sql" else []
    code, _, err = run_cli(capsys, command, "-w", str(sample_ws), "--set", override, *extra)
    assert code == 2
    assert one_line(err).startswith(f"booruset: configuration error: {expected}")
    assert not (sample_ws / "logs").exists()


def test_the_vllm_engine_without_vllm_is_one_line(capsys, sample_ws):
    """Local Ray runs the vllm backend's engine in this machine's workers: without vLLM, each of
    them failed with a traceback (116 lines) after the job had started."""
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    code, _, err = run_cli(capsys, "caption", "-w", str(sample_ws), "--set", 'caption.backend="vllm"')
    assert code == 2
    assert one_line(err).startswith('booruset: configuration error: caption.backend = "vllm" runs vLLM here')
    assert not (sample_ws / "logs").exists()


@pytest.mark.parametrize(("option", "says"), [
    ("caption.accuracy_step=0", "caption.accuracy_step = 0 (int): expected a whole number from 1 to 50"),
    ('caption.quality_bands=[[0.4, "auto_bad_caption"], [0.9, "auto_best_caption"]]', "highest first"),
    ('caption.quality_bands=[[90, "auto_best_caption"]]', "lowest accuracy 0..1"),
])
def test_run_refuses_bad_quality_bands_before_its_first_job(capsys, tmp_path, option, says):
    """A step of 0 failed each caption unit after its requests were paid for ("cannot convert
    float NaN to integer"); bands lowest first gave every caption the lowest one."""
    code, _, err = run_cli(capsys, "run", "-w", str(tmp_path / "ws"), "-i", str(REPO / "sample" / "shards"),
                           "--set", option)
    assert code == 2 and says in one_line(err) and not (tmp_path / "ws").exists()


def test_run_refuses_the_vllm_engine_before_its_first_job_but_not_on_a_cluster(capsys, tmp_path, monkeypatch):
    """`booruset run` says it before ingest (not after hours of annotate and curate); inside
    `ray job submit` (RAY_ADDRESS), only the cluster's GPU nodes need vLLM: no refusal."""
    import importlib.util

    from jobs.caption import check_vllm_here

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    code, _, err = run_cli(capsys, "run", "-w", str(tmp_path / "ws"), "-i", str(REPO / "sample" / "shards"),
                           "--set", 'caption.backend="vllm"')
    assert code == 2 and "runs vLLM here" in one_line(err) and not (tmp_path / "ws").exists()
    cfg = load_config(None, ['caption.backend="vllm"'])
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    check_vllm_here(cfg)
    monkeypatch.delenv("RAY_ADDRESS")
    cfg["caption"]["vllm_url"] = "http://127.0.0.1:8000/v1"
    check_vllm_here(cfg)


def test_bad_value_in_a_config_file(capsys, tmp_path):
    bad = tmp_path / "my.toml"
    bad.write_text('[ingest]\ninputs = "/data/shards"\n', encoding="utf-8")
    code, _, err = run_cli(capsys, "ingest", "--config", str(bad), "-w", str(tmp_path / "ws"))
    assert code == 2
    assert "ingest.inputs = '/data/shards' (str): expected a list of strings" in one_line(err)


@pytest.mark.parametrize(("text", "expected"), [
    ("[ray]\nnum_cpus = " + "9" * 5000 + "\n", "Exceeds the limit (4300 digits)"),
    ("[export]\nformats = " + "[" * 3000 + "]" * 3000 + "\n", "a value is nested too deeply"),
    ("[export]\nformats = ['\xff']\n", "codec can't decode"),
])
def test_a_config_file_no_parser_takes_is_one_line(capsys, tmp_path, text, expected):
    bad = tmp_path / "my.toml"
    bad.write_bytes(text.encode("latin-1"))
    code, _, err = run_cli(capsys, "ingest", "--config", str(bad), "-w", str(tmp_path / "ws"))
    assert code == 2 and expected in one_line(err) and len(one_line(err)) < 400
    assert not (tmp_path / "ws").exists()


@pytest.mark.parametrize("name", ["run.toml", "run.yaml"])
def test_a_config_file_saved_with_a_byte_order_mark_is_read(tmp_path, name):
    """Windows editors (Notepad) save UTF-8 with a byte order mark: the TOML file was refused
    with "Invalid statement (at line 1, column 1)", a line that shows nothing wrong."""
    text = "[ray]\nmax_error_rate = 0.2\n" if name.endswith(".toml") else "ray:\n  max_error_rate: 0.2\n"
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert load_config(str(tmp_path / name))["ray"]["max_error_rate"] == 0.2


def test_a_config_file_from_a_pipe_is_read_and_an_unreadable_one_is_one_line(capsys, tmp_path, monkeypatch):
    """`--config <(...)` (a pipe, /dev/fd/N) was "config file not found"; a file this user may
    not read was a PermissionError traceback and exit 1."""
    read, write = os.pipe()
    os.write(write, b"[ray]\nmax_error_rate = 0.2\n")
    os.close(write)
    try:
        assert load_config(f"/dev/fd/{read}")["ray"]["max_error_rate"] == 0.2
    finally:
        os.close(read)
    (tmp_path / "locked.toml").write_text("[ray]\n")

    read_text = Path.read_text

    def refused(self, *args, **kwargs):
        if self.name == "locked.toml":
            raise PermissionError(13, "Permission denied", str(self))
        return read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refused)
    code, _, err = run_cli(capsys, "ingest", "--config", str(tmp_path / "locked.toml"), "-w", str(tmp_path / "ws"))
    assert code == 2
    assert one_line(err) == f"booruset: configuration error: {tmp_path / 'locked.toml'}: Permission denied"


def test_rows_of_a_list_of_rows_option_stay_lists():
    cfg = load_config(None, ['caption.quality_bands=[[1, "best"], [0, "rest"]]'])
    assert cfg["caption"]["quality_bands"] == [[1.0, "best"], [0.0, "rest"]]
    assert default_rows() == load_config(None, [])["caption"]["quality_bands"]


def default_rows() -> list:
    import tomllib

    from jobs.config import DEFAULTS

    return tomllib.loads(DEFAULTS.read_text(encoding="utf-8"))["caption"]["quality_bands"]


def test_a_leading_tilde_in_a_path_option_is_the_home_folder(capsys, tmp_path, monkeypatch):
    """`out = "~/exports"` made a folder named `~` in the current one (which `rm -rf ~` then cleans up)."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ['export.out="~/exports"', 'ingest.inputs=["~/shards", "s3://b/~x", "rel"]',
                             'curate.tag_list="~/tags.csv"', 'caption.embedding_model="org/model"'])
    assert cfg["export"]["out"] == str(tmp_path / "exports") and cfg["curate"]["tag_list"] == str(tmp_path / "tags.csv")
    assert cfg["ingest"]["inputs"] == [str(tmp_path / "shards"), "s3://b/~x", "rel"]
    assert cfg["caption"]["embedding_model"] == "org/model"
    code, _, err = run_cli(capsys, "sql", "--set", 'workspace.path="~/ws"', "select 1")
    assert code == 2 and one_line(err).startswith(f"booruset: no workspace at {tmp_path / 'ws'}")
    assert not (tmp_path / "~").exists()
    # the config file too: `--config=~/run.toml` reaches the program with its `~` (the shell
    # expands none after `--config=`), which was "config file not found: ~/run.toml"
    (tmp_path / "run.toml").write_text('[export]\nout = "elsewhere"\n')
    assert load_config("~/run.toml")["export"]["out"] == "elsewhere"


@pytest.mark.parametrize(("args", "says"), [
    (["sql", "-w", "~no_such_user_b7/ws", "select 1"], "workspace.path '~no_such_user_b7/ws': ~no_such_user_b7 is no"),
    (["ingest", "-w", "ws", "-i", "~no_such_user_b7"], "ingest.inputs '~no_such_user_b7': ~no_such_user_b7 is no"),
    (["sql", "--config", "~no_such_user_b7/run.toml", "select 1"], "--config '~no_such_user_b7/run.toml': "),
])
def test_a_home_folder_that_is_not_there_is_one_line(capsys, tmp_path, monkeypatch, args, says):
    """`-w ~wrongname/ws`: Path.expanduser's RuntimeError was a traceback in a log file and exit 1."""
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and one_line(err).startswith(f"booruset: configuration error: {says}")
    assert not list(tmp_path.iterdir())


def test_set_reaches_nested_tables_and_keeps_types():
    cfg = load_config(None, ['annotate.cascade_face.path="/models/cascade.xml"', "annotate.cascade_face.min_size=32",
                             "ray.max_error_rate=1"])
    assert cfg["annotate"]["cascade_face"]["path"] == "/models/cascade.xml"
    assert cfg["annotate"]["cascade_face"]["min_size"] == 32
    assert cfg["annotate"]["cascade_face"]["scale_factor"] == 1.1  # the rest of the table is kept
    assert cfg["ray"]["max_error_rate"] == 1.0 and isinstance(cfg["ray"]["max_error_rate"], float)


def test_missing_input_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "ingest", "-w", str(tmp_path / "ws"), "-i", str(tmp_path / "no_such_folder"))
    assert code == 2
    line = one_line(err)
    assert line.startswith("booruset: configuration error:") and "no_such_folder" in line
    assert not (tmp_path / "ws").exists()  # no empty workspace left behind


# ---- help and version -----------------------------------------------------------------------


@pytest.mark.parametrize("command", ["ingest", "run"])
def test_no_input_for_a_workspace_of_other_inputs_is_a_mistake_not_the_sample(capsys, tmp_path, command):
    """`booruset run -w ws` after `booruset run -w ws -i ~/art` ingested the bundled sample into
    the user's dataset: 24 Ren'Py images in its balance and its export."""
    from jobs.config import SAMPLE_SHARDS
    from jobs.ingest import REGISTRY, check_sample_alone
    from store.workspace import Workspace

    ws = Workspace(str(tmp_path / "ws"))
    ws.write_json(REGISTRY, {str(SAMPLE_SHARDS): "shards"})
    check_sample_alone(load_config(None, []), ws)  # the sample's own workspace: run again as often as wanted
    ws.write_json(REGISTRY, {str(SAMPLE_SHARDS): "shards", str(tmp_path / "art"): "art"})
    check_sample_alone(load_config(None, [f"ingest.inputs=[{str(tmp_path / 'art')!r}]"]), ws)
    code, _, err = run_cli(capsys, command, "-w", str(tmp_path / "ws"))
    assert code == 2 and one_line(err).startswith(
        "booruset: configuration error: no input given (-i): the bundled sample would join this workspace's "
        "inputs (art; `booruset inputs` lists them)")
    assert not (tmp_path / "ws" / "tables" / "images").exists()


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_each_help_example_is_a_command_line_the_command_takes(command, monkeypatch, tmp_path):
    """`booruset models --help` showed `booruset models fetch --list`, which fails as it is:
    "models fetch needs a folder to stage the models in"."""
    monkeypatch.setattr("jobs.ingest.check_inputs", lambda cfg: None)  # the examples' inputs are not here
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my.toml").write_text("")
    for line in cli.COMMANDS[command][1].split("; "):
        argv = shlex.split(line)
        assert argv[:2] == ["booruset", command]
        cfg = cli.config_from_args(cli.parse_command_line(argv[1:]))
        cli.check_jobs(cfg, cli.PIPELINE + ["report"] if command == "run" else [command])
        assert command != "models" or cfg["annotate"]["models_dir"]


@pytest.mark.parametrize(("args", "says"), [
    (["run", "-i", "."], "the workspace (-w) {art}/workspace is inside the input folder {art}, and an ingest of "
                         "that folder would read its files as images: put it outside"),
    (["ingest", "-w", "sub/ws", "-i", "."], "the workspace (-w) {art}/sub/ws is inside the input folder {art}"),
    (["run", "-w", "../ws", "-i", ".", "--out", "exported"], "export.out {art}/exported is inside the input folder"),
    (["run", "-w", "../ws", "-i", ".", "--set", 'report.out="r"'], "report.out {art}/r is inside the input folder"),
])
def test_outputs_inside_a_folder_that_is_ingested_are_refused(capsys, tmp_path, monkeypatch, args, says):
    """`cd ~/art; booruset run -i .` ingested the workspace's own files on the next run: 4 images
    became 18 (the export's copies, the report's pictures), with 28 no_image errors."""
    art = tmp_path / "art"
    art.mkdir()
    (art / "a.png").write_bytes(b"")
    monkeypatch.chdir(art)
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and one_line(err).startswith("booruset: configuration error: " + says.format(art=art))
    assert [p.name for p in art.iterdir()] == ["a.png"] and not (tmp_path / "ws").exists()


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("booruset 0.")
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    top = capsys.readouterr().out
    for command in cli.COMMANDS:
        assert command in top
    for command in cli.COMMANDS:
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        text = capsys.readouterr().out
        assert "example:" in text and "default: ./workspace" in text, command


# ---- storage failures (real mounts: a read-only and a tiny tmpfs) ---------------------------


@contextlib.contextmanager
def tmpfs(path: Path, *options: str):
    """A tmpfs mounted at `path` (these machines run the suite as root, which may mount)."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options or ("size=4m",)), "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_read_only_storage_is_one_line(capsys, tmp_path):
    with tmpfs(tmp_path / "ro", "size=4m", "ro") as ro:
        code, _, err = run_cli(capsys, "ingest", "-w", str(ro / "ws"))
        assert code == 2
        line = one_line(err)
        assert line.startswith(f"booruset: cannot create a workspace at {ro / 'ws'}:") and "Read-only" in line
    with tmpfs(tmp_path / "was_rw", "size=4m") as mnt:
        (mnt / "ws" / "tables").mkdir(parents=True)
        (mnt / "ws" / "state").mkdir()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        code, _, err = run_cli(capsys, "curate", "-w", str(mnt / "ws"))
        assert code == 2
        line = one_line(err)
        assert line.startswith(f"booruset: workspace {mnt / 'ws'} is not writable") and "Read-only" in line


def test_disk_full_during_export_is_one_line_with_a_log(tmp_path, sample_ws):
    """A real `booruset export` process writing its shards to a 1 MB tmpfs: the disk fills inside a
    Ray task; the user sees one line and where the traceback was logged."""
    env = {k: v for k, v in os.environ.items() if k != "BOORUSET_VERBOSE"}
    with tmpfs(tmp_path / "full", "size=1m") as out:
        done = subprocess.run([str(BOORUSET), "export", "-w", str(sample_ws), "--out", str(out / "export"),
                               "--set", "ray.num_cpus=2"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    errors = done.stderr.strip().splitlines()
    assert len(errors) == 2, done.stderr
    assert errors[0].startswith("booruset export failed: no space left on device"), done.stderr
    log = Path(errors[1].removeprefix("booruset: full traceback in "))
    assert log.parent == sample_ws / "logs" and "Traceback" in log.read_text(encoding="utf-8")


# ---- sql is read-only -----------------------------------------------------------------------


@pytest.mark.parametrize(("query", "refused"), [
    ("copy (select * from images) to '{ws}/tables/images/x.parquet'", "COPY"),
    ("attach '{ws}/catalog.duckdb' as cat", "ATTACH"),
    ("install httpfs", "LOAD"),
    ("create table t as select 1", "CREATE"),
    ("select 1; drop view images", "DROP"),
    # EXPLAIN ANALYZE runs what it explains, and tables/ is the one folder DuckDB may touch
    ("explain analyze copy (select * from images limit 0) to '{ws}/tables/images/{part}'", "COPY"),
    ("EXPLAIN (FORMAT json) copy (select 1) to '{ws}/tables/images/x.parquet'", "COPY"),
    ("/* why */ explain analyze copy (select 1) to '{ws}/tables/images/x.parquet'", "commented EXPLAIN"),
])
def test_sql_refuses_statements_that_write(capsys, sample_ws, query, refused):
    before = {p.name: p.stat().st_size for p in (sample_ws / "tables" / "images").iterdir()}
    code, _, err = run_cli(capsys, "sql", "-w", str(sample_ws), query.format(ws=sample_ws, part=min(before)))
    assert code == 2
    assert one_line(err).startswith(f"booruset sql: {refused} statements are refused")
    assert {p.name: p.stat().st_size for p in (sample_ws / "tables" / "images").iterdir()} == before


@pytest.mark.parametrize("query", ["pivot images on format using count(*)",
                                   "copy (pivot images on format using count(*)) to '{ws}/tables/images/x.csv'"])
def test_sql_refuses_a_pivot_without_in_saying_how_to_write_it(capsys, sample_ws, query):
    """Such a PIVOT is parsed as several statements (a COPY of one too): it was refused as "MULTI
    statements", which named nothing the user wrote."""
    code, _, err = run_cli(capsys, "sql", "-w", str(sample_ws), query.format(ws=sample_ws))
    assert code == 2 and not (sample_ws / "tables" / "images" / "x.csv").exists()
    assert one_line(err).startswith("booruset sql: a PIVOT without IN runs as several statements, which are "
                                    "refused: name the values it spreads, pivot images on format in (")
    code, out, _ = run_cli(capsys, "sql", "-w", str(sample_ws), "pivot images on format in ('PNG') using count(*)")
    assert code == 0 and "PNG" in out


def test_sql_explains_and_answers_each_statement(capsys, sample_ws):
    code, out, _ = run_cli(capsys, "sql", "-w", str(sample_ws),
                           "explain analyze select count(*) from images; select 'first' as a; select 'second' as b")
    assert code == 0
    assert "Total Time" in out and "first" in out and "second" in out


def test_sql_prints_a_plan_as_drawn(capsys, sample_ws):
    """An EXPLAIN's plan was shown as a table cell: its lines joined by a literal \\n, cut at 200
    characters, so no plan of a real query could be read."""
    code, out, _ = run_cli(capsys, "sql", "-w", str(sample_ws), "explain select format, count(*) from images "
                           "where width > 100 group by format; explain analyze select 1")
    assert code == 0 and "\\n" not in out
    lines = [line.strip() for line in out.splitlines()]
    assert any(re.fullmatch(r"│ Filters: width > 100 *│", line) for line in lines)
    assert any(re.fullmatch(r"│ Total Time: [\d.]+s *│", line) for line in lines)


@pytest.mark.parametrize("query", ["select cast(key as int) from images", "select error('boom')"])
def test_sql_that_fails_as_it_runs_is_one_line(capsys, sample_ws, query):
    code, _, err = run_cli(capsys, "sql", "-w", str(sample_ws), query)
    assert code == 2
    assert "Error" in one_line(err)
    assert not (sample_ws / "logs").exists()


def test_sql_reads_nothing_outside_the_workspace(capsys, sample_ws):
    code, _, err = run_cli(capsys, "sql", "-w", str(sample_ws), "select * from read_csv('/etc/passwd')")
    assert code == 2 and "Permission Error" in one_line(err)
    code, _, err = run_cli(capsys, "sql", "-w", str(sample_ws), "set enable_external_access = true")
    assert code == 2 and "SET statements are refused" in one_line(err)


def test_ctrl_c_stops_a_query_that_does_not_end(tmp_path):
    """DuckDB's show() does not see SIGINT: `booruset sql` on a query that never ended went on
    after Ctrl-C, which only a kill stopped."""
    from store.workspace import Workspace

    Workspace(str(tmp_path / "ws"))
    (tmp_path / "tmp").mkdir()
    query = "select count(*) from range(100000000000000) a"
    child = subprocess.Popen([sys.executable, "-m", "jobs.cli", "sql", "-w", str(tmp_path / "ws"), query],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(REPO), "TMPDIR": str(tmp_path / "tmp")},
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    deadline = time.monotonic() + 60
    while not list((tmp_path / "tmp").glob("booruset-duckdb-*")) and time.monotonic() < deadline:
        time.sleep(0.1)  # its DuckDB's spill folder: the connection is made, the query next
    time.sleep(2)
    child.send_signal(signal.SIGINT)
    try:
        _, err = child.communicate(timeout=15)
    finally:
        child.kill()
    assert child.returncode == 130
    assert one_line(err) == "booruset: interrupted"


def test_a_reader_that_stops_reading_is_no_failure(tmp_path):
    """`booruset sql ... | head`: head's exit closed the pipe, and the next answer failed with a
    BrokenPipeError: exit 1 and a log file written into the workspace that sql only reads."""
    from store.workspace import Workspace

    Workspace(str(tmp_path / "ws"))
    query = "; ".join(["select range, 'row' as name from range(1000)"] * 60)  # far more than a pipe holds
    child = subprocess.Popen([sys.executable, "-m", "jobs.cli", "sql", "-w", str(tmp_path / "ws"), query],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             env={**os.environ, "PYTHONPATH": str(REPO)})
    assert child.stdout.readline()
    child.stdout.close()  # as head -1 does
    err = child.stderr.read().decode()
    assert child.wait(timeout=60) == 0 and err == ""
    assert not (tmp_path / "ws" / "logs").exists()


def test_workspace_paths_with_glob_characters_read_only_their_own_files(capsys, tmp_path):
    from store.workspace import Workspace

    rows = {"g1": 1, "g[1]": 2, "star*": 3, "starX": 4}
    for name, n in rows.items():
        ws = Workspace(str(tmp_path / name))
        ws.add_part("errors", "p", [{"key": f"{name}/{i}", "source": name, "member": "m", "stage": "ingest",
                                       "kind": "k", "message": "", "dropped": False} for i in range(n)])
    for name in ("g[1]", "star*"):
        code, out, _ = run_cli(capsys, "sql", "-w", str(tmp_path / name), "select count(*), min(source) from errors")
        assert code == 0 and f"{rows[name]} │ {name}" in out, out


@pytest.mark.parametrize("name", ["what?", "back\\slash"])
def test_a_workspace_path_duckdb_reads_as_a_query_or_a_separator_gets_its_catalog(capsys, tmp_path, name):
    """DuckDB opens a database file at 'a?b/x' as 'a.wal?b/x' and at 'a\\b/x' as 'a/b/x': the
    publish that writes catalog.duckdb failed with a traceback on such a workspace, every job's."""
    from store.workspace import Workspace

    ws = Workspace(str(tmp_path / name))
    ws.add_part("errors", "p", [{"key": "k", "source": "s", "member": "m", "stage": "ingest", "kind": "k",
                                 "message": "", "dropped": False}])
    safe = tmp_path / "copy.duckdb"
    shutil.copyfile(tmp_path / name / "catalog.duckdb", safe)
    con = duckdb.connect(str(safe), read_only=True)
    assert con.execute("select count(*) from errors").fetchone() == (1,)
    con.close()
    assert not [p.name for p in (tmp_path / name).iterdir() if p.name.startswith(".catalog-")]
    code, out, _ = run_cli(capsys, "sql", "-w", str(tmp_path / name), "select count(*), min(key) from errors")
    assert code == 0 and "1 │ k" in out, out


# ---- temporary files of runs that died ------------------------------------------------------


def test_jobs_sweep_stale_temporary_files(capsys, sample_ws):
    stale = [sample_ws / "tables" / "tags" / ".tmp-part-abc.parquet.tmp", sample_ws / "state" / "curate" / ".tmp-x",
             sample_ws / "export" / "webdataset" / ".tmp-0123-shard-000000.tar", sample_ws / ".catalog-1.duckdb"]
    for path in stale:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half written")
        os.utime(path, (1_000_000_000, 1_000_000_000))  # 2001: long before this run took the lock
    code, out, _ = run_cli(capsys, "curate", "-w", str(sample_ws))
    assert code == 0
    assert "curate: removed 4 temporary files left by runs that died" in out
    assert not any(p.exists() for p in stale)


def test_export_sweeps_its_own_folder(sample_ws, tmp_path):
    from jobs import export
    from store.workspace import Workspace
    from tests.export_data import base_config

    out = tmp_path / "out"
    stale = out / "webdataset" / ".tmp-0123-shard-000000.tar"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"half written")
    os.utime(stale, (1_000_000_000, 1_000_000_000))
    export.run(base_config(sample_ws, f'export.out="{out}"'), Workspace(str(sample_ws)))
    assert not stale.exists() and list((out / "webdataset").glob("shard-*.tar"))


@pytest.mark.parametrize(("command", "option"), [("export", "export.out"), ("report", "report.out")])
def test_an_output_folder_on_object_storage_is_refused(capsys, sample_ws, tmp_path, command, option):
    """export.out and report.out are local folders: a URI there was written to a local folder named `s3:`."""
    code, _, err = run_cli(capsys, command, "-w", str(sample_ws), "--set", f'{option}="s3://bucket/out"')
    assert code == 2
    assert one_line(err) == (f"booruset: configuration error: {option} must be a local folder (on a cluster, one "
                             "every node mounts), not 's3://bucket/out'")
    assert not (sample_ws / "s3:").exists() and not (tmp_path / "s3:").exists()


def test_an_export_folder_whose_name_is_not_utf8_is_one_line_before_any_job(capsys, sample_ws, tmp_path):
    """`--out` with a byte that is no UTF-8 (a folder named in Latin-1, "caf\\xe9"): Python keeps it
    as a lone surrogate, and the export failed at its first file operation (pyarrow's paths are
    UTF-8) with exit 1 and a traceback in a log, after Ray had started. It is a configuration error,
    before any job, and nothing is made."""
    out = str(tmp_path) + "/caf\udce9 out"
    code, _, err = run_cli(capsys, "export", "-w", str(sample_ws), "--out", out)
    assert code == 2
    assert one_line(err).startswith(f"booruset: configuration error: export.out {out!r} is not UTF-8 text")
    assert os.listdir(tmp_path) == []


def test_object_storage_mistakes_are_one_line_before_any_job(capsys, tmp_path, s3_endpoint, monkeypatch):
    """On an s3:// workspace: a run without a local export.out failed at export, after every job
    before it; a raw '#' dropped the endpoint after it (requests went to AWS); a URI pyarrow cannot
    parse was exit 1 with a log; a missing input left a new, empty workspace behind."""
    from s3_server import AWS

    for name, value in AWS.items():
        monkeypatch.setenv(name, value)
    query = f"endpoint_override={s3_endpoint}&scheme=http&region=us-east-1"
    shards = str(REPO / "sample" / "shards")
    cases = [
        (["run", "-w", f"s3://ws-bucket/cli-run?{query}", "-i", shards],
         "configuration error: export.out must be set to a local folder when the workspace is not local"),
        (["ingest", "-w", f"s3://ws-bucket/raw#hash?{query}", "-i", shards],
         f"workspace: write '#' as %23 in s3://ws-bucket/raw#hash?{query}"),
        (["ingest", "-w", f"s3://ws-bucket/a b ü?{query}", "-i", shards], "workspace: cannot parse the URI"),
        (["ingest", "-w", str(tmp_path / "ws"), "-i", f"s3://ws-bucket/in#1?{query}"],
         "configuration error: write '#' as %23"),
        (["ingest", "-w", str(tmp_path / "ws"), "-i", f"s3://ws-bucket/nothing-here?{query}"],
         f"configuration error: input not found: s3://ws-bucket/nothing-here?{query}"),
    ]
    cases.append((["run", "-w", str(tmp_path / "ws"), "-i", shards, "--set", 'export.out="s3://ws-bucket/out"'],
                  "configuration error: export.out must be a local folder"))
    for argv, expected in cases:
        code, _, err = run_cli(capsys, *argv)
        assert code == 2, err
        assert one_line(err).startswith(f"booruset: {expected}"), err
    assert not (tmp_path / "ws").exists()
    listed = s3_filesystem(s3_endpoint).get_file_info(pafs.FileSelector("ws-bucket", recursive=True))
    assert not [f.path for f in listed if f.path.startswith("ws-bucket/cli-run/tables/images")]


@pytest.mark.parametrize(("command", "option"), [("export", "export.out"), ("report", "report.out")])
def test_an_output_folder_that_cannot_be_made_is_one_line_before_any_job(capsys, sample_ws, tmp_path, command,
                                                                          option):
    """A report on a workspace it may only read failed at its mkdir (exit 1, a traceback in a log)
    after reading the whole workspace; a file where the folder should be did the same. As root
    here, a file in the way stands for a read-only mount: both are refused by the same check."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, out, err = run_cli(capsys, command, "-w", str(sample_ws), "--set", f'{option}="{blocker / "out"}"')
    assert code == 2
    assert one_line(err) == (f"booruset: configuration error: {option} {str(blocker / 'out')!r} cannot be made: "
                             f"{str(blocker)!r} is a file")
    assert not out


def test_a_report_on_a_read_only_workspace_asks_for_a_report_folder(capsys, sample_ws, tmp_path):
    """report only reads the workspace, but its default folder is inside it: on a read-only mount
    that was a traceback (exit 1) after reading it all; now one line naming the option."""
    with tmpfs(tmp_path / "ro", "size=64m") as mnt:
        shutil.copytree(sample_ws, mnt / "ws")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        code, _, err = run_cli(capsys, "report", "-w", str(mnt / "ws"))
        assert code == 2
        assert one_line(err) == (f"booruset: configuration error: report.out {str(mnt / 'ws' / 'report')!r} cannot "
                                 f"be written ({str(mnt / 'ws')!r} is read-only to this user): set report.out to a "
                                 "folder you can write")
        code, _, err = run_cli(capsys, "report", "-w", str(mnt / "ws"), "--set", f'report.out="{tmp_path / "r"}"')
        assert code == 0, err
        assert (tmp_path / "r" / "index.html").is_file()


def test_every_number_option_refuses_negative_and_non_finite_values():
    """Each number in defaults.toml has a domain checked with the config: inf, nan and -1 went
    through for max_error_rate (inf let every job pass), probabilities and more."""
    import tomllib

    from jobs.config import DEFAULTS, ConfigError

    def numbers(table: dict, where: str):
        for name, value in table.items():
            option = f"{where}.{name}" if where else name
            if isinstance(value, dict):
                yield from numbers(value, option)
            elif isinstance(value, int | float) and not isinstance(value, bool):
                yield option, value

    found = list(numbers(tomllib.loads(DEFAULTS.read_text()), ""))
    assert len(found) > 100
    for option, default in found:
        bad = ["-1"] + (["inf", "nan", "-inf"] if isinstance(default, float) else [])
        for value in bad:
            with pytest.raises(ConfigError, match=rf"^{re.escape(option)} = "):
                load_config(None, [f"{option}={value}"])
        assert load_config(None, [f"{option}={default!r}"])  # its default stays valid


@pytest.mark.parametrize(("option", "says"), [
    ('export.text="bogus"', "export.text must be"),
    ('annotate.models=["face", "nope"]', "annotate.models: unknown models ['nope']"),
    ('curate.group_format="n_characters/bogus"', "curate.group_format 'n_characters/bogus': unknown segments"),
    ("curate.fh_ratio_bins=[0.5, 0.1]", "curate.fh_ratio_bins must be at least two increasing edges"),
    ("ingest.frames.max_side=32", "ingest.frames.max_side must be >= min_side"),
    ('export.where="rating = "', "export.where 'rating =' is not a SQL condition"),
    ('export.where="true; drop table images"', "export.where 'true; drop table images' is not a SQL condition"),
    # a column the selection does not have: it bound only at export, after the four jobs before
    ('export.where="n_characters > 0"', "export.where 'n_characters > 0': Binder Error: Referenced column "
                                        "\"n_characters\" not found in FROM clause! Candidate bindings: "),
    ("export.where=\"no_such_function(key)\"", "export.where 'no_such_function(key)': Catalog Error: Scalar Function"),
    ("annotate.cascade_face.num_cpus=4096", "annotate needs 4096.5 CPUs at once (model pools: cascade_face 4096;"),
])
def test_run_refuses_each_jobs_options_before_its_first_job(capsys, tmp_path, option, says):
    """Each job checked its own options only when it started: `run --set export.text=bogus`
    ingested, annotated, curated and captioned first, then failed."""
    code, _, err = run_cli(capsys, "run", "-w", str(tmp_path / "ws"), "-i", str(REPO / "sample" / "shards"),
                           "--set", option)
    assert code == 2 and says in one_line(err) and not (tmp_path / "ws").exists()


@pytest.mark.parametrize(("command", "option"), [("export", "export.task_num_cpus"), ("caption", "caption.num_cpus"),
                                                  ("annotate", "annotate.task_num_cpus")])
def test_a_task_the_local_ray_cannot_fit_is_refused(capsys, monkeypatch, tmp_path, command, option):
    """A task or actor asking for more CPUs than the local Ray has is never scheduled: `booruset
    export --set export.task_num_cpus=1.5 --set ray.num_cpus=1` (or caption.num_cpus) printed
    "export plan: 0/15 images" and Ray's "No available node types can fulfill resource request
    {'CPU': 1.5}" for as long as it was left to run (ten minutes), where the README says a CPU
    task needing more CPUs than the local Ray has is refused with one line (before a workspace
    is looked for; `run` checks every job's options the same way, before its first job). annotate
    alone checked its CPUs only once its pipeline started, after copying the kept rows of replaced
    units in tasks of annotate.task_num_cpus, which waited the same way."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # a Ray of its own, as a person's command line starts
    code, _, err = run_cli(capsys, command, "-w", str(tmp_path / "ws"), "--set", "ray.num_cpus=1",
                           "--set", f"{option}=1.5")
    assert code == 2 and not (tmp_path / "ws").exists()
    assert one_line(err) == (f"booruset: configuration error: {option} 1.5 is more than the 1 CPUs of the local "
                             "Ray (ray.num_cpus, else this machine's): Ray would never start such a task and the "
                             f"job would wait for good; lower {option} or raise ray.num_cpus")


def test_a_task_larger_than_this_machine_is_left_to_a_cluster(monkeypatch):
    """A cluster may have (or add) larger nodes than the driver's machine: only a local Ray is checked."""
    from jobs.config import ConfigError
    from jobs.ray_env import check_task_cpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    cfg = load_config(None, ["export.task_num_cpus=4096"])
    with pytest.raises(ConfigError, match="export.task_num_cpus 4096 is more than"):
        check_task_cpus(cfg, "export.task_num_cpus")
    check_task_cpus(load_config(None, ["export.task_num_cpus=4096", 'ray.address="head:6379"']),
                    "export.task_num_cpus")
    monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:8265")  # inside `ray job submit`
    check_task_cpus(cfg, "export.task_num_cpus")


def test_an_export_where_that_fails_on_a_row_is_one_line(capsys, sample_ws):
    """A condition that binds but fails on the rows (a key cast to a number) printed DuckDB's
    message with its excerpt of the 150-line selection query under it: three lines."""
    code, _, err = run_cli(capsys, "export", "-w", str(sample_ws), "--where", "key = 1")
    assert code == 2
    assert one_line(err).startswith("booruset: configuration error: export.where 'key = 1': Conversion Error: ")


@pytest.mark.parametrize("query", ["", "   \n", "-- nothing", "/* nothing */ ;", ";"])
def test_sql_with_no_statement_is_one_line(capsys, tmp_path, query):
    """An empty query (a shell variable that was not set) exited 0 with no output."""
    from store.workspace import Workspace

    Workspace(str(tmp_path / "ws"))
    code, out, err = run_cli(capsys, "sql", "-w", str(tmp_path / "ws"), query)
    assert code == 2 and out == ""
    assert one_line(err).startswith("booruset sql: the query is empty")


@pytest.mark.parametrize(("override", "says"), [
    ("curate.phash_distanc=3", "unknown option curate.phash_distanc (did you mean curate.phash_distance?)"),
    ("curat.phash_distance=3", "unknown config section [curat] (did you mean curate?)"),
    ("annotate.tagger.batchsize=3",
     "unknown option annotate.tagger.batchsize (did you mean annotate.tagger.batch_size?)"),
    ("caption.max_error_rate=0.1", "unknown option caption.max_error_rate (did you mean ray.max_error_rate?)"),
    ("ingest.zzz=3", "unknown option ingest.zzz"),
])
def test_an_unknown_option_names_the_one_meant(capsys, tmp_path, override, says):
    """A misspelt option or one in another section said only "unknown option"."""
    code, _, err = run_cli(capsys, "ingest", "-w", str(tmp_path / "ws"), "--set", override)
    assert code == 2 and one_line(err) == f"booruset: configuration error: {says}"


def test_a_yaml_config_file_is_read_as_its_tables(capsys, tmp_path):
    """DESIGN: one config file, TOML or YAML. A YAML file was read as TOML: "Expected '=' after a key"."""
    (tmp_path / "run.yaml").write_text("curate:\n  phash_distance: 3\nannotate:\n  tagger:\n    batch_size: 8\n")
    cfg = load_config(str(tmp_path / "run.yaml"), ["curate.lsh_bits=12"])
    assert (cfg["curate"]["phash_distance"], cfg["annotate"]["tagger"]["batch_size"]) == (3, 8)
    assert cfg["curate"]["lsh_bits"] == 12 and cfg["caption"]["target"] == 0.6  # the rest: defaults, --set
    (tmp_path / "empty.yml").write_text("# nothing yet\n")
    assert load_config(str(tmp_path / "empty.yml")) == load_config(None)
    for name, text, says in (("bad.yaml", "curate: [1,\n", "bad.yaml: while parsing"),
                             ("list.yaml", "- curate\n", "list.yaml: expected tables of options"),
                             ("domain.yaml", "ray:\n  max_error_rate: .inf\n",
                              "ray.max_error_rate = inf (float): expected a number from 0 to 1"),
                             # YAML 1.1 reads on, yes and no as booleans: a traceback in the near-miss search
                             ("keys.yaml", "curate:\n  on: 1\n", "True in [curate] is no option name")):
        (tmp_path / name).write_text(text)
        code, _, err = run_cli(capsys, "ingest", "-w", str(tmp_path / "ws"), "--config", str(tmp_path / name))
        assert code == 2 and says in one_line(err) and not (tmp_path / "ws").exists()


def test_a_yaml_key_given_twice_is_refused_as_in_toml(capsys, tmp_path):
    """TOML refuses a section or option given twice; YAML kept the last one without a word, so a
    second `annotate:` block dropped every option of the first."""
    (tmp_path / "twice.yaml").write_text("annotate:\n  tagger:\n    batch_size: 8\nray:\n  max_error_rate: 0.5\n"
                                         "annotate:\n  face:\n    batch_size: 4\n")
    code, _, err = run_cli(capsys, "ingest", "-w", str(tmp_path / "ws"), "--config", str(tmp_path / "twice.yaml"))
    assert code == 2 and not (tmp_path / "ws").exists()
    assert "twice.yaml: 'annotate' is given twice (first on line 1)" in one_line(err) and "line 6" in one_line(err)
    # a merge key's options overridden after it are no repetition
    (tmp_path / "merge.yaml").write_text("annotate:\n  face: &f {batch_size: 8, threads: 2}\n"
                                         "  head:\n    <<: *f\n    batch_size: 4\n")
    cfg = load_config(str(tmp_path / "merge.yaml"))
    assert (cfg["annotate"]["head"]["batch_size"], cfg["annotate"]["head"]["threads"]) == (4, 2)


@pytest.mark.parametrize("port", ["70000", "-5", "http"])
def test_a_port_out_of_range_is_a_usage_error(capsys, tmp_path, port):
    """--port 70000 failed in bind() (OverflowError): a traceback log and exit 1."""
    from store.workspace import Workspace

    Workspace(str(tmp_path / "ws"))
    with pytest.raises(SystemExit) as exit_code:
        cli.main(["review", "-w", str(tmp_path / "ws"), "--port", port])
    assert exit_code.value.code == 2
    assert "argument --port: " in capsys.readouterr().err and not (tmp_path / "ws" / "logs").exists()


@pytest.mark.parametrize(("args", "flag"), [
    (["ingest", "-w", "", "-i", "in"], "--workspace"),
    (["ingest", "-w", "ws", "-i", ""], "--input"),
    (["sql", "-w", " ", "select 1"], "--workspace"),
    (["export", "-w", "ws", "--out", ""], "--out"),
    # `--config "$CFG"` with CFG unset ran with the defaults alone
    (["sql", "-w", "ws", "--config", "", "select 1"], "--config"),
])
def test_an_empty_path_flag_is_a_mistake_not_the_default(capsys, tmp_path, monkeypatch, args, flag):
    """`booruset ingest -w "$WS" -i "$IN"` with both unset ingested the bundled sample ("" in
    ingest.inputs) into ./workspace."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "in").mkdir()
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and one_line(err) == f"booruset: configuration error: {flag} is empty: give a path " \
                                          "(an unset shell variable?)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no workspace made


def test_a_wildcard_domain_does_not_hide_a_narrower_option():
    """curate.ccip_threshold is a difference (1 - cosine, up to 2): curate.*_threshold's 0..1 is not its."""
    from jobs.config import ConfigError

    assert load_config(None, ["curate.ccip_threshold=1.5"])["curate"]["ccip_threshold"] == 1.5
    with pytest.raises(ConfigError, match="curate.ccip_threshold = 2.5 \\(float\\): expected a number from 0 to 2"):
        load_config(None, ["curate.ccip_threshold=2.5"])
    with pytest.raises(ConfigError, match="curate.face_threshold = 1.5 \\(float\\): expected a number from 0 to 1"):
        load_config(None, ["curate.face_threshold=1.5"])


def test_a_format_given_twice_is_one_layout():
    args = cli.build_parser().parse_args(["export", "--format", "kohya", "--format", "webdataset", "--format", "kohya"])
    assert cli.config_from_args(args)["export"]["formats"] == ["kohya", "webdataset"]


CTRL_C_DURING_THE_BIND = """
import signal, threading, time, os, duckdb
from jobs import cli
real = duckdb.connect()

class SlowToBind:  # the connection, with con.sql taking its time as a bind over many files does
    def sql(self, query):
        time.sleep(0.5)
        return real.sql(query)

    def interrupt(self):
        real.interrupt()

signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal
threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()  # Ctrl-C during the bind
try:
    cli.show_answer(SlowToBind(), "select count(*) from range(100000000000000) a")
except KeyboardInterrupt:
    print("interrupted")
"""


def test_ctrl_c_before_the_query_runs_stops_it_too():
    """Ctrl-C while the statement is still being read (con.sql binds it: every Parquet file of
    the views it names, slow on a big or remote workspace) and not yet run: DuckDB forgets an
    interrupt with no query running, and sql waited for the whole query after its Ctrl-C. In a
    process of its own: a SIGINT in pytest's, where Ray runs, is not the terminal's."""
    child = subprocess.Popen([sys.executable, "-c", CTRL_C_DURING_THE_BIND], cwd=REPO, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    started = time.monotonic()
    try:
        out, err = child.communicate(timeout=30)
    finally:
        child.kill()
    assert out.strip() == "interrupted", err
    assert time.monotonic() - started < 20


SIGTERM_WHILE_RAY_RUNS = """
import os, signal, sys, threading, time
import ray
from jobs import cli, ingest
from jobs.ray_env import init_ray

def nap():
    time.sleep(60)

def run(cfg, ws):  # the job, stopped by a SIGTERM while the driver waits for a Ray task
    init_ray(cfg)
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    ray.get(ray.remote(nap).remote())

ingest.run = run
sys.exit(cli.main(["ingest", "-w", sys.argv[1], "-i", sys.argv[2], "--set", "ray.num_cpus=1"]))
"""


def test_sigterm_stops_a_job_as_ctrl_c_does_with_one_line(tmp_path):
    """SIGTERM (docker stop, Slurm's preemption, `ray job stop`, `timeout`) reached the handler
    ray.init sets in the driver (sys.exit(15)) behind the Ray core worker's crash handler: a
    native stack dump ("*** SIGTERM received ... PC: @ ...") on the terminal, exit status 15 or
    1, and at times an abort (-6). It stops the job as Ctrl-C does: one line, 128 + 15. In a
    process of its own: the signal must reach a driver, not pytest's process."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a Ray of its own
    env.update(PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
    done = subprocess.run([sys.executable, "-c", SIGTERM_WHILE_RAY_RUNS, str(tmp_path / "ws"), str(folder)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stdout[-2000:] + done.stderr[-2000:]
    assert "booruset: terminated (SIGTERM)" in done.stderr
    assert "SIGTERM received" not in done.stdout + done.stderr


def test_sigterm_while_ray_starts_stops_the_job_the_same_way(tmp_path):
    """A SIGTERM while ray.init starts the local Ray met Ray's own handler (sys.exit(15)): the job
    ended with exit status 15 and no word of why."""
    script = SIGTERM_WHILE_RAY_RUNS.replace("    init_ray(cfg)\n    threading.Timer(1.0,", "    threading.Timer(0.3,")
    script = script.replace("    ray.get(ray.remote(nap)", "    init_ray(cfg)\n    ray.get(ray.remote(nap)")
    assert script.index("Timer(0.3") < script.index("init_ray(cfg)")
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "ws"), str(folder)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 143, done.stdout[-2000:] + done.stderr[-2000:]
    assert "booruset: terminated (SIGTERM)" in done.stderr


def test_a_ray_address_nothing_answers_at_is_one_line_in_seconds(tmp_path):
    """ray.init retried an address nothing listens on (a typo, a head that is down) for minutes,
    printing GCS warnings, before a traceback. In a process of its own: the test session's Ray is
    up in this one, and a job joins it without asking."""
    import socket

    with socket.socket() as free:  # a port nothing listens on once closed
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled")
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "ingest", "-w", str(tmp_path / "ws"), "-i", str(folder),
                           "--set", f'ray.address="127.0.0.1:{port}"'], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"ray.address '127.0.0.1:{port}': nothing answers there" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and time.monotonic() - started < 60
