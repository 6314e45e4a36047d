"""`--format auto`: which registered format recognises a source folder."""

from __future__ import annotations

from pathlib import Path

from usjepa.errors import UserError
from usjepa.ingest.sources.base import SOURCES

AUTO = "auto"
FALLBACK = "imagefolder"  # asked last: a folder of class subfolders is the most generic layout


def format_choices() -> list[str]:
    """What `--format` accepts: 'auto' plus every registered format."""
    return [AUTO, *sorted(SOURCES)]


def _looks_for(name: str) -> str:
    cls = SOURCES[name]
    text = cls.looks_for or ((cls.__doc__ or "").strip().splitlines() or ["(no description)"])[0]
    return f"{name}: {text}"


def _looks(name: str, root: Path) -> bool:
    try:
        return bool(SOURCES[name].looks_like(root))
    except OSError:  # unreadable folder: not this format
        return False


def _describe(root: Path) -> str:
    try:
        entries = list(root.iterdir())
    except OSError as exc:
        return f"unreadable: {exc.strerror or exc}"
    folders = sum(1 for p in entries if p.is_dir())
    files = len(entries) - folders
    if not entries:
        return "it is empty"
    examples = ", ".join(sorted(repr(p.name) for p in entries)[:3])
    return f"it holds {folders} folder(s) and {files} file(s) at the top, e.g. {examples}"


def detect_format(root) -> str:
    """The registered format that recognises `root`: every format's `looks_like` is asked
    (in registration order), the generic image folder last as a fallback. UserError when
    none (or more than one specific format) matches, listing what each format looks for."""
    root = Path(root).expanduser().absolute()
    tried = "; ".join(_looks_for(n) for n in [*(n for n in SOURCES if n != FALLBACK), FALLBACK] if n in SOURCES)
    if not root.exists():
        raise UserError(f"source {root} does not exist; check the path (formats: {tried})")
    specific = [name for name in SOURCES if name != FALLBACK and _looks(name, root)]
    if len(specific) == 1:
        return specific[0]
    if len(specific) > 1:
        raise UserError(
            f"{root} looks like several source formats ({', '.join(specific)}); choose one with --format NAME"
        )
    if FALLBACK in SOURCES and _looks(FALLBACK, root):
        return FALLBACK
    raise UserError(
        f"could not recognise the format of source {root} ({_describe(root)}); formats tried: {tried}; "
        "arrange the data like one of these or pass --format NAME"
    )
