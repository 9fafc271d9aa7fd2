"""cluster.yaml is a valid Ray cluster launcher config with the layout booruset needs.

Offline: validates against the JSON schema shipped inside the installed ray package and runs
ray's own offline config preparation (defaults, setup-command merging, checks); nothing here
talks to a cloud provider.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
ray = pytest.importorskip("ray")
ray_autoscaler = pytest.importorskip("ray.autoscaler")

CLUSTER_YAML = Path(__file__).resolve().parent.parent / "cluster.yaml"
SCHEMA_PATH = Path(ray_autoscaler.__file__).resolve().parent / "ray-schema.json"

# Instance families with NVIDIA GPUs (AWS / GCP / Azure naming), for node types that rely on
# instance-type autodetection instead of an explicit GPU resource.
GPU_INSTANCE = re.compile(
    r"^(g4dn|g5|g5g|g6|g6e|gr6|p3|p4d|p4de|p5|p5e|a2-|a3-|g2-|Standard_N)",
    re.IGNORECASE,
)
INSTALL_PROJECT = re.compile(r"pip install\s+(-e|--editable)\s+\S*")


def _load() -> dict:
    with CLUSTER_YAML.open() as f:
        config = yaml.safe_load(f)
    assert isinstance(config, dict), "cluster.yaml must be a mapping"
    return config


@pytest.fixture(scope="module")
def config() -> dict:
    return _load()


def _instance_type(node_type: dict) -> str:
    nc = node_type.get("node_config", {})
    return str(
        nc.get("InstanceType")
        or nc.get("machineType")
        or nc.get("azure_arm_parameters", {}).get("vmSize")
        or ""
    )


def _is_gpu(node_type: dict) -> bool:
    return node_type.get("resources", {}).get("GPU", 0) > 0 or bool(
        GPU_INSTANCE.match(_instance_type(node_type))
    )


def _worker_types(config: dict) -> dict[str, dict]:
    return {
        name: nt
        for name, nt in config["available_node_types"].items()
        if name != config["head_node_type"]
    }


def _effective_setup(config: dict, name: str) -> list[str]:
    """The setup commands the launcher runs on a node of this type (after common setup)."""
    if name == config["head_node_type"]:
        return config.get("setup_commands", []) + config.get("head_setup_commands", [])
    node_type = config["available_node_types"][name]
    # A per-type list replaces both setup_commands and worker_setup_commands.
    if "worker_setup_commands" in node_type:
        return node_type["worker_setup_commands"]
    return config.get("setup_commands", []) + config.get("worker_setup_commands", [])


def _installs_project(commands: list[str], extra: str | None = None) -> bool:
    for cmd in commands:
        if "booruset" not in cmd or not INSTALL_PROJECT.search(cmd):
            continue
        if extra is None or f"[{extra}]" in cmd:
            return True
    return False


def test_schema_file_ships_with_ray():
    assert SCHEMA_PATH.is_file(), f"no cluster config schema at {SCHEMA_PATH}"


def test_matches_ray_schema(config):
    schema = json.loads(SCHEMA_PATH.read_text())
    jsonschema.validate(config, schema)


def test_ray_prepare_and_validate_config(config):
    """ray's own offline pipeline: fill provider defaults, merge setup commands, validate."""
    util = pytest.importorskip("ray.autoscaler._private.util")
    prepared = util.prepare_config(json.loads(json.dumps(config)))
    util.validate_config(prepared)
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_required_launcher_fields(config):
    for key in (
        "cluster_name",
        "max_workers",
        "idle_timeout_minutes",
        "upscaling_speed",
        "head_start_ray_commands",
        "worker_start_ray_commands",
        "file_mounts",
    ):
        assert key in config, f"cluster.yaml lacks {key}"
    assert any("--head" in c for c in config["head_start_ray_commands"])
    assert any("RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])


def test_head_is_cpu_node_without_tasks(config):
    head = config["head_node_type"]
    assert head in config["available_node_types"]
    head_type = config["available_node_types"][head]
    assert not _is_gpu(head_type), "head must be a CPU node"
    assert head_type["resources"].get("CPU", 0) <= 2, (
        "schedule (almost) nothing on the head"
    )


def test_gpu_and_cpu_worker_groups(config):
    workers = _worker_types(config)
    gpu = {n: nt for n, nt in workers.items() if _is_gpu(nt)}
    cpu = {n: nt for n, nt in workers.items() if not _is_gpu(nt)}
    assert gpu, "need a GPU worker type for the model actor pools"
    assert cpu, "need a CPU worker type for decoding/preprocessing"
    for name, nt in workers.items():
        assert nt.get("min_workers", 0) <= nt.get(
            "max_workers", config["max_workers"]
        ), name
        assert nt.get("max_workers", 0) > 0, f"{name} can never scale up"
    assert (
        sum(nt.get("min_workers", 0) for nt in workers.values())
        <= config["max_workers"]
    )


def test_file_mount_ships_project(config):
    assert config["file_mounts"].get("~/booruset") in (".", "./"), (
        "file_mounts must map ~/booruset to the repository root"
    )


def test_setup_commands_install_project(config):
    for name, nt in config["available_node_types"].items():
        commands = _effective_setup(config, name)
        extra = "gpu" if name != config["head_node_type"] and _is_gpu(nt) else "cpu"
        assert _installs_project(commands, extra), (
            f"setup commands of {name!r} must pip install -e the project with the [{extra}] extra: {commands}"
        )
        for cmd in commands:
            # Local-only pins (e.g. torch from a local wheel) are not valid on a cluster node.
            assert not re.search(r"pip install[^|;&]*\btorch==", cmd), cmd


def test_ray_resolves_per_node_setup_and_images(config):
    """What ray itself will run on each worker type (its v2 config reader, offline)."""
    cfg_mod = pytest.importorskip("ray.autoscaler.v2.instance_manager.config")
    ac = cfg_mod.AutoscalingConfig(
        json.loads(json.dumps(config)), skip_content_hash=True
    )
    for name, nt in _worker_types(config).items():
        commands = ac.get_worker_setup_commands(name)
        assert _installs_project(commands, "gpu" if _is_gpu(nt) else None), (
            name,
            commands,
        )
        if config.get("docker"):
            image = ac.get_docker_config(name).get("image", "")
            assert ("gpu" in image or "cu1" in image) == _is_gpu(nt), (name, image)


def test_images_match_local_ray_version(config):
    """The launcher and the cluster must run the same Ray version."""
    docker = config.get("docker") or {}
    images = [docker.get(k) for k in ("image", "head_image", "worker_image")]
    images += [
        nt.get("docker", {}).get("worker_image")
        for nt in config["available_node_types"].values()
    ]
    images = [i for i in images if i]
    if not images:
        pytest.skip("no docker images configured")
    for image in images:
        if image.startswith("rayproject/"):
            tag = image.rsplit(":", 1)[-1]
            assert tag.startswith(ray.__version__ + "-"), (
                f"{image} does not match the installed ray {ray.__version__}"
            )


def test_onnxruntime_comes_from_exactly_one_extra():
    """onnxruntime and onnxruntime-gpu install the same module: a GPU node must get only the second."""
    import tomllib

    project = tomllib.loads((CLUSTER_YAML.parent / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=\[ ]", d)[0] for d in project["dependencies"]]
    extras = project["optional-dependencies"]
    assert not any(n.startswith("onnxruntime") for n in names)
    assert any(d.startswith("onnxruntime>") for d in extras["cpu"])
    assert any(d.startswith("onnxruntime-gpu") for d in extras["gpu"])
    assert not any(d.startswith("onnxruntime>") for d in extras["gpu"])
    # ray[llm] pins a vLLM that needs numpy 2 beside the project's numpy<2 (dghs-imgutils): pip
    # could not install [gpu] at all. The engines get an environment of their own instead.
    assert not any(d.startswith(("ray[llm]", "vllm")) for d in extras["gpu"])


def test_the_gpu_extra_can_build_the_engines_environment():
    """caption.vllm_environment = "isolated" (the default) is a runtime_env pip: on a node whose
    Python is no virtualenv (conda, a system or pyenv Python) Ray makes it with `python -m
    virtualenv`, which ray[data] does not install (ray[llm], in [gpu] before, did): the engines'
    environment failed with 'No module named virtualenv'."""
    import tomllib

    gpu = tomllib.loads((CLUSTER_YAML.parent / "pyproject.toml").read_text())["project"]["optional-dependencies"]["gpu"]
    assert any(re.split(r"[<>=!\[ ;]", d)[0] == "virtualenv" for d in gpu)


def test_setup_commands_replace_the_gui_opencv(config, tmp_path):
    """dghs-imgutils installs opencv-contrib-python, whose cv2 needs libGL (absent in the
    rayproject/ray images): every node type installs the same version's headless build after
    the project. The command runs here in a shell, with a `pip` on PATH that records its
    arguments, and the real `python` to read the installed version."""
    import shutil
    import subprocess
    import sys
    from importlib.metadata import version

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pip").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$PIP_ARGS"\n')
    (bin_dir / "pip").chmod(0o755)
    # a script, not a link: a link to a venv's python would not find the venv's packages
    (bin_dir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bin_dir / "python").chmod(0o755)
    assert shutil.which("sh")
    for name in config["available_node_types"]:
        commands = _effective_setup(config, name)
        project = next(i for i, cmd in enumerate(commands) if INSTALL_PROJECT.search(cmd))
        headless = [cmd for cmd in commands[project + 1:] if "opencv-contrib-python-headless" in cmd]
        assert len(headless) == 1, (name, commands)
        args_file = tmp_path / f"{name}.args"
        env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PIP_ARGS": str(args_file)}
        subprocess.run(["sh", "-c", headless[0]], env=env, check=True)
        assert args_file.read_text().split("\n")[:-1] == [
            "install", "--no-deps", "--force-reinstall",
            f"opencv-contrib-python-headless=={version('opencv-contrib-python')}"], name
