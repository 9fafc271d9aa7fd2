"""Configuration: defaults.toml, overridden by a run's TOML file, overridden by --set flags."""

from __future__ import annotations

import ast
import copy
import tomllib
from pathlib import Path
from typing import Any

DEFAULTS = Path(__file__).with_name("defaults.toml")
REPO = Path(__file__).resolve().parent.parent
SAMPLE_SHARDS = REPO / "sample" / "shards"

Config = dict[str, dict[str, Any]]


class ConfigError(ValueError):
    """Bad configuration: the job stops with a clear message and a non-zero exit."""


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the file at `path`, then `section.option=value` overrides."""
    cfg = _read(DEFAULTS)
    if path:
        if not Path(path).is_file():
            raise ConfigError(f"config file not found: {path}")
        merge(cfg, _read(Path(path)))
    for item in overrides or []:
        section, option, value = _parse_override(item)
        merge(cfg, {section: {option: value}})
    return cfg


def merge(cfg: Config, update: Config) -> None:
    """Merge `update` into `cfg`, refusing sections and options that do not exist."""
    for section, options in update.items():
        if section not in cfg:
            raise ConfigError(f"unknown config section [{section}]")
        if not isinstance(options, dict):
            raise ConfigError(f"[{section}] must be a table")
        for option, value in options.items():
            known = cfg[section]
            if option not in known and not section_is_open(section):
                raise ConfigError(f"unknown option {section}.{option}")
            if isinstance(known.get(option), dict) and isinstance(value, dict):
                known[option] = {**known[option], **copy.deepcopy(value)}
            else:
                known[option] = copy.deepcopy(value)


def section_is_open(section: str) -> bool:
    """Sections whose options are not all known in advance (none yet)."""
    return False


def _read(path: Path) -> Config:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def _parse_override(item: str) -> tuple[str, str, Any]:
    name, sep, raw = item.partition("=")
    section, dot, option = name.strip().partition(".")
    if not sep or not dot:
        raise ConfigError(f"--set wants section.option=value, got {item!r}")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw  # a bare word: a string
    return section, option, value
