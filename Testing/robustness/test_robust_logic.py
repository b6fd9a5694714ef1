"""The Slicer logic (RALogic on slicer-core, headless) under interference, through its public methods only
(`RALogic(scene).detect`, its progress callback, `ModelManager`): the input node deleted during detection, two
detections started at once, a model removed while the panel lists it or while it detects. Each ends in correct
outputs or a clear error (SceneClosed, ModelError, RAError) with the scene as it was. Closing the scene during a job
and cancelling are in test_logic_bridge.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer")

from fixtures_mrml import ViewScene, load_volume, scene_snapshot  # noqa: E402
from ra_engine.core.errors import ModelError, RAError  # noqa: E402
from ra_engine.io.images import read_image  # noqa: E402
from RALogic import RALogic, SceneClosed  # noqa: E402
from RALogic.models import ModelManager  # noqa: E402
from test_detect import calibrate, make_model  # noqa: E402


@pytest.fixture(scope="module")
def xray_model(tmp_path_factory, scorer) -> Path:
    """A tiny xray RA (32 x 32) calibrated on four radiographs: a detection takes a fraction of a second (the child
    process's start-up the rest)."""
    from fixtures_io import write_radiographs
    from ra_engine.detection.pipeline import detect
    from ra_engine.models.modeldir import load_model

    root = tmp_path_factory.mktemp("logic")
    directory = make_model(root / "xray-tiny", "xray")
    pictures = sorted(write_radiographs(root / "normals").glob("*.png"))
    model = load_model(directory)
    calibrate(directory, [detect(model, read_image(p), scorer) for p in pictures[:4]])
    return directory


@pytest.fixture(scope="module")
def radiograph_files(tmp_path_factory) -> list[Path]:
    """Two radiographs stored as one-slice volumes (1, 40, 30), as Slicer loads a 2D image, in NRRD."""
    folder = tmp_path_factory.mktemp("radiographs")
    files = []
    for name, seed in (("first", 3), ("second", 4)):  # no numbers: MRML reads numbered files as one series
        rng = np.random.default_rng(seed)
        yy, xx = np.mgrid[0:40, 0:30]
        body = np.exp(-(((yy - 20) / 14.0) ** 2 + ((xx - 15) / 9.0) ** 2)) * 30000 + rng.normal(0, 300, (40, 30))
        image = sitk.GetImageFromArray(body[None].astype(np.float32))
        image.SetSpacing((0.2, 0.25, 1.0))
        files.append(folder / f"{name}.nrrd")
        sitk.WriteImage(image, str(files[-1]))
    return files


@pytest.fixture
def scene(radiograph_files):
    views = ViewScene()
    nodes = [load_volume(views.scene, path, path.stem) for path in radiograph_files]
    yield views.scene, nodes
    views.scene.Clear(1)


def output_ids(result) -> set[str]:
    return {n.GetID() for n in (result.pseudoHealthyNode, result.anomalyMapNode, result.detectionsNode,
                                result.segmentationNode)}


def assert_on_grid(result, node) -> None:
    for output in (result.pseudoHealthyNode, result.anomalyMapNode, result.detectionsNode):
        assert output.GetImageData().GetDimensions() == node.GetImageData().GetDimensions()
        assert np.allclose(output.GetSpacing(), node.GetSpacing()) and np.allclose(output.GetOrigin(),
                                                                                 node.GetOrigin())


def test_the_input_node_deleted_during_detection_leaves_the_scene_as_it_was(scene, xray_model):
    scene, (node, _) = scene
    logic = RALogic(scene)

    def delete_input(done, total):
        if scene.GetNodeByID(node.GetID()) is not None:
            scene.RemoveNode(node)
        return True

    with pytest.raises(SceneClosed, match="removed from the scene"):
        logic.detect(node, model=str(xray_model), device="cpu", progress=delete_input)
    after = scene_snapshot(scene)
    assert not any(cls in ("vtkMRMLSegmentationNode", "vtkMRMLLabelMapVolumeNode") for _, cls, _, _ in after)
    assert [name for _, cls, name, _ in after if cls == "vtkMRMLScalarVolumeNode"] == ["second"]
    with pytest.raises(RAError, match="run detection first"):
        logic.setFlagRate(0.01)


def test_two_detections_started_at_once_each_give_their_own_outputs_or_a_clear_refusal(scene, xray_model):
    """A second detection started while the first runs (from its progress callback, as a panel's timer would):
    on the same logic it is refused with an RAError; on a second logic of the same scene it runs, and each input
    gets its own outputs on its own grid."""
    scene, (first, second) = scene
    logic, other = RALogic(scene), RALogic(scene)
    seen: dict = {}

    def start_others(done, total):
        if not seen:
            seen["same-logic"] = _outcome(lambda: logic.detect(second, model=str(xray_model), device="cpu"))
            seen["other-logic"] = _outcome(lambda: other.detect(second, model=str(xray_model), device="cpu"))
        return True

    result = logic.detect(first, model=str(xray_model), device="cpu", progress=start_others)
    assert isinstance(seen["same-logic"], RAError) or hasattr(seen["same-logic"], "anomalyMapNode"), seen
    assert hasattr(seen["other-logic"], "anomalyMapNode"), seen
    assert_on_grid(result, first)
    assert_on_grid(seen["other-logic"], second)
    assert output_ids(result).isdisjoint(output_ids(seen["other-logic"]))
    assert all(scene.GetNodeByID(i) is not None for i in output_ids(result) | output_ids(seen["other-logic"]))


def _outcome(call):
    try:
        return call()
    except RAError as exc:
        return exc


@pytest.fixture
def registry(tmp_path, monkeypatch, xray_model) -> Path:
    folder = tmp_path / "registry"
    monkeypatch.setenv("RA_MODELS_DIR", str(folder))
    ModelManager().importModel(xray_model, name="listed")
    return folder


def test_a_model_removed_while_the_panel_lists_it_is_refused_clearly(scene, registry):
    scene, (node, _) = scene
    manager = ModelManager()
    assert "listed" in manager.modelNames()
    shutil.rmtree(registry / "listed")  # removed by another program (or another Slicer) while the list shows it
    before = scene_snapshot(scene)
    with pytest.raises(ModelError, match="neither a model directory nor a registered model name"):
        RALogic(scene).detect(node, model="listed", device="cpu")
    assert scene_snapshot(scene) == before
    assert "listed" not in manager.modelNames()
    with pytest.raises(ModelError, match="no registered model is named listed"):
        manager.removeModel("listed")


def test_a_model_removed_during_its_detection_gives_outputs_or_a_clear_error(scene, registry):
    scene, (node, _) = scene
    manager = ModelManager()

    def remove_model(done, total):
        if "listed" in manager.modelNames():
            manager.removeModel("listed")
        return True

    before = scene_snapshot(scene)
    outcome = _outcome(lambda: RALogic(scene).detect(node, model="listed", device="cpu", progress=remove_model))
    if isinstance(outcome, RAError):
        assert scene_snapshot(scene) == before
    else:
        assert_on_grid(outcome, node)
    assert "listed" not in manager.modelNames() and not (registry / "listed").exists()
