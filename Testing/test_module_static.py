"""Static checks of the Slicer-facing files, without the Slicer application: the module's Python against its .ui
file and RALogic's API, what the module imports, its version check, translation and help, the CMake files against
the tree, the Extensions Index entry against the index's JSON schema, the licence.

RAModule.py needs Slicer's `qt` and `ScriptedLoadableModule`, which only the application has, so it is read with
`ast` here, and imported once with stand-ins for those to run its version check; RALogic is imported for real
(slicer-core provides MRML).
"""
import ast
import hashlib
import importlib.util
import json
import re
import subprocess
import sys
import types
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "RAModule"
MODULE_PY = MODULE_DIR / "RAModule.py"
MODULE_UI = MODULE_DIR / "Resources" / "UI" / "RAModule.ui"
EXTENSION_DIR = REPO / "RAExtension"
NOTICE = "Research use only, not for diagnosis"
PAPER_TITLE = "Towards Universal Unsupervised Anomaly Detection in Medical Imaging"
# sha256 of the Apache License 2.0 as published at https://www.apache.org/licenses/LICENSE-2.0.txt
APACHE_2_SHA256 = "cfc7749b96f63bd31c3c42b5c471bf756814053e847c10f3eb003417bc523d30"
# Interactive widget classes: each one in the .ui must be wired up by the module.
INTERACTIVE = {"QPushButton", "QToolButton", "QComboBox", "QCheckBox", "QSpinBox", "QDoubleSpinBox", "QLineEdit",
               "QPlainTextEdit", "QProgressBar", "ctkSliderWidget", "ctkPathLineEdit", "qMRMLNodeComboBox"}
# The engine's packages that Slicer does not ship: installed on first use (PyTorch through the PyTorch extension).
NOT_IN_SLICER = {"torch", "torchvision", "lpips", "skimage", "safetensors", "platformdirs", "tqdm", "sklearn",
                 "matplotlib"}
# What RAModule.py may import at module level: Slicer loads it at start-up, before PyTorch (or the project's packages)
# may be installed. Anywhere in it: also RALogic, the one way to the engine, and Slicer's Sample Data module.
MODULE_LEVEL_IMPORTS = {"qt", "ctk", "vtk", "slicer"} | set(sys.stdlib_module_names)
MODULE_IMPORTS = MODULE_LEVEL_IMPORTS | {"RALogic", "SampleData"}
INDEX_SCHEMA = REPO / "Testing" / "schemas" / "slicer-extension-catalog-entry-schema-v1.0.2.json"


def module_tree() -> ast.Module:
    return ast.parse(MODULE_PY.read_text(), filename=str(MODULE_PY))


def module_constant(name: str):
    """The literal value of a module-level assignment `name = ...` in RAModule.py."""
    for node in module_tree().body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError(f"RAModule.py has no module-level constant {name}")


def ui_widgets() -> dict[str, str]:
    """{objectName: class} of every widget in RAModule.ui."""
    root = ET.parse(MODULE_UI).getroot()
    return {w.get("name"): w.get("class") for w in root.iter("widget")}


def ui_names_used(tree: ast.AST) -> dict[str, int]:
    """{name: first line} of every `<something>.ui.<name>` in the module."""
    used = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui"):
            used.setdefault(node.attr, node.lineno)
    return used


