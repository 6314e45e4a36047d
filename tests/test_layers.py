"""The package's layers point one way: a module imports only from layers below its own (or its
own package), so the data format, models and data pipeline never depend on training, probing,
export or the commands built on them."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "usjepa"
# Lowest first. `__init__` is the package itself (its __version__).
LAYERS = [
    {"__init__", "errors", "signals"},
    {"fileio"},
    {"config"},
    {"shardset", "rundir"},
    {"data", "ingest"},
    {"models"},
    {"train"},
    {"eval", "export"},
    {"bench", "study", "demo", "cli"},
    {"__main__"},
]
LAYER = {name: i for i, names in enumerate(LAYERS) for name in names}


def _imported(tree: ast.AST, module: list[str]) -> set[str]:
    """The top-level usjepa parts a module imports, also inside functions. `module` is the
    importing module's dotted path as a list (['usjepa', 'data', 'masks']), so that relative
    imports resolve to the part they reach."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = module[: len(module) - node.level] if node.level else []
            parts = base + (node.module.split(".") if node.module else [])
            if parts[0] == "usjepa":
                found |= {parts[1]} if len(parts) > 1 else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("usjepa.")}
    return found


def test_every_part_of_the_package_has_a_layer():
    parts = {
        p.stem if p.is_file() else p.name
        for p in PACKAGE.iterdir()
        if (p.suffix == ".py" or (p / "__init__.py").is_file())
    }
    assert parts == set(LAYER), "add new modules or packages to LAYERS"


def test_no_module_imports_from_its_own_layer_or_above():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        module = list(relative.parts)
        part = module[1]
        for other in _imported(ast.parse(path.read_text()), module) - {part}:
            if other in LAYER and LAYER[other] >= LAYER[part]:
                upward.append(f"{path.relative_to(PACKAGE.parent)} imports usjepa.{other}")
    assert not upward, "\n".join(upward)


def test_relative_imports_resolve_to_the_part_they_reach():
    masks = ["usjepa", "data", "masks"]
    assert _imported(ast.parse("from ..train import loop"), masks) == {"train"}
    assert _imported(ast.parse("from . import augment"), masks) == {"data"}
    assert _imported(ast.parse("from .. import config"), masks) == {"config"}
    assert _imported(ast.parse("from usjepa.models.vit import Encoder"), masks) == {"models"}
