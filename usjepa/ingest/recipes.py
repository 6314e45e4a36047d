"""Ingest recipes: one YAML file per public dataset (`shards/*.yaml`) saying how to turn it into
shards, so `usjepa shards build --recipe shards/busi.yaml OUT` needs no other flags. Keys are
checked strictly; `${NAME}` placeholders come from --set, the environment or a default
(shards/README.md)."""

from __future__ import annotations

import difflib
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import yaml

from usjepa.config import ConfigError, from_dict
from usjepa.errors import UserError
from usjepa.ingest.settings import BuildSettings
from usjepa.ingest.sources import SOURCES
from usjepa.ingest.sources.base import option_names, read_options

TOP_KEYS = ("name", "description", "format", "source", "options", "build")
REQUIRED_KEYS = ("format", "source")
# Video sampling settings written under build: source options of the readers that take them.
VIDEO_BUILD_KEYS = ("fps", "max_frames")
_NOT_IN_BUILD = {
    "format": "at the top level of the recipe",
    "overwrite": "on the command line (--overwrite)",
    "source_options": "under the recipe's options",
}

_PLACEHOLDER = re.compile(r"\$(\$)?\{([^}]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _hint(value, valid, listing: str) -> str:
    """'did you mean ...?' naming the closest of `valid`, else the `listing` of them all."""
    valid = sorted(valid)
    close = difflib.get_close_matches(str(value), valid, n=1)
    return f"did you mean '{close[0]}'?" if close else f"{listing}: {', '.join(valid)}"


class _Expander:
    def __init__(self, recipe: Path, variables: Mapping[str, str], environ: Mapping[str, str]):
        self.recipe, self.variables, self.environ = recipe, variables, environ
        self.used: dict[str, str] = {}

    def __call__(self, value, where: str):
        if isinstance(value, dict):
            return {k: self(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self(v, f"{where}[{i}]") for i, v in enumerate(value)]
        if not isinstance(value, str) or "${" not in value:
            return value
        whole = _PLACEHOLDER.fullmatch(value.strip())
        alone = whole is not None and whole.group(1) is None
        text = _PLACEHOLDER.sub(lambda m: self._value(m, value, where), value)
        if alone and text.strip():  # a number, true/false or null when it reads as one; else the text
            try:
                typed = yaml.safe_load(text)
            except yaml.YAMLError:
                return text
            return typed if typed is None or isinstance(typed, (bool, int, float)) else text
        return text

    def _value(self, match: re.Match, text: str, where: str) -> str:
        if match.group(1):  # $${...}: literal
            return "${" + match.group(2) + "}"
        name, has_default, default = match.group(2).partition(":-")
        name = name.strip()
        if not _NAME.match(name):
            raise UserError(
                f"recipe {self.recipe}: placeholder '${{{match.group(2)}}}' in {where} is not a variable "
                "name (letters, digits, _); fix the recipe"
            )
        if name in self.variables:
            value = str(self.variables[name])
        elif name in self.environ:
            value = self.environ[name]
        elif has_default:
            value = default
        else:
            raise UserError(
                f"recipe {self.recipe} needs {name} (used in {where}: {text}); set the environment variable "
                f"{name}=/path/to/... or pass --set {name}=..."
            )
        self.used[name] = value
        return value


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist; see shards/README.md for the recipes that ship with usjepa")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {path} is not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path} must be a mapping with keys {', '.join(TOP_KEYS)}")
    for key in raw:
        if key not in TOP_KEYS:
            raise UserError(f"recipe {path}: unknown recipe key '{key}'; {_hint(key, TOP_KEYS, 'valid keys')}")
    for key in REQUIRED_KEYS:
        if raw.get(key) in (None, ""):
            raise UserError(f"recipe {path} has no '{key}'; add it (e.g. format: csv, source: ${{DATA}}/my_set)")
    for key in ("options", "build"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise UserError(f"recipe {path}: '{key}' must be a mapping of key: value, not {raw[key]!r}")
    fmt = raw["format"]
    if fmt not in SOURCES:
        raise UserError(f"recipe {path}: unknown format '{fmt}'; {_hint(fmt, SOURCES, 'known formats')}")
    return raw


def _settings(path: Path, fmt: str, build: dict, options: dict) -> tuple[BuildSettings, dict]:
    """(BuildSettings, build keys that do not apply) of a recipe's `build`; video sampling keys
    move into `options` for the formats that take them."""
    accepted = option_names(SOURCES[fmt])
    values: dict = {}
    pending: dict = {}
    for key, value in build.items():
        if key in _NOT_IN_BUILD:
            raise UserError(f"recipe {path}: build.{key} does not belong in build; set it {_NOT_IN_BUILD[key]}")
        if key not in VIDEO_BUILD_KEYS:
            values[key] = value
        elif key in options:
            raise UserError(f"recipe {path}: {key} is set both under build and under options; set it once")
        elif key in accepted:
            options[key] = value  # video sampling: an option of the readers that decode videos
        elif value is not None:
            pending[key] = value
    try:
        read_options(SOURCES[fmt], options)
        settings = from_dict(BuildSettings, {**values, "format": fmt, "source_options": dict(options)}, where="build")
    except ConfigError as exc:
        raise ConfigError(f"recipe {path}: {exc}") from None
    settings.validate()
    return settings, pending


def read_recipe(path, variables: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None) -> dict:
    """The validated recipe as a dict: name, description, format, source (Path), options,
    settings (BuildSettings), pending (build keys that do not apply), variables (used)."""
    path = Path(path)
    raw = _read_yaml(path)
    expand = _Expander(path, dict(variables or {}), os.environ if environ is None else environ)
    fmt = raw["format"]
    source = expand(raw["source"], "source")
    if not isinstance(source, str):
        raise UserError(f"recipe {path}: source must be a path, not {source!r}")
    options = expand(dict(raw.get("options") or {}), "options")
    settings, pending = _settings(path, fmt, expand(dict(raw.get("build") or {}), "build"), options)
    if pending:
        warnings.warn(
            f"recipe {path}: build settings {', '.join(f'{k}={v!r}' for k, v in pending.items())} do not apply to "
            f"format {fmt} (its reader does not decode videos) and are ignored",
            stacklevel=3,
        )
    return {
        "name": raw.get("name") or path.stem,
        "description": raw.get("description") or "",
        "format": fmt,
        "source": Path(source).expanduser(),
        "options": options,
        "settings": settings,
        "pending": pending,
        "variables": dict(expand.used),
    }


def load_recipe(
    path, variables: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None
) -> tuple[Path, BuildSettings, dict]:
    """(source path, BuildSettings, source options) of the recipe at `path`; placeholders
    come from `variables` (the CLI's --set), then `environ` (default os.environ)."""
    recipe = read_recipe(path, variables, environ)
    return recipe["source"], recipe["settings"], recipe["options"]


def parse_assignments(pairs) -> dict[str, str]:
    """`["KEY=value", ...]` (the CLI's --set) -> {KEY: value}."""
    out = {}
    for pair in pairs or ():
        key, sep, value = str(pair).partition("=")
        if not sep or not _NAME.match(key.strip()):
            raise UserError(f"--set {pair!r} must look like NAME=value, e.g. --set ULTRABENCH=/data/ultrabench")
        out[key.strip()] = value
    return out