def module_level_statements(body):
    """Statements that run when the module is imported: everything outside function bodies."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        yield node
        for field in ("body", "orelse", "finalbody", "handlers"):
            yield from module_level_statements(getattr(node, field, []) or [])


# ---------------------------------------------------------------------------------------------------------------
# RAModule.py and RAModule.ui
# ---------------------------------------------------------------------------------------------------------------
def test_module_parses_on_python_3_6():
    """Slicer 4.11 (Python 3.6) and later can load the file, so that an unsupported Slicer shows the module's message
    instead of an empty panel (Testing/test_python_versions.py checks the supported Pythons' features)."""
    ast.parse(MODULE_PY.read_text(), feature_version=(3, 6))


def test_every_ui_name_the_module_uses_is_a_widget_in_the_ui_file():
    used = ui_names_used(module_tree())
    assert len(used) > 10, "no self.ui.<name> found: the check itself is broken"
    widgets = ui_widgets()
    missing = {name: line for name, line in used.items() if name not in widgets}
    assert not missing, f"RAModule.py uses widgets that RAModule.ui does not have (name: line): {missing}"


def test_every_interactive_widget_in_the_ui_file_is_used_by_the_module():
    used = ui_names_used(module_tree())
    unused = sorted(name for name, cls in ui_widgets().items() if cls in INTERACTIVE and name not in used)
    assert not unused, f"widgets in RAModule.ui that RAModule.py never wires up: {unused}"


def test_ui_file_is_consistent():
    root = ET.parse(MODULE_UI).getroot()
    top = root.find("widget")
    assert root.findtext("class") == top.get("name") == "RAModule"
    assert top.get("class") == "qMRMLWidget"  # so that setMRMLScene reaches the node selectors
    names = [w.get("name") for w in root.iter("widget")]
    assert len(names) == len(set(names)), "duplicate widget names in RAModule.ui"
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    undeclared = {cls for cls in ui_widgets().values() if not cls.startswith("Q") and cls not in declared}
    assert not undeclared, f"custom widget classes used without a <customwidget> declaration: {undeclared}"
    for connection in root.iter("connection"):
        for end in ("sender", "receiver"):
            assert connection.findtext(end) in names, f"connection {end} {connection.findtext(end)} is no widget"
    selector = root.find(".//widget[@name='inputVolumeSelector']")
    hidden = [s.text for s in selector.findall("./property[@name='hideChildNodeTypes']/stringlist/string")]
    assert "vtkMRMLLabelMapVolumeNode" in hidden, "label maps must not be offered as the input volume"


def test_notice_and_citation_are_shown():
    widgets = ET.parse(MODULE_UI).getroot()
    notice = widgets.find(".//widget[@name='noticeLabel']/property[@name='text']/string").text
    assert NOTICE in notice
    source = " ".join(MODULE_PY.read_text().split())  # the help text is HTML: line breaks are spaces
    assert module_constant("NOTICE").startswith(NOTICE)
    assert PAPER_TITLE in source and "Bercea" in source
    assert NOTICE in (REPO / "docs" / "SLICER.md").read_text()


def test_module_has_the_scripted_module_classes():
    classes = {node.name: [ast.unparse(b) for b in node.bases]
               for node in module_tree().body if isinstance(node, ast.ClassDef)}
    assert classes.get("RAModule") == ["ScriptedLoadableModule"]
    assert classes.get("RAModuleWidget") == ["ScriptedLoadableModuleWidget", "VTKObservationMixin"]
    assert classes.get("RAModuleTest") == ["ScriptedLoadableModuleTest"]


def test_title_category_and_help_are_translatable_with_a_documentation_link():
    """As Slicer 5.6+ modules do: the title and help through `_` (slicer.i18n.tr), the category through
    translate("qSlicerAbstractCoreModule", ...); with a plain stand-in where Slicer has no slicer.i18n."""
    text = MODULE_PY.read_text()
    assert 'self.parent.title = _("Anomaly Detection (RA)")' in text
    assert module_constant("TITLE") == "Anomaly Detection (RA)"
    assert 'self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]' in text
    assert "self.parent.helpText = _(" in text and "self.parent.acknowledgementText = _(" in text
    assert "from slicer.i18n import tr as _" in text and "except ImportError:" in text
    help_text = next(node.value for node in ast.walk(module_tree()) if isinstance(node, ast.Assign)
                     and ast.unparse(node.targets[0]) == "self.parent.helpText")
    assert "DOCUMENTATION_URL" in ast.unparse(help_text), "the help links to the user guide"
    assert module_constant("DOCUMENTATION_URL") == extension_variables()["EXTENSION_HOMEPAGE"]
    assert module_constant("DOCUMENTATION_URL").endswith("/docs/SLICER.md")


def test_self_test_runs_every_test_method():
    test_class = next(n for n in module_tree().body if isinstance(n, ast.ClassDef) and n.name == "RAModuleTest")
    methods = {f.name: f for f in test_class.body if isinstance(f, ast.FunctionDef)}
    tests = {name for name in methods if name.startswith("test_")}
    assert tests, "RAModuleTest has no test_ methods"
    called = {node.attr for node in ast.walk(methods["runTest"]) if isinstance(node, ast.Attribute)}
    assert tests <= called, f"test methods that runTest never runs: {sorted(tests - called)}"


def test_module_imports_nothing_heavy_at_module_level():
    heavy = []
    for node in module_level_statements(module_tree().body):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        else:
            continue
        heavy += [f"line {node.lineno}: {name}" for name in names
                  if name.split(".")[0] not in MODULE_LEVEL_IMPORTS]
    assert not heavy, ("RAModule.py imports these when Slicer loads it (before PyTorch may be installed); import "
                       f"them inside functions: {heavy}")


def test_module_imports_only_ralogic_slicer_qt_ctk_vtk_and_the_standard_library():
    """The panel talks to the logic only: no import of ra_engine, numpy or torch, at module level or in a
    function (its self-test included); whatever it needs, RALogic offers."""
    wrong = []
    for node in ast.walk(module_tree()):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""] if node.level == 0 else ["(relative import)"]
        else:
            continue
        wrong += [f"line {node.lineno}: {name}" for name in names if name.split(".")[0] not in MODULE_IMPORTS]
    assert not wrong, "RAModule.py reaches past RALogic (give RALogic what it needs):\n" + "\n".join(wrong)


