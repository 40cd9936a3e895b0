"""The package's imports run one way (docs/contributing.md, "Layers"): every import of a
``noether_dyn`` module, at module level or inside a function, goes to a layer the importing
layer may use. Read from the source with ``ast``: nothing is imported to check it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "noether_dyn"

_PIPELINE = {"records", "symmetries", "quantities", "optimizers", "store", "capture", "report"}
ALLOWED: dict[str, set[str]] = {
    "records": set(),
    "symmetries": {"records"},
    "depth": {"records"},
    "quantities": {"records", "symmetries"},
    "optimizers": {"records", "quantities"},
    "store": {"records", "symmetries"},
    "sinks": {"records"},
    "capture": {"records", "symmetries", "quantities", "optimizers", "store", "sinks"},
    "report": {"records", "symmetries", "quantities", "optimizers", "store", "depth"},
    "export": {"records", "store", "sinks"},
    "serve": {"records", "store", "report"},
    "integrations": {"records", "capture"},
    "demo": _PIPELINE,
    "cli": _PIPELINE | {"depth", "demo", "export", "serve"},
    "top": _PIPELINE | {"depth"},
}
"""Layer -> the layers it may import (its own always). capture -> quantities -> store ->
presentation is the data flow; presentation (report) never imports capture."""


def layer_of(module: str) -> str:
    """The layer of a dotted module name inside the package."""
    parts = module.split(".")
    assert parts[0] == "noether_dyn", module
    if len(parts) == 1:
        return "top"
    return parts[1].removesuffix(".py")


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import of a noether_dyn module in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names if a.name.startswith("noether_dyn")]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{path}:{node.lineno}: relative import; write it absolute"
            if node.module and node.module.startswith("noether_dyn"):
                out.append((node.lineno, node.module))
    return out


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    layers = {layer_of(module_name(p)) for p in MODULES}
    assert layers <= set(ALLOWED), f"modules outside any layer: {layers - set(ALLOWED)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    source = layer_of(module_name(path))
    upward = [
        f"{path.relative_to(PACKAGE)}:{line} imports {target} ({layer_of(target)})"
        for line, target in imported_modules(path)
        if layer_of(target) != source and layer_of(target) not in ALLOWED[source]
    ]
    assert not upward, f"imports running back up from layer {source!r}: {upward}"


def test_the_check_catches_an_upward_import(tmp_path):
    """The walker sees imports inside functions, and the rule refuses report -> capture."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from noether_dyn.capture import watch\n")
    (_, target), *_ = imported_modules(bad)
    assert layer_of(target) == "capture" and "capture" not in ALLOWED["report"]
