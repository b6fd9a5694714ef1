"""RALogic.models.ModelManager: the registry plus bundled read-only models; import, list, resolve, remove, refusals,
and opening the models folder without Qt."""
import hashlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

from RALogic import Cancelled
from RALogic.models import ModelManager
from ra_engine.models import registry as engine_registry
from ra_engine.core.errors import ModelError
from test_registry import make_model, tamper_weights, zip_of


@pytest.fixture(autouse=True)
def registry(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "registry"
    monkeypatch.setenv("RA_MODELS_DIR", str(folder))
    return folder


@pytest.fixture
def manager(tmp_path, monkeypatch) -> ModelManager:
    """A manager whose bundled folder is an empty one of the test's own."""
    (tmp_path / "bundled").mkdir()
    monkeypatch.setattr(engine_registry, "BUNDLED_DIR", tmp_path / "bundled")
    return ModelManager()


def test_import_list_resolve_and_remove(tmp_path, registry, manager):
    assert manager.listModels() == [] and manager.modelsFolder() == registry
    path = manager.importModel(make_model(tmp_path / "src"))
    assert path == registry / "tiny"
    [entry] = manager.listModels()
    assert entry["name"] == "tiny" and entry["path"] == str(path) and entry["bundled"] is False
    assert entry["preset"] == "xray" and entry["modality"] == "X-ray radiograph (2D)"
    assert entry["image_size"] == 16 and entry["parameters"] > 0 and entry["calibrated"] is False
    assert manager.resolve("tiny") == path and manager.resolve(tmp_path / "src") == tmp_path / "src"
    assert manager.modelNames() == ["tiny"] and not manager.isBundled("tiny")
    assert manager.removeModel("tiny") == path and manager.listModels() == []
    with pytest.raises(ModelError, match="neither a model directory nor a registered model name"):
        manager.resolve("tiny")
    with pytest.raises(ModelError, match="no registered model is named"):
        manager.removeModel("tiny")


def test_a_tampered_model_is_refused_and_nothing_is_registered(tmp_path, registry, manager):
    source = tamper_weights(make_model(tmp_path / "src"))
    with pytest.raises(ModelError, match="does not match its card"):
        manager.importModel(source)
    assert manager.listModels() == [] and [p.name for p in registry.iterdir()] == []


def test_import_from_a_zip_url_checks_its_sha256(tmp_path, manager):
    archive = zip_of(make_model(tmp_path / "src"), tmp_path / "tiny.zip")
    with pytest.raises(ModelError, match="does not match the sha256 given"):
        manager.importModel(archive.as_uri(), sha256="0" * 64)
    seen = []
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    path = manager.importModel(archive.as_uri(), name="from-url", sha256=digest,
                               progress=lambda done, total: seen.append(done))
    assert manager.resolve("from-url") == path and seen[-1] == archive.stat().st_size
    with pytest.raises(ModelError, match="already registered"):
        manager.importModel(archive, name="from-url", sha256=digest)
    assert manager.importModel(archive, name="from-url", sha256=digest, overwrite=True) == path


def test_an_import_from_a_url_cancelled_by_its_progress_registers_nothing(tmp_path, registry, manager):
    """The panel's progress dialog returns False from the callback when its Cancel is pressed."""
    archive = zip_of(make_model(tmp_path / "src"), tmp_path / "tiny.zip")
    with pytest.raises(Cancelled, match="cancelled"):
        manager.importModel(archive.as_uri(), name="cancelled", progress=lambda done, total: False)
    assert manager.listModels() == [] and not (registry / "cancelled").exists()


def test_bundled_models_are_listed_read_only_and_shadowed_by_registered_ones(tmp_path, manager):
    bundled = make_model(tmp_path / "bundled" / "brain-t1-demo", name="brain-t1-demo")
    (tmp_path / "bundled" / "not-a-model").mkdir()
    [entry] = manager.listModels()
    assert entry["name"] == "brain-t1-demo" and entry["bundled"] is True and entry["path"] == str(bundled)
    assert entry["preset"] == "xray" and entry["parameters"] > 0 and "problem" not in entry
    assert manager.resolve("brain-t1-demo") == bundled and manager.isBundled("brain-t1-demo")
    with pytest.raises(ModelError, match="bundled with ra .* and cannot be removed"):
        manager.removeModel("brain-t1-demo")
    assert bundled.is_dir()
    with pytest.raises(ModelError, match="bundled models: brain-t1-demo"):
        manager.resolve("other")
    registered = manager.importModel(make_model(tmp_path / "mine", name="brain-t1-demo"))
    assert [(e["name"], e["bundled"]) for e in manager.listModels()] == [("brain-t1-demo", False)]
    assert manager.resolve("brain-t1-demo") == registered and not manager.isBundled("brain-t1-demo")
    assert manager.modelNames() == ["brain-t1-demo"]
    manager.removeModel("brain-t1-demo")
    assert manager.resolve("brain-t1-demo") == bundled


def test_the_bundled_folder_is_the_engines_resources():
    assert engine_registry.BUNDLED_DIR == Path(__file__).resolve().parents[1] / "ra_engine" / "resources" / "models"


def test_open_models_folder_without_qt_uses_the_platform_opener(monkeypatch, registry, manager):
    monkeypatch.setitem(sys.modules, "qt", None)  # `import qt` raises ImportError, as outside Slicer
    monkeypatch.setattr(sys, "platform", "linux")
    calls = []
    monkeypatch.setattr(subprocess, "Popen", lambda args, **kwargs: calls.append(args))
    assert manager.openModelsFolder() == registry and registry.is_dir()
    assert calls == [["xdg-open", str(registry)]]


def test_open_models_folder_with_qt_uses_qdesktopservices(monkeypatch, registry, manager):
    opened = []
    qt = types.SimpleNamespace(QDesktopServices=types.SimpleNamespace(openUrl=opened.append),
                               QUrl=types.SimpleNamespace(fromLocalFile=lambda path: f"file://{path}"))
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: pytest.fail("no subprocess when Qt is there"))
    manager.openModelsFolder()
    assert opened == [f"file://{registry}"]