def test_sample_data_checksum_matches_the_bundled_scan():
    from RALogic.sample import SAMPLE_NAME, SAMPLE_SHA256, sampleScanPath

    assert sampleScanPath() == REPO / "ra_engine" / "resources" / "reference" / "head.nii.gz"
    assert hashlib.sha256(sampleScanPath().read_bytes()).hexdigest() == SAMPLE_SHA256
    assert (MODULE_DIR / "Resources" / "Icons" / f"{SAMPLE_NAME}.png").is_file()


def load_module_with_stand_ins(monkeypatch, major: int, minor: int):
    """RAModule.py imported with stand-ins for what only the Slicer application has (qt, ScriptedLoadableModule,
    slicer.app of version major.minor); slicer-core's slicer.util and vtk are real."""
    import slicer

    class Stand:
        def __init__(self, *args, **kwargs):
            pass

    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    scripted = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        setattr(scripted, name, Stand)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", scripted)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(majorVersion=major, minorVersion=minor), raising=False)
    spec = importlib.util.spec_from_file_location("RAModuleUnderTest", MODULE_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("version", [(4, 11), (5, 2), (5, 4)])
def test_an_older_slicer_gets_a_message_instead_of_an_empty_panel(monkeypatch, version):
    module = load_module_with_stand_ins(monkeypatch, *version)
    message = module.supportProblem()
    assert message and "needs 3D Slicer 5.6 or later" in message and "{}.{}".format(*version) in message


@pytest.mark.parametrize("version", [(5, 6), (5, 8), (5, 10)])
def test_a_supported_slicer_gets_the_panel(monkeypatch, version):
    assert load_module_with_stand_ins(monkeypatch, *version).supportProblem() is None


def test_packages_that_cannot_be_loaded_are_explained_in_the_panel(monkeypatch):
    """RALogic not installed, or not valid on this Slicer's Python: the panel says so and how to install it."""
    module = load_module_with_stand_ins(monkeypatch, 5, 8)
    for name in [m for m in sys.modules if m == "RALogic" or m.startswith("RALogic.")]:
        monkeypatch.delitem(sys.modules, name)

    class Broken:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "RALogic":
                raise SyntaxError("invalid syntax (logic.py, line 1)")
            return None

    monkeypatch.setattr(sys, "meta_path", [Broken(), *sys.meta_path])
    message = module.supportProblem()
    assert "cannot be loaded" in message and "SyntaxError" in message and "pip install --no-deps -e" in message


def test_the_version_stated_in_the_docs_is_the_one_checked():
    minimum = "{}.{}".format(*module_constant("MINIMUM_SLICER_VERSION"))
    guide = (REPO / "docs" / "SLICER.md").read_text()
    assert f"{minimum} or later" in guide and "5.8" in guide and "5.10" in guide
    readme = (REPO / "README.md").read_text()
    assert f"Slicer {minimum}" in readme


def test_module_uses_only_what_ralogic_provides():
    """Names imported from RALogic and ra_engine exist, and the methods the panel calls on the logic, the model
    manager and the training process exist on their classes."""
    import importlib

    tree = module_tree()
    missing = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("RALogic", "ra_engine"):
            module = importlib.import_module(node.module)
            missing += [f"{node.module}.{a.name} (line {node.lineno})" for a in node.names
                        if not hasattr(module, a.name)]
    assert not missing, f"RAModule.py imports names that do not exist: {missing}"

    from RALogic import DetectionTask, RALogic
    from RALogic.launcher import TrainingProcess
    from RALogic.models import ModelManager

    receivers = {"self.logic": RALogic, "logic": RALogic, "widget.logic": RALogic, "self.models": ModelManager,
                 "self._training": TrainingProcess, "process": TrainingProcess, "self._detection": DetectionTask,
                 "task": DetectionTask}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) in receivers:
            cls = receivers[ast.unparse(node.value)]
            if not hasattr(cls, node.attr):
                missing.append(f"{cls.__name__}.{node.attr} (line {node.lineno})")
    assert not missing, f"RAModule.py calls what RALogic does not have: {missing}"


