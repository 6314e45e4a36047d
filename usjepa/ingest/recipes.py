"""Ingest recipes: one YAML file per public dataset (`shards/*.yaml`) that says how to turn it
into shards, so `usjepa shards build --recipe shards/busi.yaml OUT` needs no other flags.

    name: busi                          # optional; defaults to the file name
    description: ...                    # optional, free text
    format: imagefolder                 # a registered source format
    source: ${BUSI}/Dataset_BUSI_with_GT
    options: {group_pattern: null}      # keyword options of that source
    build: {image_size: 224, fps: 3}    # BuildSettings fields, plus fps / max_frames

`${NAME}` anywhere in a string value is replaced by `variables[NAME]` (the CLI's
`--set NAME=value`), else the environment variable NAME, else the default of
`${NAME:-default}` (no nesting); `$${` writes a literal `${`. A
value that is a placeholder alone is read as YAML after expansion, so `${SIZE}` can give an
integer. A relative source path is relative to the working directory.

Validation is strict: unknown keys (top level, options of the source, build settings)
raise a UserError naming the closest valid key; a placeholder with no value raises a
UserError saying which environment variable to set.

`build` takes the BuildSettings fields (nested ones such as `region` and `overlay` as
mappings) except `format` (top level), `overwrite` (a CLI flag) and `source_options` (the
recipe's `options`). It also takes the video sampling keys `fps` and `max_frames`
(VIDEO_BUILD_KEYS): they are source options, moved there for sources that take them (video,
csv, filenames) and otherwise ignored with a warning. The returned BuildSettings carries
the options in `source_options` as well, so `build_shards(src, out, settings)` is enough.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import yaml

from usjepa.errors import UserError
from usjepa.ingest.formats import SOURCES  # importing formats registers every source format
from usjepa.ingest.writer import BuildSettings

TOP_KEYS = ("name", "description", "format", "source", "options", "build")
REQUIRED_KEYS = ("format", "source")
# Video sampling settings written under build: source options of the readers that take them.
VIDEO_BUILD_KEYS = ("fps", "max_frames")
_NOT_IN_BUILD = {"format": "at the top level of the recipe", "overwrite": "on the command line (--overwrite)",
                 "source_options": "under the recipe's options"}

_PLACEHOLDER = re.compile(r"\$(\$)?\{([^}]*)\}")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _suggest(key: str, valid, what: str) -> str:
    valid = sorted(valid)
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"valid keys: {', '.join(valid)}"
    return f"unknown {what} key '{key}'; {hint}"


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
            raise UserError(f"recipe {self.recipe}: placeholder '${{{match.group(2)}}}' in {where} is not a variable "
                            "name (letters, digits, _); fix the recipe")
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


def _check_type(value, default, where: str, recipe: Path):
    """A build value of the type of the BuildSettings default (None defaults take anything:
    BuildSettings.validate checks those)."""
    if default is None:
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, str):
        ok = isinstance(value, str) or (value is None and where.endswith("_pattern"))
    elif isinstance(default, dict):
        ok = isinstance(value, dict)
    else:
        ok = True
    if not ok:
        raise UserError(f"recipe {recipe}: {where} is {value!r} ({type(value).__name__}); expected a "
                        f"{type(default).__name__} like {default!r}")
    return value


def _source_parameters(cls) -> tuple[set[str], bool]:
    """(keyword options the source's constructor takes, besides root; whether it takes **kwargs)."""
    params = list(inspect.signature(cls).parameters.values())[1:]  # skip root
    return ({p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)},
            any(p.kind is p.VAR_KEYWORD for p in params))


