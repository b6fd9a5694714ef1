"""The code that runs inside Slicer is valid on the oldest Python of the supported Slicer versions: 3D Slicer 5.6 and
5.8 embed Python 3.9 (docs/SLICER.md), and pyproject.toml's requires-python says so. vermin finds what needs a newer
Python (match statements, zip(strict=), parenthesised context managers, newer library functions, `X | Y` unions
evaluated at run time, ...); each folder's violations are listed, one per line.

vermin's union detection does not know that `from __future__ import annotations` leaves annotations unevaluated, so
in such files a union reported on a line that holds only annotations is not a violation; a union evaluated at run
time there (an alias, an isinstance() argument) still is.
"""
import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OLDEST_PYTHON = (3, 9)  # Slicer 5.6 and 5.8
FOLDERS = ("RALogic", "RAModule", "ra_engine")
# Annotations are checked as if evaluated (conservative), and unions `X | Y` are looked for (off by default).
VERMIN = ["--target={}.{}-".format(*OLDEST_PYTHON), "--violations", "--eval-annotations", "--feature", "union-types",
          "--format", "parsable", "--no-tips", "--no-config-file"]


def vermin(paths: list) -> list:
    """(path, line, feature) of every violation vermin reports in `paths`."""
    pytest.importorskip("vermin", reason="vermin is in the test extra of pyproject.toml")
    run = subprocess.run([sys.executable, "-c", "import sys; from vermin import main; sys.exit(main())", *VERMIN,
                          *map(str, paths)], capture_output=True, text=True, cwd=REPO, timeout=600)
    # 1: the target is not met; the last line (no path) is the run's summary, so the analysis did run.
    assert run.returncode in (0, 1) and run.stdout.splitlines()[-1:] and run.stdout.splitlines()[-1].startswith(
        ":::"), run.stdout + run.stderr
    found = []
    for text in run.stdout.splitlines():
        # path:line:column:py2:py3:feature; a line without a line number is a file's (or the run's) summary.
        match = re.match(r"(.+?):(\d+):(\d*):([^:]*):([^:]*):(.*)$", text)
        if match:
            found.append((Path(match.group(1)), int(match.group(2)), match.group(6).strip()))
    return found


def annotation_only_lines(path: Path) -> set:
    """Lines of `path` that hold annotations and no `|` outside them, when the file postpones the evaluation of its
    annotations (`from __future__ import annotations`); empty otherwise."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    postponed = any(isinstance(node, ast.ImportFrom) and node.module == "__future__"
                    and any(alias.name == "annotations" for alias in node.names) for node in tree.body)
    if not postponed:
        return set()
    annotations = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args
            every = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs, arguments.vararg,
                     arguments.kwarg]
            annotations += [a.annotation for a in every if a is not None and a.annotation is not None]
            annotations += [node.returns] if node.returns is not None else []
        elif isinstance(node, ast.AnnAssign):
            annotations.append(node.annotation)
    inside = {id(child) for annotation in annotations for child in ast.walk(annotation)}
    lines = {line for annotation in annotations for line in range(annotation.lineno, annotation.end_lineno + 1)}
    runtime = {line for node in ast.walk(tree)
               if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and id(node) not in inside
               for line in range(node.lineno, node.end_lineno + 1)}
    return lines - runtime


def violations(folder: str) -> list:
    """vermin's violations in `folder`, less the unions in unevaluated annotations, as 'path:line: feature'."""
    kept, unevaluated = [], {}
    for path, line, feature in vermin([REPO / folder]):
        if feature.startswith("union types"):
            if path not in unevaluated:
                unevaluated[path] = annotation_only_lines(path)
            if line in unevaluated[path]:
                continue
        kept.append(f"{path.relative_to(REPO)}:{line}: {feature}")
    return kept


@pytest.mark.parametrize("folder", FOLDERS)
def test_code_that_runs_in_slicer_is_valid_on_its_oldest_python(folder):
    found = violations(folder)
    assert not found, (f"{folder} needs a Python newer than {OLDEST_PYTHON[0]}.{OLDEST_PYTHON[1]} (Slicer 5.6 and "
                       "5.8) here:\n" + "\n".join(found))


def test_the_check_finds_what_python_3_9_cannot_run(tmp_path):
    """The filter keeps unions evaluated at run time and every other violation; it drops only unions in postponed
    annotations."""
    (tmp_path / "postponed.py").write_text(
        "from __future__ import annotations\n"
        "def f(x: int | None) -> list[int] | None:\n"
        "    return None\n"
        "Alias = int | None\n"
        "def g(a, b):\n"
        "    return list(zip(a, b, strict=True))\n")
    (tmp_path / "evaluated.py").write_text("def f(x: int | None) -> None:\n    return None\n")
    found = {(path.name, line, feature.split()[0]) for path, line, feature in vermin([tmp_path])
             if not (feature.startswith("union types") and line in annotation_only_lines(path))}
    assert found == {("postponed.py", 4, "union"), ("postponed.py", 6, "'zip(strict)'"),
                     ("evaluated.py", 1, "union")}, found


def test_pyproject_says_the_same_oldest_python():
    text = (REPO / "pyproject.toml").read_text()
    declared = re.search(r'^requires-python\s*=\s*">=(\d+)\.(\d+)"', text, re.MULTILINE)
    assert declared and tuple(map(int, declared.groups())) == OLDEST_PYTHON
    test_extra = re.search(r"^test = \[(.*?)\]", text, re.MULTILINE | re.DOTALL).group(1)
    assert '"vermin' in test_extra and '"jsonschema' in test_extra