def test_parameter_node_has_what_the_panel_reads_and_writes():
    """RALogic's parameter wrapper (with slicer-core's MRML) has every parameter the panel syncs and shows, and its
    MRML node, which the panel observes."""
    code = """
import slicer
from RALogic import RALogic
parameters = RALogic(scene=slicer.vtkMRMLScene()).parameters
for name in ("inputVolume", "model", "flagRate", "opacity", "device", "report"):
    getattr(parameters, name)
assert parameters.node.IsA("vtkMRMLScriptedModuleNode")
parameters.flagRate = 0.02
assert abs(parameters.flagRate - 0.02) < 1e-12
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    written = {node.args[0].value for node in ast.walk(module_tree())
               if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("updateParameterNodeFromGUI")
               and node.args and isinstance(node.args[0], ast.Constant)}
    assert written == {"inputVolume", "model", "device", "flagRate", "opacity"}, written


def test_panel_opens_before_the_engine_packages_are_installed():
    """Slicer imports the module and the panel sets itself up before PyTorch and the pip-installed packages may be
    there: with those made unimportable, everything the panel imports before its dependency check still imports,
    torch is not imported, and the dependency check says what is missing."""
    code = f"""
import importlib.abc, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {sorted(NOT_IN_SLICER)!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not installed yet)")
        return None

