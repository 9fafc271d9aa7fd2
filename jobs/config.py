"""Configuration: defaults.toml, overridden by a run's TOML file, overridden by --set flags.

defaults.toml is the one documented list of options. The checks are a pydantic model
generated from it: every option takes the type of its default (an int option refuses "abc"
and 1.5, a list option refuses a bare string, a table refuses unknown keys), numbers are
finite and never negative, and DOMAINS, NAMES and WORDS below narrow single options (a share
is at most 1, a batch at least 1, a label not ""), so that all of it is said before any job
starts. Rules that tie options together are checked by the job that reads them, where the
meaning lives (each job's check_options, which the CLI runs before the first job too).
"""

from __future__ import annotations

import ast
import copy
import difflib
import fnmatch
import functools
import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    create_model,
)

DEFAULTS = Path(__file__).with_name("defaults.toml")
REPO = Path(__file__).resolve().parent.parent
SAMPLE_SHARDS = REPO / "sample" / "shards"

Config = dict[str, dict[str, Any]]


class ConfigError(ValueError):
    """Bad configuration: the job stops with a clear message and a non-zero exit."""


def out_folder(job: str, cfg: Config, ws_local: bool, ws_base: str) -> Path:
    """[job].out (export's or report's folder), which must be local: a URI became a local folder
    named `s3:`; unset, the workspace's own `<job>/` folder, which only a local workspace has."""
    out = str(cfg[job]["out"])
    if "://" in out:
        raise ConfigError(f"{job}.out must be a local folder (on a cluster, one every node mounts), not {out!r}")
    if not out:
        if not ws_local:
            raise ConfigError(f"{job}.out must be set to a local folder when the workspace is not local")
        out = f"{ws_base}/{job}"
    if job == "export" and not utf8(out):  # pyarrow, which lists and writes the export's folder, takes UTF-8 paths
        raise ConfigError(f"{job}.out {out!r} is not UTF-8 text (a byte of another encoding, shown as \\udcXX): "
                          "rename the folder, or choose another")
    return Path(out).resolve()


def utf8(text: str) -> bool:
    """Whether `text` is UTF-8 text: not a name with bytes of another encoding, which Python keeps as
    lone surrogates (os.fsdecode, the command line)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_writable_folder(option: str, folder: Path, write: bool = True) -> None:
    """ConfigError unless `folder` exists as a folder we may write, or could be made in one: a
    report on a read-only workspace failed at its mkdir with a traceback, after reading it all.
    access() answers EROFS for a read-only mount even to root, without writing anything.
    write=False: only that no file stands where the folder or one above it should be."""
    existing = next(p for p in (folder, *folder.parents) if os.path.exists(p))  # False where not searchable
    if not existing.is_dir():
        raise ConfigError(f"{option} {str(folder)!r} cannot be made: {str(existing)!r} is a file")
    if write and not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {str(folder)!r} cannot be written ({str(existing)!r} is read-only "
                          f"to this user): set {option} to a folder you can write")


def check_memory_limit(option: str, value: str) -> None:
    """ConfigError unless DuckDB takes `value` as a memory limit ("2GB", "500MiB", "50%")."""
    import duckdb

    try:
        duckdb.connect(config={"memory_limit": value}).close()
    except duckdb.Error as exc:
        raise ConfigError(f"{option} {value!r}: {exc}") from None


# Options that name a local file or folder (or a URI): a leading `~` is the home folder, as a shell
# would read it (`out = "~/exports"` made a folder named `~` in the current one).
PATH_OPTIONS = ("workspace.path", "ingest.inputs", "annotate.models_dir", "annotate.cascade_face.path",
                "curate.tag_list", "curate.rules_dir", "curate.blacklist", "curate.overlap_tags",
                "curate.character_tags", "curate.ccip_metric_model", "curate.references", "curate.weights",
                "caption.embedding_model", "caption.tag_vocabulary", "export.out", "report.out")


def expand_home(cfg: Config) -> Config:
    """PATH_OPTIONS with a leading `~` or `~user` as the home folder (Path.expanduser)."""
    for option in PATH_OPTIONS:
        *sections, name = option.split(".")
        table = functools.reduce(lambda t, s: t[s], sections, cfg)
        value = table[name]
        table[name] = [home_path(option, v) for v in value] if isinstance(value, list) else home_path(option, value)
    return cfg


def home_path(option: str, value: str) -> str:
    """`value` with a leading `~` or `~user` as that home folder; ConfigError when there is none
    (`~nobdy/ws`, HOME unset): Path.expanduser's RuntimeError was a traceback and exit 1. A path
    of blanks alone is a mistake too: `export.out = " "` made a folder named " " in the current one."""
    if value and not value.strip():
        raise ConfigError(f"{option} {value!r} is blank: give a path, or \"\" for its default")
    if not value.startswith("~"):
        return value
    try:
        return str(Path(value).expanduser())
    except RuntimeError:
        home = value.split("/", 1)[0]
        raise ConfigError(f"{option} {value!r}: {home} is no home folder here (no such user, or HOME is not set)"
                          ) from None


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the file at `path`, then `section.option[.sub]=value` overrides, checked."""
    cfg = _read(DEFAULTS)
    if path:
        file = Path(home_path("--config", path))  # `--config=~/run.toml`: the shell leaves that `~`
        # not only a regular file: `--config <(...)` (a pipe, /dev/fd/63) was "config file not found"
        if not file.exists() or file.is_dir():
            raise ConfigError(f"config file not found: {path}" + (" (a folder)" if file.is_dir() else ""))
        merge(cfg, _read(file))
    for item in overrides or []:
        names, value = _parse_override(item)
        update: Any = value
        for name in reversed(names):
            update = {name: update}
        merge(cfg, update)
    return expand_home(validate(cfg))


