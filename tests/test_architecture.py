"""The layers of ARCHITECTURE.md hold: no module imports from a layer above its own, lazy imports included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "mriflow"

# Bottom to top, as in ARCHITECTURE.md; a module belongs to the first entry that is it or its package.
LAYERS = [
    ("base", ["mriflow", "mriflow.__init__", "mriflow.config", "mriflow.distributed", "mriflow.utils"]),
    ("data", ["mriflow.data"]),
    ("models and math", ["mriflow.models", "mriflow.flow", "mriflow.representations"]),
    ("artifacts", ["mriflow.checkpoint", "mriflow.latents", "mriflow.families"]),
    ("training", ["mriflow.train"]),
    ("use", ["mriflow.generator", "mriflow.tissue_maps", "mriflow.export", "mriflow.cohort", "mriflow.generate",
             "mriflow.generate_io", "mriflow.edit", "mriflow.api", "mriflow.evaluate"]),
    ("interface", ["mriflow.cli", "mriflow.__main__", "mriflow.app"]),
]


def layer_of(module: str) -> int:
    matches = [(len(prefix), index) for index, (_, prefixes) in enumerate(LAYERS) for prefix in prefixes
               if module == prefix or module.startswith(prefix + ".")]
    if not matches:
        raise AssertionError(f"{module} is in no layer of ARCHITECTURE.md; add it there and to LAYERS")
    return max(matches)[1]  # the most specific prefix


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(source: str) -> list[tuple[str, int]]:
    """(imported mriflow module, line) of every import in the source, inside functions too."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("mriflow") and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names] if node.module == "mriflow" else [node.module]
            found += [(name, node.lineno) for name in names]
        elif isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names if a.name.startswith("mriflow")]
    return found


def upward_imports(module: str, source: str, known: dict[str, Path]) -> list[str]:
    own, upward = layer_of(module), []
    for name, line in imports(source):
        target = name if name in known else name.rsplit(".", 1)[0]  # `from mriflow import x`: module x, or a name in mriflow
        if layer_of(target) > own:
            upward.append(f"line {line}: {name} ({LAYERS[layer_of(target)][0]})")
    return upward


@pytest.mark.parametrize("module", sorted(modules()))
def test_no_module_imports_from_a_layer_above_its_own(module):
    known = modules()
    upward = upward_imports(module, known[module].read_text(), known)
    assert not upward, f"{module} ({LAYERS[layer_of(module)][0]}) imports from above: " + "; ".join(upward)


def test_an_upward_import_is_found_even_inside_a_function():
    source = "import torch\nfrom mriflow import config\n\ndef f():\n    from mriflow.checkpoint import sha256\n"
    assert upward_imports("mriflow.models.losses", source, modules()) == ["line 5: mriflow.checkpoint (artifacts)"]
    assert upward_imports("mriflow.generate", source, modules()) == []


def test_the_layers_are_the_ones_architecture_md_describes():
    text = (PACKAGE.parents[1] / "ARCHITECTURE.md").read_text()
    for name, prefixes in LAYERS:
        assert f"**{name}**" in text, name
        for prefix in prefixes:
            if prefix not in ("mriflow", "mriflow.__init__", "mriflow.__main__"):
                assert f"`{prefix.removeprefix('mriflow.')}" in text, prefix


MAX_LINES = 400


@pytest.mark.parametrize("module", sorted(modules()))
def test_a_module_over_400_lines_says_why_at_its_top(module):
    """ARCHITECTURE.md, "Modules over 400 lines": one concern per module, or a reason in its docstring."""
    source = modules()[module].read_text()
    if len(source.splitlines()) > MAX_LINES:
        docstring = ast.get_docstring(ast.parse(source)) or ""
        assert "Over 400 lines" in docstring, f"{module} has {len(source.splitlines())} lines and no reason at its top"


def test_generate_starts_without_the_imports_only_other_commands_need():
    """Issue 27.3: pandas (tables: prepare, evaluate, cohorts) and torchdiffeq (scipy.integrate: dopri5 alone) are
    imported where they are used, so `mriflow generate` does not spend a second importing them."""
    import subprocess
    import sys

    code = ("import sys; import mriflow.cli.main, mriflow.generate, mriflow.api; "
            "print(sorted(m for m in ('pandas', 'torchdiffeq', 'matplotlib') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"