sys.meta_path.insert(0, Absent())
import slicer
import RALogic, RALogic.launcher, RALogic.dependencies, RALogic.models, RALogic.outputs, RALogic.sample, ra_engine
import RALogic.worker, RALogic.detectjob
from RALogic import RALogic as Logic, SceneClosed, Cancelled
from RALogic.models import ModelManager
from RALogic.dependencies import dependencyMessage, missingDependencies
Logic(scene=slicer.vtkMRMLScene()).parameters.report
ModelManager()
assert "torch" not in sys.modules
assert {{d.module for d in missingDependencies()}} >= {{"torch", "lpips"}}, missingDependencies()
assert "PyTorch" in dependencyMessage()
"""
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


# ---------------------------------------------------------------------------------------------------------------
# CMake
# ---------------------------------------------------------------------------------------------------------------
def cmake_commands(path: Path) -> list[tuple[str, list[str]]]:
    """(command in lower case, arguments) of each command in a CMakeLists.txt, comments removed, quotes stripped."""
    text = "\n".join(re.sub(r'#(?=(?:[^"]*"[^"]*")*[^"]*$).*', "", line) for line in path.read_text().splitlines())
    commands, i = [], 0
    pattern = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*\(")
    while (match := pattern.search(text, i)) is not None:
        depth, quoted, j = 1, False, match.end()
        while depth:  # to the closing parenthesis, ignoring parentheses inside quoted arguments
            quoted ^= text[j] == '"'
            depth += 0 if quoted else {"(": 1, ")": -1}.get(text[j], 0)
            j += 1
        body = text[match.end():j - 1]
        arguments = [a[1:-1] if a.startswith('"') else a for a in re.findall(r'"[^"]*"|[^\s"]+', body)]
        commands.append((match.group(1).lower(), arguments))
        i = j
    return commands


def expand(argument: str, variables: dict[str, list[str]]) -> list[str] | None:
    """The argument with ${VAR} replaced (a list variable alone expands to its items); None when it names a
    variable the source tree does not define (Slicer's, the build directory's)."""
    whole = re.fullmatch(r"\$\{(\w+)\}", argument)
    if whole:
        return variables.get(whole.group(1))
    unknown = [v for v in re.findall(r"\$\{(\w+)\}", argument) if v not in variables]
    if unknown:
        return None
    return [re.sub(r"\$\{(\w+)\}", lambda m: ";".join(variables[m.group(1)]), argument)]


class CMakeFile:
    """One CMakeLists.txt with the variables it sees: those `set` in it and in its parents, and
    CMAKE_CURRENT_SOURCE_DIR."""

    def __init__(self, path: Path, inherited: dict[str, list[str]] | None = None):
        self.path, self.dir = path, path.parent
        self.commands = cmake_commands(path)
        self.variables = dict(inherited or {})
        self.variables["CMAKE_CURRENT_SOURCE_DIR"] = [str(self.dir)]
        for name, arguments in self.commands:
            if name == "set" and arguments:
                self.variables[arguments[0]] = self.values(arguments[1:])

    def values(self, arguments: list[str]) -> list[str]:
        out = []
        for argument in arguments:
            expanded = expand(argument, self.variables)
            out += expanded if expanded is not None else [argument]
        return out

    def calls(self, command: str) -> list[list[str]]:
        return [self.values(arguments) for name, arguments in self.commands if name == command]

    def file(self, argument: str) -> Path:
        return (self.dir / argument).resolve()

    def children(self) -> list["CMakeFile"]:
        return [CMakeFile(self.dir / args[0] / "CMakeLists.txt", self.variables)
                for args in self.calls("add_subdirectory")]


def all_cmake_files() -> list[CMakeFile]:
    found, pending = [], [CMakeFile(REPO / "CMakeLists.txt")]
    while pending:
        current = pending.pop()
        found.append(current)
        pending += current.children()
    return found


def keyword_values(arguments: list[str], keyword: str, keywords: set[str]) -> list[str]:
    """The values after `keyword` up to the next keyword in `keywords`."""
    if keyword not in arguments:
        return []
    values = []
    for argument in arguments[arguments.index(keyword) + 1:]:
        if argument in keywords:
            break
        values.append(argument)
    return values


def test_every_cmake_lists_file_exists_and_every_subdirectory_has_one():
    files = all_cmake_files()
    assert {f.path.relative_to(REPO).as_posix() for f in files} == {
        "CMakeLists.txt", "RAModule/CMakeLists.txt", "RAModule/Testing/CMakeLists.txt",
        "RAModule/Testing/Python/CMakeLists.txt"}


def test_scripted_module_lists_existing_files_and_every_resource():
    module = next(f for f in all_cmake_files() if f.dir == MODULE_DIR)
    (arguments,) = module.calls("slicermacrobuildscriptedmodule")
    keywords = {"NAME", "SCRIPTS", "RESOURCES", "WITH_GENERIC_TESTS", "WITH_SUBDIR"}
    assert keyword_values(arguments, "NAME", keywords) == ["RAModule"]
    scripts = keyword_values(arguments, "SCRIPTS", keywords)
    resources = keyword_values(arguments, "RESOURCES", keywords)
    assert "RAModule.py" in scripts and "Resources/UI/RAModule.ui" in resources
    for listed in scripts + resources:
        assert ".." not in Path(listed).parts, f"{listed}: a '../' would be kept in the install path"
        assert module.file(listed).is_file(), f"RAModule/CMakeLists.txt lists {listed}, which does not exist"
    on_disk = {p.relative_to(MODULE_DIR).as_posix() for p in (MODULE_DIR / "Resources").rglob("*") if p.is_file()}
    assert on_disk <= set(resources), f"resources that would not be installed: {sorted(on_disk - set(resources))}"
    loaded = {node.args[0].value for node in ast.walk(module_tree()) if isinstance(node, ast.Call)
              and ast.unparse(node.func).endswith("resourcePath") and isinstance(node.args[0], ast.Constant)}
    assert {f"Resources/{name}" for name in loaded} <= set(resources)


def test_engine_and_logic_are_installed_as_packages_beside_the_module():
    module = next(f for f in all_cmake_files() if f.dir == MODULE_DIR)
    keywords = {"DESTINATION", "COMPONENT", "PATTERN", "REGEX", "FILES_MATCHING", "EXCLUDE", "USE_SOURCE_PERMISSIONS"}
    installed = {}
    for arguments in module.calls("install"):
        assert arguments[0] == "DIRECTORY", arguments
        (destination,) = keyword_values(arguments, "DESTINATION", keywords)
        assert destination == "${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}"
        sources = keyword_values(arguments, "DIRECTORY", keywords)
        assert len(sources) == 1, "one install(DIRECTORY) rule per package"
        source = Path(sources[0]).resolve()
        assert not sources[0].endswith("/"), "a trailing '/' would install the package's contents, not the package"
        assert (source / "__init__.py").is_file(), f"{source} is not a Python package"
        excluded = [arguments[i + 1] for i, a in enumerate(arguments[:-2]) if a == "PATTERN"
                    and arguments[i + 2] == "EXCLUDE"]
        assert "__pycache__" in excluded, f"{source.name}: __pycache__ would be installed"
        installed[source.name] = source
    assert set(installed) == {"RALogic", "ra_engine"}
    assert set(module.variables["RA_PYTHON_PACKAGES"]) == set(installed), "the build-tree copy must match"
    assert all(path.parent == REPO for path in installed.values())


def test_self_test_is_registered_with_ctest():
    testing = next(f for f in all_cmake_files() if f.dir == MODULE_DIR / "Testing" / "Python")
    (arguments,) = testing.calls("slicer_add_python_unittest")
    (script,) = keyword_values(arguments, "SCRIPT", {"SCRIPT", "SLICER_ARGS", "TESTNAME_PREFIX"})
    assert Path(script).resolve() == MODULE_PY.resolve()


def extension_variables() -> dict[str, str]:
    top = CMakeFile(REPO / "CMakeLists.txt")
    return {name: " ".join(values) for name, values in top.variables.items() if name.startswith("EXTENSION_")}


def test_top_level_cmake_follows_the_extension_template():
    top = CMakeFile(REPO / "CMakeLists.txt")
    order = [(name, args) for name, args in top.commands
             if name in ("project", "find_package", "include", "add_subdirectory")]
    assert order == [("project", ["RAExtension"]), ("find_package", ["Slicer", "REQUIRED"]),
                     ("include", ["${Slicer_USE_FILE}"]), ("add_subdirectory", ["RAModule"]),
                     ("include", ["${Slicer_EXTENSION_GENERATE_CONFIG}"]), ("include", ["${Slicer_EXTENSION_CPACK}"])]
    meta = extension_variables()
    for name in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS", "DEPENDS"):
        assert meta.get(f"EXTENSION_{name}", "").strip(), f"EXTENSION_{name} is not set"
    assert "PyTorch" in meta["EXTENSION_DEPENDS"].split()
    assert NOTICE.lower() in meta["EXTENSION_DESCRIPTION"].lower()


def test_icon_and_screenshot_urls_name_files_in_the_repository():
    meta = extension_variables()
    for url in [meta["EXTENSION_ICONURL"]] + meta["EXTENSION_SCREENSHOTURLS"].split():
        match = re.fullmatch(r"https://raw\.githubusercontent\.com/[^/]+/[^/]+/[^/]+/(.+)", url)
        assert match, f"{url} is not a raw.githubusercontent.com URL of a file in the repository"
        assert (REPO / match.group(1)).is_file(), f"{url} names {match.group(1)}, which is not in the repository"
    from PIL import Image

    with Image.open(REPO / re.search(r"/main/(.+)", meta["EXTENSION_ICONURL"]).group(1)) as icon:
        assert icon.format == "PNG" and icon.size == (128, 128)
    with Image.open(MODULE_DIR / "Resources" / "Icons" / "RAModule.png") as icon:
        assert icon.format == "PNG"


# ---------------------------------------------------------------------------------------------------------------
# Extensions Index entry, licence
# ---------------------------------------------------------------------------------------------------------------
def test_extensions_index_entry_is_valid_and_agrees_with_cmake():
    """The entry validates against the Extensions Index's JSON schema (the version it names; a copy is kept in
    Testing/schemas), as the index's own check does, and says what CMakeLists.txt says."""
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the test extra of pyproject.toml")
    entries = list(EXTENSION_DIR.glob("*.json"))
    assert len(entries) == 1
    entry = json.loads(entries[0].read_text())
    assert entries[0].stem == "RAExtension", "the Extensions Index file is named after the extension (project())"
    schema = json.loads(INDEX_SCHEMA.read_text())
    assert entry["$schema"] == schema["$id"], f"the entry names {entry['$schema']}; the copy kept is {schema['$id']}"
    jsonschema.validate(entry, schema, cls=jsonschema.Draft7Validator)
    meta = extension_variables()
    assert entry["category"] == meta["EXTENSION_CATEGORY"]
    assert sorted(entry.get("build_dependencies", [])) == sorted(meta["EXTENSION_DEPENDS"].split())
    assert entry["scm_url"].startswith("https://"), "the index accepts git or https addresses"
    repository = re.match(r"https://github\.com/[^/]+/[^/]+", meta["EXTENSION_HOMEPAGE"]).group(0)
    assert entry["scm_url"].removesuffix(".git") == repository


def test_the_schema_check_refuses_what_the_index_refuses():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(INDEX_SCHEMA.read_text())
    good = json.loads((EXTENSION_DIR / "RAExtension.json").read_text())
    for bad in ({k: v for k, v in good.items() if k != "scm_url"}, {**good, "tier": 6}, {**good, "homepage": "x"},
                {**good, "build_dependencies": "PyTorch"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema, cls=jsonschema.Draft7Validator)


def test_licence_is_the_apache_2_text_that_pyproject_declares():
    declared = re.search(r'^license\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert declared and declared.group(1) == "Apache-2.0"
    assert hashlib.sha256((REPO / "LICENSE").read_bytes()).hexdigest() == APACHE_2_SHA256


@pytest.mark.parametrize("path", ["RAExtension/make_images.py", "RAExtension/make_screenshot.py"])
def test_helper_scripts_parse_on_the_oldest_supported_python(path):
    ast.parse((REPO / path).read_text(), feature_version=(3, 10))