@functools.cache
def default_config() -> Config:
    """The defaults alone, checked: what jobs compare a run's options with (read it, never change it)."""
    return load_config(None, [])


def merge(cfg: dict, update: dict, where: str = "") -> None:
    """Merge `update` into `cfg` at any depth, refusing sections and options that do not exist."""
    for name, value in update.items():
        path = f"{where}.{name}" if where else name
        if not isinstance(name, str):  # YAML reads `on:` as true and `1:` as 1
            raise ConfigError(f"{_shown(name)} in {f'[{where}]' if where else 'the config'} is no option name: "
                              "quote it")
        if name not in cfg:
            raise ConfigError((f"unknown config section [{path}]" if not where else f"unknown option {path}")
                              + _near_miss(name, cfg, where))
        if isinstance(cfg[name], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{path} must be a table, not {_shown(value)}")
            merge(cfg[name], value, path)
        else:
            cfg[name] = copy.deepcopy(value)


def _near_miss(name: str, table: dict, where: str) -> str:
    """' (did you mean X?)' for a misspelt option or section (the closest name of its table), or
    an option put in another section than its own (caption.max_error_rate: ray.max_error_rate)."""
    close = difflib.get_close_matches(name, [str(n) for n in table], n=1, cutoff=0.75)
    if close:
        return f" (did you mean {where + '.' if where else ''}{close[0]}?)"
    elsewhere = [path for path in _option_paths(_read(DEFAULTS), "") if path.rsplit(".", 1)[-1] == name]
    if len(elsewhere) > 3:  # batch_size: six of [annotate]'s tables
        elsewhere = elsewhere[:2] + [f"{len(elsewhere) - 2} more"]
    return f" (did you mean {' or '.join(elsewhere)}?)" if elsewhere else ""


def _option_paths(table: dict, where: str) -> list[str]:
    paths = []
    for name, value in table.items():
        path = f"{where}.{name}" if where else name
        paths += _option_paths(value, path) if isinstance(value, dict) else [path]
    return paths


def validate(cfg: Config) -> Config:
    """The config with every value checked against the type of its default (ConfigError if not)."""
    try:
        return config_model().model_validate(cfg).model_dump()
    except ValidationError as exc:
        raise ConfigError(_describe(exc.errors()[0])) from None


@functools.cache
def config_model() -> type[BaseModel]:
    """The pydantic model of the whole config, generated from defaults.toml."""
    return _model("config", _read(DEFAULTS))


def _model(name: str, table: dict) -> type[BaseModel]:
    fields = {option: (_field_type(f"{name}.{option}", default), default) for option, default in table.items()}
    return create_model(name, __config__=ConfigDict(extra="forbid", strict=True), **fields)


def _field_type(name: str, default: Any) -> Any:
    if isinstance(default, dict):
        return _model(name, default)
    option = name.removeprefix("config.")
    if isinstance(default, list):
        return list[_element_type(option, default)]
    return _scalar_type(default, option)


def _element_type(option: str, items: list) -> Any:
    if items and all(isinstance(i, list) for i in items):
        # e.g. quality_bands = [[0.9, "tag"], ...]: rows of the first row's types, place by place
        # ([["y", 0.2]] or [[0.5]] failed in a caption worker, after Ray had started)
        row = tuple[tuple(_scalar_type(v) for v in items[0])]
        return Annotated[row, BeforeValidator(_row_as_tuple), PlainSerializer(list)]
    # one type per kind of default (a union of equal types made pydantic name each in its messages)
    kinds = [_scalar_type(i, option) for i in {type(i): i for i in items}.values()] or [StrictStr]
    return functools.reduce(lambda a, b: a | b, kinds)


def _row_as_tuple(value: Any) -> Any:
    """A row of a list-of-rows option as the tuple its strict type checks (a list is no tuple)."""
    return tuple(value) if isinstance(value, list) else value


def _scalar_type(default: Any, option: str = "") -> Any:
    if isinstance(default, bool):
        return StrictBool
    if isinstance(default, int):
        return Annotated[StrictInt, Field(**domain(option))]
    if isinstance(default, float):
        # strict float still takes an int; inf and nan are no option's value (max_error_rate = inf
        # let every job pass whatever it dropped)
        return Annotated[float, Field(allow_inf_nan=False, **domain(option))]
    if option in WORDS:
        return Literal[WORDS[option]]
    if _matches(option, NAMES):
        return Annotated[StrictStr, Field(pattern=r"\S")]
    return StrictStr


# Numbers whose domain is narrower than the ">= 0" of every number: pydantic bounds by option (a
# `*` is any one table: each model of [annotate]; the first pattern that matches wins). Out of
# them, a value went through to a worker that stumbled on it after hours of the jobs before, or to
# none, and the rows were wrong: a probability of 1.5, a batch of 0 images, a quality of 500.
SHARE = {"ge": 0, "le": 1}  # a share, probability, score or similarity
AT_LEAST_1 = {"ge": 1}
DOMAINS: dict[str, dict[str, float]] = {
    "ray.max_error_rate": SHARE,
    "ingest.max_*": AT_LEAST_1, "ingest.folder_unit_size": AT_LEAST_1, "ingest.shards_per_task": AT_LEAST_1,
    "ingest.batch_samples": AT_LEAST_1,
    "ingest.frames.scene_threshold": {"ge": 0, "le": 255}, "ingest.frames.similarity_distance": {"ge": 0, "le": 64},
    "ingest.frames.max_frames_per_slice": AT_LEAST_1, "ingest.frames.max_frames_per_clip": AT_LEAST_1,
    "ingest.frames.max_decoded_frames": AT_LEAST_1, "ingest.frames.min_side": AT_LEAST_1,
    "ingest.frames.max_side": AT_LEAST_1, "ingest.frames.quality": {"ge": 1, "le": 100},
    "annotate.decode_batch_size": AT_LEAST_1, "annotate.write_batch_size": AT_LEAST_1,
    "annotate.*.batch_size": AT_LEAST_1, "annotate.*.cpu_batch_size": AT_LEAST_1, "annotate.*.concurrency": AT_LEAST_1,
    "annotate.*.conf_threshold": SHARE, "annotate.*.iou_threshold": SHARE,
    "annotate.cascade_face.scale_factor": {"gt": 1},  # OpenCV's detectMultiScale asserts it
    "annotate.cascade_face.min_size": AT_LEAST_1, "annotate.cascade_face.max_side": AT_LEAST_1,
    "annotate.ccip.size": AT_LEAST_1,
    "annotate.tagger.score_floor": SHARE, "annotate.tagger.region_overlap": {"ge": 0, "le": 0.5},
    "curate.ccip_threshold": {"ge": 0, "le": 2}, "curate.*_threshold": SHARE,  # ccip's is a 1 - cosine
    "curate.trait_share": SHARE, "curate.trait_min_images": AT_LEAST_1, "curate.max_face_aspect": AT_LEAST_1,
    "curate.phash_distance": {"ge": 0, "le": 63}, "curate.embedding_similarity": SHARE,
    "curate.lsh_tables": AT_LEAST_1, "curate.lsh_bits": AT_LEAST_1, "curate.lsh_window": AT_LEAST_1,
    "curate.max_block": AT_LEAST_1, "curate.max_characters": AT_LEAST_1,
    # multiply is relative to the smallest weight times min_multiply, rounded to 2 decimals: 0 made
    # every image's 0, and below 0.005 the smallest group's multiply rounded to 0 (EveryDream never trains it)
    "curate.min_multiply": {"ge": 0.01}, "curate.max_multiply": {"ge": 0.01},
    "caption.unit_size": AT_LEAST_1, "caption.concurrency": AT_LEAST_1, "caption.max_attempts": AT_LEAST_1,
    "caption.target": SHARE, "caption.drop_per_attempt": SHARE, "caption.max_caption_chars": AT_LEAST_1,
    # a step of 0 failed each caption unit after its requests were paid for
    "caption.review_floor": SHARE, "caption.accuracy_step": {"ge": 1, "le": 50},
    "caption.embedding_batch_size": AT_LEAST_1, "caption.embedding_cpu_batch_size": AT_LEAST_1,
    "caption.asp_probabilities.*": SHARE,
    "caption.max_concurrency": AT_LEAST_1, "caption.timeout_s": {"gt": 0}, "caption.max_tokens": AT_LEAST_1,
    "caption.temperature": {"ge": 0, "le": 2}, "caption.image_max_side": AT_LEAST_1,
    "caption.vllm_concurrency": AT_LEAST_1, "caption.vllm_batch_size": AT_LEAST_1, "caption.vllm_num_gpus": AT_LEAST_1,
    "caption.vllm_max_model_len": AT_LEAST_1, "caption.vllm_gpu_memory_utilization": {"gt": 0, "le": 1},
    "caption.rewrite_max_tokens": AT_LEAST_1, "caption.rewrite_tolerance": SHARE,
    "caption.text_tags_top_k": AT_LEAST_1, "caption.text_tags_min_similarity": SHARE,
    "caption.related_min_support": AT_LEAST_1, "caption.related_top_k": AT_LEAST_1,
    "export.jpeg_quality": {"ge": 1, "le": 100}, "export.png_compress_level": {"ge": 0, "le": 9},
    "export.max_count": AT_LEAST_1, "export.max_bytes": AT_LEAST_1,
    # top_n: bars of a plot (each 0.28 in high; 3,000 took 25 s to draw and make a picture no one
    # reads; past DuckDB's BIGINT a ConversionException). examples: the driver holds their image
    # bytes at once. thumb_size: a thumbnail of fewer pixels shows nothing, of more is none.
    "report.top_n": {"ge": 1, "le": 1000}, "report.examples": {"ge": 0, "le": 1000},
    "report.thumb_size": {"ge": 16, "le": 4096},
}
# Strings that name something and cannot be "" or blank (face_label = "" counted no face anywhere).
NAMES = ("workspace.*", "annotate.*.repo", "annotate.*.file", "annotate.cascade_face.model", "annotate.tagger.labels_*",
         "curate.face_label", "curate.person_label", "curate.group_format", "curate.cluster_method",
         "curate.memory_limit", "caption.backend", "caption.model", "caption.vllm_model", "caption.rewrite_model",
         "caption.base_url", "caption.rewrite_base_url", "caption.prompt", "caption.region_prompt", "export.text",
         "export.tag_sort", "ingest.frames.format")
# Words no job checks before it runs (annotate.device = "gpu" ran on the CPU without a word).
WORDS = {"annotate.device": ("auto", "cuda", "cpu"), "caption.template_style": ("english", "asp"),
         "caption.vllm_environment": ("isolated", "node")}


def domain(option: str) -> dict[str, float]:
    """The pydantic bounds of a number option: DOMAINS' first match, else >= 0."""
    return next((bounds for pattern, bounds in DOMAINS.items() if fnmatch.fnmatchcase(option, pattern)), {"ge": 0})


def _matches(option: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(option, p) for p in patterns)


def _domain_text(bounds: dict[str, float]) -> str:
    low = f">= {bounds['ge']}" if "ge" in bounds else f"> {bounds['gt']}" if "gt" in bounds else ""
    if "le" not in bounds:
        return low
    return f"from {bounds['ge']} to {bounds['le']}" if "ge" in bounds else f"{low} and <= {bounds['le']}"


def _expected(option: str, default: Any) -> str:
    """What a scalar option (or one element of a list option) must be, in words."""
    if isinstance(default, bool):
        return "true or false"
    if isinstance(default, int | float):
        return ("a whole number " if isinstance(default, int) else "a number ") + _domain_text(domain(option))
    if option in WORDS:
        return "one of " + ", ".join(map(repr, WORDS[option]))
    if isinstance(default, str):
        return "a name, not empty" if _matches(option, NAMES) else "a string"
    return ""


TYPE_NAMES = {"bool": "true or false", "int": "a whole number >= 0", "float": "a number >= 0",
              "str": "a string", "list": "a list", "dict": "a table"}
# What a pydantic error of these types means is in the expected words: no need for its own text.
SAID_BY_EXPECTED = ("greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number",
                    "string_pattern_mismatch", "literal_error")


ELEMENT_TYPES = {"string_type": "a string", "int_type": "a whole number", "bool_type": "true or false",
                 "float_type": "a number"}


def _describe(error: dict) -> str:
    """One line: the option, the value given, and what it must be."""
    names = [str(n) for n in error["loc"] if not isinstance(n, int)]
    option = ".".join(names) + "".join(f"[{n}]" for n in error["loc"] if isinstance(n, int))
    value = error.get("input")
    value = list(value) if isinstance(value, tuple) else value  # a row of a list-of-rows option, as given
    if option != ".".join(names) and error["type"] in ELEMENT_TYPES:  # one element of a list
        return f"{option} = {_shown(value)} ({type(value).__name__}): expected {ELEMENT_TYPES[error['type']]}"
    default: Any = _read(DEFAULTS)
    for n in names:
        default = default.get(n) if isinstance(default, dict) else None
    if option != ".".join(names) and isinstance(default, list) and default and error["type"] in SAID_BY_EXPECTED:
        default = default[0]  # an element of a list out of its domain: fh_ratio_bins[1] = nan
    expected = _expected(".".join(names), default) or TYPE_NAMES.get(type(default).__name__, "")
    if isinstance(default, list) and default:
        inner = default[0]
        expected = f"a list of {TYPE_NAMES.get(type(inner).__name__, 'values').removeprefix('a ')}s"
        if isinstance(inner, list):  # rows: [[0.9, "tag"], ...]
            places = ", ".join(TYPE_NAMES[type(v).__name__].removeprefix("a ").split(" >=")[0] for v in inner)
            expected = f"a list of [{places}] rows"
    got = f"{_shown(value)} ({type(value).__name__})" if error["type"] != "missing" else "nothing"
    if error["type"] == "extra_forbidden":
        return f"unknown option {option}"
    return f"{option} = {got}: expected {expected or error['msg']}" + (
        "" if error["type"].endswith("_type") or error["type"] in SAID_BY_EXPECTED else f" ({error['msg']})")


def _shown(value: Any, limit: int = 120) -> str:
    """A value in a one-line message: its repr, cut (a 5,000-character value made a 5,000-character line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def _read(path: Path) -> Config:
    """A TOML file, or a YAML one (.yaml, .yml) with the same tables: the YAML file was read as TOML
    ("Expected '=' after a key")."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark (Notepad's UTF-8) is no TOML
        if path.suffix.lower() not in (".yaml", ".yml"):
            return tomllib.loads(text)
        table = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader
    except RecursionError:
        raise ConfigError(f"{path}: a value is nested too deeply") from None
    except (ValueError, UnicodeDecodeError, yaml.YAMLError) as exc:  # TOMLDecodeError, a 5,000-digit integer
        raise ConfigError(f"{path}: {' '.join(str(exc).split())}") from None
    except OSError as exc:  # a file this user may not read: a traceback and exit 1
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    if table is None:  # an empty file, or only comments
        return {}
    if not isinstance(table, dict):
        raise ConfigError(f"{path}: expected tables of options (section: option: value), not {_shown(table)}")
    return table


class UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping as TOML does: PyYAML kept
    the last, so a second `annotate:` block dropped every option of the first without a word."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`, then options that override it
                continue
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                continue  # unhashable: the constructor below says so
            if key in first_line:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key!r} is given twice (first on line {first_line[key] + 1})", key_node.start_mark)
            first_line[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _parse_override(item: str) -> tuple[list[str], Any]:
    name, sep, raw = item.partition("=")
    names = [n.strip() for n in name.split(".")]
    if not sep or len(names) < 2 or not all(names):
        raise ConfigError(f"--set wants section.option=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except RecursionError:  # thousands of nested brackets: no option's value
        raise ConfigError(f"--set {name}: the value is nested too deeply") from None
    except ValueError:  # not TOML (TOMLDecodeError), or an integer of thousands of digits
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            value = raw  # a bare word: a string
    return names, value