def read_recipe(path, variables: Mapping[str, str] | None = None, environ: Mapping[str, str] | None = None) -> dict:
    """The validated recipe as a dict: name, description, format, source (Path), options,
    settings (BuildSettings), pending (pending build keys not applied), variables (used)."""
    path = Path(path)
    variables = dict(variables or {})
    environ = os.environ if environ is None else environ
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
            raise UserError(f"recipe {path}: " + _suggest(key, TOP_KEYS, "recipe"))
    for key in REQUIRED_KEYS:
        if raw.get(key) in (None, ""):
            raise UserError(f"recipe {path} has no '{key}'; add it (e.g. format: csv, source: ${{DATA}}/my_set)")
    for key in ("options", "build"):
        if raw.get(key) is not None and not isinstance(raw[key], dict):
            raise UserError(f"recipe {path}: '{key}' must be a mapping of key: value, not {raw[key]!r}")

    expand = _Expander(path, variables, environ)
    fmt = raw["format"]
    if fmt not in SOURCES:
        close = difflib.get_close_matches(str(fmt), sorted(SOURCES), n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"known formats: {', '.join(sorted(SOURCES))}"
        raise UserError(f"recipe {path}: unknown format '{fmt}'; {hint}")
    source = expand(raw["source"], "source")
    if not isinstance(source, str):
        raise UserError(f"recipe {path}: source must be a path, not {source!r}")
    options = expand(dict(raw.get("options") or {}), "options")
    build = expand(dict(raw.get("build") or {}), "build")

    accepted, takes_kwargs = _source_parameters(SOURCES[fmt])
    for key in options:
        if key not in accepted and not takes_kwargs:
            raise UserError(f"recipe {path}: " + _suggest(key, accepted, f"options (format {fmt})"))

    fields = {f.name for f in dataclasses.fields(BuildSettings)}
    build_keys = (fields - set(_NOT_IN_BUILD)) | set(VIDEO_BUILD_KEYS)
    defaults = BuildSettings()
    values: dict = {"format": fmt}
    pending: dict = {}
    for key, value in build.items():
        if key in _NOT_IN_BUILD:
            raise UserError(f"recipe {path}: build.{key} does not belong in build; set it {_NOT_IN_BUILD[key]}")
        if key not in build_keys:
            raise UserError(f"recipe {path}: " + _suggest(key, build_keys, "build"))
        if key in fields:
            values[key] = _typed(value, getattr(defaults, key), f"build.{key}", path)
        elif key in options:
            raise UserError(f"recipe {path}: {key} is set both under build and under options; set it once")
        elif key in accepted or takes_kwargs:
            options[key] = value  # video sampling: an option of the readers that decode videos
        elif value is not None:
            pending[key] = value
    if "source_options" in fields:
        values["source_options"] = dict(options)
    else:  # an older writer: it passes only these two from BuildSettings to the source
        for key in ("group_pattern", "exclude_pattern"):
            if key in options and key in fields and key not in values:
                values[key] = options[key]
    try:
        settings = BuildSettings(**values)
    except TypeError as exc:
        raise UserError(f"recipe {path}: invalid build settings ({exc})") from None
    settings.validate()
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


def _typed(value, default, where: str, path: Path):
    """`value` checked against the type of `default`; a mapping for a nested settings
    dataclass (region, overlay) becomes that dataclass, its keys validated too."""
    if dataclasses.is_dataclass(default) and not isinstance(default, type):
        cls = type(default)
        if isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise UserError(f"recipe {path}: {where} must be a mapping of {cls.__name__} settings, not {value!r}")
        names = [f.name for f in dataclasses.fields(cls) if f.init]
        for key in value:
            if key not in names:
                raise UserError(f"recipe {path}: " + _suggest(key, names, where))
        return cls(**{k: _typed(v, getattr(default, k), f"{where}.{k}", path) for k, v in value.items()})
    return _check_type(value, default, where, path)


def load_recipe(path, variables: Mapping[str, str] | None = None,
                environ: Mapping[str, str] | None = None) -> tuple[Path, BuildSettings, dict]:
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


__all__ = ["VIDEO_BUILD_KEYS", "load_recipe", "parse_assignments", "read_recipe"]
