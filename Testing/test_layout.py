"""The engine's layout as docs/ARCHITECTURE.md states it: stage packages whose imports run one way (the order is read
from the document), no import of another engine package inside a function outside `ra_engine/api.py`, no import
cycle, and RALogic using only the public API and the torch-free card and threshold modules."""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENGINE = REPO / "ra_engine"
LAZY_PLACE = ENGINE / "api.py"  # the one module whose functions import engine packages (torch stays lazy there)
RALOGIC_ALLOWED = ("ra_engine", "ra_engine.models.card", "ra_engine.thresholds.table")


def layer_order() -> list[list[str]]:
    """The layers of docs/ARCHITECTURE.md's "Import directions" block, lowest first; each layer a list of packages."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    block = re.search(r"<!-- layers -->\n```\n(.*?)```", text, re.S)
    assert block, "docs/ARCHITECTURE.md lost its layer block (<!-- layers --> followed by a fenced block)"
    layers = []
    for line in block.group(1).splitlines():
        names = line.split("#")[0].split()
        if names:
            layers.append(names)
    return layers


def unit_of(path: Path) -> str:
    """The package (core, io, ...) or top-level module (api, demo) of an engine file."""
    relative = path.relative_to(ENGINE)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def engine_imports(path: Path):
    """(line, imported engine module, inside a function) for every import of ra_engine in `path`."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []

    def visit(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0 and (
                    child.module == "ra_engine" or child.module.startswith("ra_engine.")):
                modules = [child.module] if child.module != "ra_engine" else [
                    f"ra_engine.{a.name}" if is_engine_module(a.name) else "ra_engine" for a in child.names]
                found.extend((child.lineno, m, in_function) for m in modules)
            elif isinstance(child, ast.ImportFrom) and child.level > 0:
                found.append((child.lineno, "relative import", in_function))
            elif isinstance(child, ast.Import):
                found.extend((child.lineno, a.name, in_function) for a in child.names
                             if a.name == "ra_engine" or a.name.startswith("ra_engine."))
            visit(child, inside)

    visit(tree, False)
    return found


def is_engine_module(name: str) -> bool:
    return (ENGINE / name).is_dir() or (ENGINE / f"{name}.py").is_file()


def target_unit(module: str) -> str:
    """The package or top-level module an import of `module` reaches; the bare package is its API."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "api"


def engine_files():
    return sorted(p for p in ENGINE.rglob("*.py") if "resources" not in p.parts)


def test_the_document_names_every_package_once():
    layers = layer_order()
    named = [name for layer in layers for name in layer]
    assert len(named) == len(set(named)), "a package appears in two layers"
    units = {unit_of(p) for p in engine_files()} - {"__init__"}
    assert set(named) == units, f"packages not in the document: {units - set(named)}; gone: {set(named) - units}"


def test_imports_run_one_way_between_the_packages():
    rank = {name: i for i, layer in enumerate(layer_order()) for name in layer}
    wrong = []
    for path in engine_files():
        if path == ENGINE / "__init__.py":
            continue
        unit = unit_of(path)
        for line, module, _ in engine_imports(path):
            assert module != "relative import", f"{path.relative_to(REPO)}:{line}: relative import (use ra_engine.…)"
            target = target_unit(module)
            if target == unit:
                continue
            if not rank[target] < rank[unit]:
                wrong.append(f"{path.relative_to(REPO)}:{line}: {unit} (layer {rank[unit]}) imports {module} "
                             f"(layer {rank[target]})")
    assert not wrong, "imports against the documented direction:\n" + "\n".join(wrong)


def test_no_engine_package_is_imported_inside_a_function_except_in_the_api():
    lazy = [f"{path.relative_to(REPO)}:{line}: {module}" for path in engine_files() if path != LAZY_PLACE
            for line, module, in_function in engine_imports(path) if in_function]
    assert not lazy, "imports of engine packages inside functions (only ra_engine/api.py may):\n" + "\n".join(lazy)


def test_ralogic_uses_only_the_public_api_and_the_torch_free_card_and_thresholds():
    wrong = []
    for path in sorted((REPO / "RALogic").glob("*.py")):
        for line, module, _ in engine_imports(path):
            if module != "relative import" and module not in RALOGIC_ALLOWED:  # relative: RALogic's own modules
                wrong.append(f"{path.relative_to(REPO)}:{line}: {module}")
    assert not wrong, "RALogic reaches past the API:\n" + "\n".join(wrong)


@pytest.mark.parametrize("module", ["ra_engine", "ra_engine.models.card", "ra_engine.thresholds.table",
                                    "ra_engine.models.registry"])
def test_the_api_and_the_torch_free_modules_import_no_heavy_package(module):
    """What Slicer imports before PyTorch and the engine's other packages are installed."""
    code = (f"import sys, {module}; print([m for m in ('torch', 'skimage', 'lpips', 'sklearn', 'matplotlib', "
            "'safetensors', 'platformdirs') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert out.strip() == "[]", f"importing {module} imported {out.strip()}"
