"""RALogic on real MRML (slicer-core, headless) with a tiny untrained, calibrated model: the RAS/LPS bridge checked
against SimpleITK on oblique, anisotropic, flipped and mirrored volumes; outputs on the input's exact grid, equal to
the engine's results on the node's scan and lying where the engine puts them on the file SimpleITK reads, placed in
the subject hierarchy beside the input and displayed as the panel shows them; re-runs that update the same nodes; an
input that never changes; refusals and cancellation (also through a launcher that forwards no signal) that leave the
scene as it was; detection in a child process, never in this one; new flag rates without the network; no MRML
collection leaked; NRRD/NIfTI and scene round trips; the parameter node across closing and loading scenes."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import slicer
import vtk

from fixtures_mrml import ViewScene, ijk_to_ras, load_volume, node_checksum, save_volume, scene_snapshot, \
    segment_array, voxels
from fixtures_processes import group_exists, process_exists, write_standin_launcher
from ra_engine.thresholds.table import calibration_table
from ra_engine.core.errors import Cancelled, DataError, ModelError, RAError
from ra_engine.core.image import Geometry, Image
from ra_engine.io.images import read_image
from ra_engine.models.card import read_card, write_card
from RALogic import RALogic, RAParameters, SceneClosed
from RALogic import outputs
from RALogic.parameters import MODULE_NAME, MODULE_NAME_ATTRIBUTE
from RALogic.geometry import (array_ijk_to_ras, geometry_from_ijk_to_ras, image_from_volume, ijk_to_ras_from_geometry,
                              ras_of_index, set_volume_from_image)
from test_detect import GRIDS, MNI, calibrate, make_model, resampled, rotation

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])
# The scan for detection: oblique, anisotropic and with a mirrored (left-handed) voxel frame at once.
SCAN_DIRECTION = rotation((0.3, 1.0, 0.2), 20.0) @ np.diag([-1.0, 1.0, 1.0])
SCAN_SPACING = (1.3, 1.7, 2.2)
BRIDGE_GRIDS = {**{name: (direction, spacing) for name, (direction, spacing, _) in GRIDS.items()},
                "mirrored": (SCAN_DIRECTION, SCAN_SPACING)}


@pytest.fixture(scope="module", autouse=True)
def offline_lpips(alex_safetensors):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RA_LPIPS_WEIGHTS", str(alex_safetensors))
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny untrained brain-mri RA, calibrated on the MNI scan."""
    from ra_engine.detection.pipeline import detect
    from ra_engine.models.modeldir import load_model

    directory = make_model(tmp_path_factory.mktemp("models") / "brain", "brain-mri")
    calibrate(directory, [detect(load_model(directory), read_image(MNI))])
    return directory


@pytest.fixture(scope="module")
def scan_file(tmp_path_factory):
    """The MNI brain on the oblique, anisotropic, mirrored grid, written as NRRD by SimpleITK."""
    scan = resampled(read_image(MNI), SCAN_DIRECTION, SCAN_SPACING, np.eye(4))
    path = tmp_path_factory.mktemp("scans") / "oblique.nrrd"
    sitk.WriteImage(scan.to_sitk(), str(path))
    return path


@pytest.fixture(scope="module")
def session(model_dir, scan_file):
    """One scene holding the scan (read by MRML) and its first detection. Later tests re-run, change the flag rate
    and finally close this scene, in file order."""
    views = ViewScene()
    scene = views.scene
    node = load_volume(scene, scan_file, "scan")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient"), "Study")
    hierarchy.CreateItem(study, node)
    node.SetAttribute("origin", "test")
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "registration")  # outputs follow the input
    moved.SetMatrixTransformToParent(vtk.vtkMatrix4x4())
    node.SetAndObserveTransformNodeID(moved.GetID())
    before = node_checksum(node)
    logic = RALogic(scene)
    calls = []
    result = logic.detect(node, model=str(model_dir), device="cpu", progress=lambda done, total: calls.append(
        (done, total)))
    return {"views": views, "scene": scene, "node": node, "logic": logic, "result": result, "before": before,
            "calls": calls, "study": study}


# ---- the RAS/LPS bridge -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("grid", BRIDGE_GRIDS)
def test_engine_sees_the_geometry_simpleitk_reads(grid, tmp_path):
    direction, spacing = BRIDGE_GRIDS[grid]
    rng = np.random.default_rng(3)
    array = rng.random((7, 9, 11)).astype(np.float32)
    marker = (2, 5, 8)  # (z, y, x)
    array[marker] = 50.0
    geometry = Geometry(tuple(map(float, spacing)), (-12.5, 30.25, 7.125), tuple(float(v) for v in direction.ravel()))
    path = tmp_path / f"{grid}.nrrd"
    sitk.WriteImage(Image(array, geometry).to_sitk(), str(path))
    reference = sitk.ReadImage(str(path))

    scene = slicer.vtkMRMLScene()
    node = load_volume(scene, path, grid)
    seen = image_from_volume(node)
    # MRML may store the voxels in another order (it reverses k for a mirrored frame); physically they are
    # SimpleITK's, voxel for voxel: resampled onto SimpleITK's grid (nearest, points coincide) they are equal.
    back = sitk.Resample(seen.to_sitk(), reference, sitk.Transform(), sitk.sitkNearestNeighbor, -1.0,
                         sitk.sitkFloat32)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(reference))
    # The marker voxel: MRML's RAS point is SimpleITK's LPS point mirrored in x and y, and the engine's LPS point.
    lps = np.array(reference.TransformIndexToPhysicalPoint(marker[::-1]))
    k, j, i = np.unravel_index(np.argmax(seen.array), seen.array.shape)
    np.testing.assert_allclose(ras_of_index(ijk_to_ras(node), (i, j, k)), LPS_TO_RAS @ lps, atol=1e-9)
    np.testing.assert_allclose(seen.to_sitk().TransformIndexToPhysicalPoint((int(i), int(j), int(k))), lps,
                               atol=1e-9)
    # Converting back gives the node's matrix.
    np.testing.assert_allclose(ijk_to_ras_from_geometry(seen.geometry), ijk_to_ras(node), atol=1e-12)


@pytest.mark.parametrize("grid", BRIDGE_GRIDS)
def test_an_engine_image_written_into_a_node_keeps_its_geometry_and_is_a_copy(grid, tmp_path):
    direction, spacing = BRIDGE_GRIDS[grid]
    array = np.zeros((6, 8, 10), np.float32)
    array[1, 6, 3] = 7.0
    image = Image(array, Geometry(tuple(map(float, spacing)), (4.0, -3.0, 2.0), tuple(direction.ravel().tolist())))
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "written")
    set_volume_from_image(node, image)
    image.array[:] = -1  # the engine's memory may be reused: the node holds its own copy
    assert voxels(node)[1, 6, 3] == 7.0 and voxels(node).sum() == 7.0
    # Saved by MRML, read by SimpleITK: the marker lies at the same physical point.
    path = save_volume(node, tmp_path / "written.nrrd")
    reread = sitk.ReadImage(str(path))
    assert sitk.GetArrayFromImage(reread)[1, 6, 3] == 7.0
    expected = Image(array, image.geometry).to_sitk().TransformIndexToPhysicalPoint((3, 6, 1))
    np.testing.assert_allclose(reread.TransformIndexToPhysicalPoint((3, 6, 1)), expected, atol=1e-6)
    # A result whose geometry is not the given matrix's is refused.
    with pytest.raises(ValueError, match="does not belong"):
        set_volume_from_image(node, image, np.eye(4))


def test_an_extent_not_starting_at_zero_moves_the_origin():
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "cropped")
    image = vtk.vtkImageData()
    image.SetExtent(2, 5, 1, 3, 4, 4)
    image.AllocateScalars(vtk.VTK_FLOAT, 1)
    node.SetAndObserveImageData(image)
    node.SetSpacing(2.0, 3.0, 4.0)
    node.SetOrigin(10.0, 20.0, 30.0)
    seen = image_from_volume(node)
    assert seen.array.shape == (1, 3, 4)
    # Array element [0, 0, 0] is voxel (2, 1, 4): RAS (14, 23, 46), LPS (-14, -23, 46).
    np.testing.assert_allclose(seen.geometry.origin, (-14.0, -23.0, 46.0))
    np.testing.assert_allclose(array_ijk_to_ras(node)[:3, 3], (14.0, 23.0, 46.0))


def test_a_degenerate_matrix_is_refused():
    with pytest.raises(DataError, match="degenerate"):
        geometry_from_ijk_to_ras(np.diag([1.0, 0.0, 1.0, 1.0]))


# ---- detection --------------------------------------------------------------------------------------------------


def test_outputs_lie_on_the_input_grid_and_equal_the_engine_on_the_same_scan(session, model_dir, scan_file,
                                                                          tmp_path):
    from ra_engine.detection.pipeline import detect
    from ra_engine.models.modeldir import load_model

    node, result, scene = session["node"], session["result"], session["scene"]
    name = node.GetName()
    expected = {"pseudoHealthyNode": ("vtkMRMLScalarVolumeNode", f"{name} pseudo-healthy"),
                "anomalyMapNode": ("vtkMRMLScalarVolumeNode", f"{name} anomaly map"),
                "detectionsNode": ("vtkMRMLLabelMapVolumeNode", f"{name} detections"),
                "segmentationNode": ("vtkMRMLSegmentationNode", f"{name} detections segmentation")}
    for field, (class_name, node_name) in expected.items():
        output = getattr(result, field)
        assert output.GetClassName() == class_name and output.GetName() == node_name
        assert output.GetScene() is scene
        assert output.GetAttribute("RA.notice") == "Research use only, not for diagnosis."
        assert output.GetNodeReference("RA.input") is node
        assert output.GetParentTransformNode() is node.GetParentTransformNode() is not None
    for output in (result.pseudoHealthyNode, result.anomalyMapNode, result.detectionsNode):
        np.testing.assert_array_equal(ijk_to_ras(output), ijk_to_ras(node))  # exactly, not approximately
        assert output.GetImageData().GetDimensions() == node.GetImageData().GetDimensions()
    assert voxels(result.anomalyMapNode).dtype == np.float32 and voxels(result.detectionsNode).dtype == np.uint8

    # The outputs are the engine's results on what the node holds, on the same voxels.
    found = detect(load_model(model_dir), image_from_volume(node))
    anomaly = voxels(result.anomalyMapNode)
    np.testing.assert_allclose(anomaly, found.anomaly.array, rtol=0, atol=1e-6 * float(found.anomaly.array.max()))
    np.testing.assert_array_equal(voxels(result.detectionsNode), found.detections_at().array)
    np.testing.assert_allclose(voxels(result.pseudoHealthyNode), found.pseudo_healthy.array, rtol=0,
                               atol=1e-5 * float(np.abs(found.pseudo_healthy.array).max()))
    assert not anomaly[found.mask.array == 0].any()
    # Written by MRML and read by SimpleITK, they fall on the anatomy where the engine, run on the file SimpleITK
    # reads, puts its results (MRML stores this mirrored scan with k reversed, and the registration then differs
    # in the last digits, hence a correlation, not equality).
    on_file = detect(load_model(model_dir), read_image(scan_file))
    reference = sitk.ReadImage(str(scan_file))
    pulled = {}
    for key, output in (("anomaly", result.anomalyMapNode), ("mask", result.detectionsNode)):
        written = sitk.ReadImage(str(save_volume(output, tmp_path / f"{key}.nrrd")))
        pulled[key] = sitk.GetArrayFromImage(sitk.Resample(written, reference, sitk.Transform(),
                                                           sitk.sitkNearestNeighbor, 0.0, sitk.sitkFloat32))
    brain = on_file.mask.array > 0
    assert np.corrcoef(pulled["anomaly"][brain], on_file.anomaly.array[brain])[0, 1] > 0.95
    flagged = on_file.detections_at().array > 0
    assert 2 * (flagged & (pulled["mask"] > 0)).sum() / (flagged.sum() + (pulled["mask"] > 0).sum()) > 0.8
    # The segment is the label map.
    np.testing.assert_array_equal(segment_array(result.segmentationNode, "Anomaly", node),
                                  voxels(result.detectionsNode))
    segment = result.segmentationNode.GetSegmentation().GetSegment("Anomaly")
    assert segment.GetName() == "Anomaly" and result.segmentationNode.GetSegmentation().GetNumberOfSegments() == 1

    # Report and progress.
    assert result.report["flag_rate"] == read_card(model_dir).calibration.default_flag_rate
    assert result.report["flagged_voxels"] == int(voxels(result.detectionsNode).sum()) > 0
    assert result.report["input"] == "scan" and result.report["notice"].startswith("Research use only")
    done, total = session["calls"][-1]
    assert done == total and all(t == total for _, t in session["calls"])


def test_outputs_are_displayed_with_their_own_colour_tables_and_placed_beside_the_input(session):
    scene, node, result = session["scene"], session["node"], session["result"]
    heat = result.anomalyMapNode.GetDisplayNode()
    assert heat.GetColorNode().GetName() == "RA Anomaly Heat"
    assert heat.GetColorNode().GetNumberOfColors() == 256
    anomaly = voxels(result.anomalyMapNode)
    top = float(np.percentile(anomaly[anomaly > 0], 99.5))
    assert heat.GetWindowLevelMin() == pytest.approx(0.0, abs=1e-6)
    assert heat.GetWindowLevelMax() == pytest.approx(top, rel=0.05)
    labels = result.detectionsNode.GetDisplayNode().GetColorNode()
    assert labels.GetName() == "RA Detections" and labels.GetColorName(1) == "anomaly"
    # The segmentation outlines the detections (the label map fills them) in the detections' green.
    segmentation = result.segmentationNode.GetDisplayNode()
    assert segmentation.GetVisibility() and segmentation.GetVisibility2DOutline()
    assert not segmentation.GetVisibility2DFill()
    segment = result.segmentationNode.GetSegmentation().GetSegment("Anomaly")
    assert segment.GetColor() == pytest.approx(outputs.DETECTION_COLOUR)
    pseudo = result.pseudoHealthyNode.GetDisplayNode()
    assert pseudo.GetColorNodeID() == node.GetDisplayNode().GetColorNodeID()  # greyscale, like the input
    # The input sits in a study: the outputs go beside it, each once.
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    for output in (result.pseudoHealthyNode, result.anomalyMapNode, result.detectionsNode, result.segmentationNode):
        assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(output)) == session["study"]
    children = vtk.vtkIdList()
    hierarchy.GetItemChildren(session["study"], children)
    assert children.GetNumberOfIds() == 5  # the input and its four outputs
    # The parameter node records inputs, outputs and report.
    params = session["logic"].parameters
    assert params.inputVolume is node and params.output("anomalyMap") is result.anomalyMapNode
    assert params.report["flagged_voxels"] == result.report["flagged_voxels"]
    assert params.device == "cpu"


def test_input_node_is_never_modified(session):
    assert node_checksum(session["node"]) == session["before"]


def test_a_rerun_updates_the_same_nodes(session, model_dir):
    scene, node, logic, first = session["scene"], session["node"], session["logic"], session["result"]
    count, ids = scene.GetNumberOfNodes(), [n.GetID() for n in (first.pseudoHealthyNode, first.anomalyMapNode,
                                                                   first.detectionsNode, first.segmentationNode)]
    again = logic.detect(node, model=str(model_dir), device="cpu", flagRate=0.02)
    assert scene.GetNumberOfNodes() == count
    assert [n.GetID() for n in (again.pseudoHealthyNode, again.anomalyMapNode, again.detectionsNode,
                                again.segmentationNode)] == ids
    assert again.report["flag_rate"] == 0.02 and logic.parameters.flagRate == 0.02
    assert again.report["flagged_voxels"] < first.report["flagged_voxels"]
    assert node_checksum(node) == session["before"]
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    children = vtk.vtkIdList()
    hierarchy.GetItemChildren(session["study"], children)
    assert children.GetNumberOfIds() == 5, "a re-run moves or adds nothing in the subject hierarchy"


def test_cancelling_leaves_the_scene_exactly_as_it_was(session, model_dir):
    scene, node, logic = session["scene"], session["node"], session["logic"]
    before = scene_snapshot(scene)
    report = logic.parameters.report
    with pytest.raises(Cancelled):
        logic.detect(node, model=str(model_dir), device="cpu", progress=lambda done, total: False)
    assert scene_snapshot(scene) == before
    assert logic.parameters.report == report
    # A fresh scene stays empty: no parameter node, no subject hierarchy, no colour table.
    fresh = ViewScene()
    volume = load_volume(fresh.scene, MNI, "mni")
    before = scene_snapshot(fresh.scene)
    with pytest.raises(Cancelled):
        RALogic(fresh.scene).detect(volume, model=str(model_dir), device="cpu", progress=lambda done, total: False)
    assert scene_snapshot(fresh.scene) == before


def test_detection_starts_at_once_reports_progress_and_cancels_through_a_launcher_that_forwards_no_signal(
        session, model_dir, tmp_path):
    """startDetection returns at once and the job reports before PyTorch is loaded; poll() never blocks. Behind a
    stand-in for PythonSlicer (which dies of SIGTERM and passes nothing on), cancel stops the engine itself, within
    a batch: the task ends with Cancelled and the engine's own exit status, no process is left, the scene is as it
    was."""
    scene, node = session["scene"], session["node"]
    logic = RALogic(scene, python=str(write_standin_launcher(tmp_path)))
    before = scene_snapshot(scene)
    started = time.monotonic()
    task = logic.startDetection(node, model=str(model_dir), device="cpu")
    assert time.monotonic() - started < 2.0 and task.running
    events, first = [], None
    while task.running and not any(e["event"] == "step" for e in events):
        polled = time.monotonic()
        events += task.poll()
        assert time.monotonic() - polled < 0.5, "poll() blocked"
        if events and first is None:
            first = time.monotonic() - started
        time.sleep(0.02)
    assert events[0]["event"] == "start" and "Loading PyTorch" in events[0]["message"]
    assert first is not None and first < 30.0
    assert task.progress is not None and task.progress[1] > 0
    engine = task.enginePid
    assert engine is not None and process_exists(engine)
    task.cancel()
    with pytest.raises(Cancelled, match="nothing was added"):
        task.wait()
    assert task.returncode == 130, task.log
    assert not process_exists(engine) and not group_exists(task.pid)
    assert scene_snapshot(scene) == before and task.result is None
    logic.cleanup()


def test_detection_never_loads_torch_in_the_calling_process(model_dir, scan_file, tmp_path):
    """The network, the model and LPIPS load in the child process only: a fresh process that runs a detection
    through RALogic has not imported torch at its end."""
    code = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from fixtures_mrml import ViewScene, load_volume
from RALogic import RALogic
views = ViewScene()
node = load_volume(views.scene, {str(scan_file)!r}, "scan")
result = RALogic(views.scene).detect(node, model={str(model_dir)!r}, device="cpu")
assert result.report["flagged_voxels"] > 0
print(sorted(m for m in ("torch", "lpips", "torchvision") if m in sys.modules))
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_unusable_inputs_are_refused_with_the_scene_unchanged(session, model_dir, tmp_path):
    scene, logic, node = session["scene"], session["logic"], session["node"]
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "labels")
    set_volume_from_image(labelmap, image_from_volume(node), dtype=np.uint8)
    rgb = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "photo")
    image = vtk.vtkImageData()
    image.SetDimensions(8, 8, 1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 3)
    rgb.SetAndObserveImageData(image)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    frame = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "frame")
    set_volume_from_image(frame, image_from_volume(node))
    sequences = slicer.vtkSlicerSequencesLogic()  # registers the sequence node classes, as the application does
    sequences.SetMRMLScene(scene)
    browser = scene.AddNewNodeByClass("vtkMRMLSequenceBrowserNode", "cine")
    sequence = scene.AddNewNodeByClass("vtkMRMLSequenceNode", "cine frames")
    browser.SetAndObserveMasterSequenceNodeID(sequence.GetID())
    browser.AddProxyNode(frame, sequence, False)
    other = ViewScene().scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "elsewhere")
    set_volume_from_image(other, image_from_volume(node))
    xray_dir = make_model(tmp_path / "xray", "xray")
    card = read_card(xray_dir)
    card.calibration = calibration_table(np.random.default_rng(0).random(5000))
    write_card(xray_dir, card)
    uncalibrated = make_model(tmp_path / "raw", "brain-mri")
    ct = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    set_volume_from_image(ct, image_from_volume(node))
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = hierarchy.CreateItem(hierarchy.GetSceneItemID(), ct)
    hierarchy.SetItemAttribute(item, "DICOM.Modality", "CT")

    before = scene_snapshot(scene)
    model = str(model_dir)
    cases = [
        (labelmap, model, DataError, "label map"),
        (rgb, model, DataError, "3 components"),
        (empty, model, DataError, "no voxels"),
        (frame, model, DataError, "sequence 'cine'"),
        (other, model, DataError, "not in this logic's scene"),
        (node, str(uncalibrated), ModelError, "no calibration"),
        (node, str(xray_dir), ModelError, "xray model"),
        (node, str(tmp_path / "missing"), ModelError, "neither a model directory"),
        (ct, model, ModelError, "DICOM CT"),
    ]
    for volume, chosen, error, message in cases:
        with pytest.raises(error, match=message):
            logic.detect(volume, model=chosen, device="cpu")
        assert scene_snapshot(scene) == before, message
    with pytest.raises(DataError, match="no input volume"):  # none given, none on the parameter node
        RALogic(ViewScene().scene).detect(model=model)
    with pytest.raises(ValueError, match="flag rate 5 is outside"):
        logic.detect(node, model=model, flagRate=5)
    with pytest.raises(ValueError, match="device 'tpu'"):
        logic.detect(node, model=model, device="tpu")
    assert scene_snapshot(scene) == before
    for extra in (labelmap, rgb, empty, frame, browser, sequence, ct):
        scene.RemoveNode(extra)
    sequences.SetMRMLScene(None)


def test_an_error_while_writing_outputs_leaves_no_new_node(session, monkeypatch):
    node, result = session["node"], session["result"]
    fresh = ViewScene().scene
    copy = fresh.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "copy")
    set_volume_from_image(copy, image_from_volume(node), ijk_to_ras(node))
    anomaly = image_from_volume(result.anomalyMapNode)
    results = (image_from_volume(result.pseudoHealthyNode), anomaly,
               Image((anomaly.array > 0).astype(np.uint8), anomaly.geometry),
               image_from_volume(result.detectionsNode, dtype=np.uint8))

    def broken(*args):
        raise RuntimeError("disk full")

    before = [entry[:3] for entry in scene_snapshot(fresh)]
    with monkeypatch.context() as patch:
        patch.setattr(outputs, "_set_segment", broken)
        with pytest.raises(RuntimeError, match="disk full"):
            outputs.write_outputs(fresh, copy, ijk_to_ras(copy), *results)
    assert [entry[:3] for entry in scene_snapshot(fresh)] == before
    made = outputs.write_outputs(fresh, copy, ijk_to_ras(copy), *results)
    assert outputs.write_outputs(fresh, copy, ijk_to_ras(copy), *results) == made == outputs.find_outputs(fresh, copy)
    # No parent in the subject hierarchy: the outputs go to the folder "RA results".
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(fresh)
    folder = hierarchy.GetItemParent(hierarchy.GetItemByDataNode(made["anomalyMap"]))
    assert hierarchy.GetItemName(folder) == "RA results"
    assert hierarchy.GetItemParent(folder) == hierarchy.GetSceneItemID()


def test_a_new_flag_rate_changes_the_detections_without_the_network(session, monkeypatch):
    from ra_engine.network.model import Decoder, ReversedAutoEncoder

    def no_network(*args, **kwargs):
        raise AssertionError("the network ran")

    monkeypatch.setattr(ReversedAutoEncoder, "reconstruct", no_network)
    monkeypatch.setattr(ReversedAutoEncoder, "forward", no_network)
    monkeypatch.setattr(Decoder, "forward", no_network)
    scene, logic, node = session["scene"], session["logic"], session["node"]
    count = scene.GetNumberOfNodes()
    anomaly = voxels(session["result"].anomalyMapNode)
    flagged = {}
    for rate in (0.001, 0.01, 0.2):
        result = logic.setFlagRate(rate)
        labels = voxels(result.detectionsNode)
        expected = (anomaly >= result.report["threshold"]) & (anomaly > 0)
        np.testing.assert_array_equal(labels, expected.astype(np.uint8))
        np.testing.assert_array_equal(segment_array(result.segmentationNode, "Anomaly", node), labels)
        assert result.report["flag_rate"] == rate and result.report["flagged_voxels"] == labels.sum()
        assert logic.parameters.flagRate == rate and logic.parameters.report["flag_rate"] == rate
        flagged[rate] = int(labels.sum())
    assert flagged[0.001] < flagged[0.01] < flagged[0.2]
    assert scene.GetNumberOfNodes() == count
    with pytest.raises(ValueError, match="outside"):
        logic.setFlagRate(0.5)
    assert node_checksum(node) == session["before"]


def test_no_mrml_collection_is_leaked_by_detection_flag_rates_and_display(session, model_dir):
    """vtkMRMLScene.GetNodesByClass and GetNodesByClassByName hand their caller a new vtkCollection to release: every
    one the logic asks for during a detection, flag-rate changes, opacity changes and showing the results must be
    freed again (only the reference this test keeps may be left)."""
    scene, logic, node = session["scene"], session["logic"], session["node"]
    handed_out = []
    names = ("GetNodesByClass", "GetNodesByClassByName")
    for name in names:
        def spy(*args, name=name):
            collection = getattr(type(scene), name)(scene, *args)
            handed_out.append(collection)
            return collection

        setattr(scene, name, spy)  # on this scene object only; removed below (the scene must not refer to itself)
    try:
        logic.detect(node, model=str(model_dir), device="cpu", flagRate=0.05)
        for rate in (0.01, 0.02, 0.05):
            logic.setFlagRate(rate)
        for opacity in (0.2, 0.5):
            logic.setOpacity(opacity)
        logic.showResults()
    finally:
        for name in names:
            delattr(scene, name)
    leaked = [c.GetReferenceCount() - 1 for c in handed_out if c.GetReferenceCount() > 1]
    assert not leaked, f"{len(leaked)} of {len(handed_out)} collections handed out by the scene were not released"


# ---- files and scenes -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extension", [".nrrd", ".nii.gz"])
def test_outputs_saved_and_reloaded_keep_geometry_and_values(session, tmp_path, extension):
    result = session["result"]
    fresh = slicer.vtkMRMLScene()
    for output, labelmap in ((result.pseudoHealthyNode, False), (result.anomalyMapNode, False),
                             (result.detectionsNode, True)):
        path = save_volume(output, tmp_path / f"output{extension}")
        reloaded = load_volume(fresh, path, output.GetName(), labelmap=labelmap)
        np.testing.assert_allclose(ijk_to_ras(reloaded), ijk_to_ras(output), atol=1e-4)  # NIfTI stores float32
        np.testing.assert_array_equal(voxels(reloaded), voxels(output))
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(tmp_path / "detections.seg.nrrd"))
    assert storage.WriteData(result.segmentationNode)
    segmentation = fresh.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    assert storage.ReadData(segmentation)
    np.testing.assert_array_equal(segment_array(segmentation, "Anomaly", session["node"]),
                                  voxels(result.detectionsNode))
    assert segmentation.GetSegmentation().GetSegment("Anomaly").GetColor() == pytest.approx(outputs.DETECTION_COLOUR)


def test_parameters_survive_saving_and_loading_the_scene(session, tmp_path):
    scene, logic = session["scene"], session["logic"]
    params = logic.parameters
    params.opacity = 0.3
    params.flagRate = 0.004
    params.model = "brain-t1-demo"
    params.device = "cpu"
    report = params.report
    application = slicer.vtkMRMLApplicationLogic()
    application.SetMRMLScene(scene)
    (tmp_path / "bundle").mkdir()
    assert application.SaveSceneToSlicerDataBundleDirectory(str(tmp_path / "bundle"), None)

    loaded = ViewScene().scene
    loaded.SetURL(str(tmp_path / "bundle" / "bundle.mrml"))
    assert loaded.Import()
    restored = RALogic(loaded).parameters
    assert restored.node.GetAttribute(MODULE_NAME_ATTRIBUTE) == MODULE_NAME
    assert (restored.opacity, restored.flagRate, restored.model, restored.device) == (0.3, 0.004, "brain-t1-demo",
                                                                                       "cpu")
    assert restored.report == json.loads(json.dumps(report))
    assert restored.inputVolume.GetName() == "scan"
    np.testing.assert_array_equal(voxels(restored.inputVolume), voxels(session["node"]))
    for role, output in params.outputs.items():
        assert restored.output(role).GetName() == output.GetName()
        assert restored.output(role).GetNodeReference("RA.input") is restored.inputVolume
    assert outputs.find_outputs(loaded, restored.inputVolume) == restored.outputs
    heat = restored.output("anomalyMap").GetDisplayNode().GetColorNode()
    assert heat.GetName() == "RA Anomaly Heat"


def test_parameter_values_are_validated(session):
    params = RAParameters(session["logic"].getParameterNode())
    for name, value, message in [("flagRate", 0.5, "outside 0.001 to 0.2"), ("flagRate", 5, "did you mean 0.05"),
                                 ("flagRate", "x", "not a number"), ("opacity", 1.5, "outside 0"),
                                 ("opacity", float("nan"), "outside 0"), ("device", "gpu", "not one of"),
                                 ("model", " ", "not empty")]:
        with pytest.raises(ValueError, match=message):
            setattr(params, name, value)
    params.flagRate = None
    assert params.flagRate is None
    with pytest.raises(ValueError, match="scalar volume"):
        params.inputVolume = session["result"].segmentationNode


# ---- the scene closes -------------------------------------------------------------------------------------------


def test_closing_the_scene_during_a_job_writes_nothing_and_drops_the_kept_detection(session, model_dir):
    scene, logic, node = session["scene"], session["logic"], session["node"]
    logic.setFlagRate(0.05)  # a detection is kept

    def close_scene(done, total):
        scene.Clear(0)
        return True

    with pytest.raises(SceneClosed, match="closed while detection ran"):
        logic.detect(node, model=str(model_dir), device="cpu", progress=close_scene)
    assert scene.GetNodesByClass("vtkMRMLScalarVolumeNode").GetNumberOfItems() == 0
    assert scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0
    with pytest.raises(RAError, match="run detection first"):
        logic.setFlagRate(0.01)
    with pytest.raises(DataError, match="not in this logic's scene"):
        logic.detect(node, model=str(model_dir))


def test_the_parameter_node_keeps_its_tag_when_the_scene_is_closed(session):
    """Closing the scene keeps the singleton parameter node but resets it, attributes included: the logic tags it
    again ("ModuleName", as ScriptedLoadableModuleLogic does), with its values back at their defaults."""
    scene, logic = session["scene"], session["logic"]
    node = logic.getParameterNode()
    assert node.GetAttribute(MODULE_NAME_ATTRIBUTE) == MODULE_NAME and node.GetSingletonTag() == MODULE_NAME
    logic.parameters.opacity = 0.9
    scene.Clear(0)
    again = logic.getParameterNode()
    assert again is node and again.GetAttribute(MODULE_NAME_ATTRIBUTE) == MODULE_NAME
    assert logic.parameters.opacity == 0.5 and logic.parameters.report is None
    assert scene.GetNodesByClass("vtkMRMLScriptedModuleNode").GetNumberOfItems() == 1


def test_importing_ralogic_imports_neither_torch_nor_qt():
    import subprocess

    code = ("import sys, RALogic, RALogic.logic, RALogic.outputs, RALogic.display, RALogic.parameters, "
            "RALogic.geometry; from RALogic import RALogic as L; "
            "bad = [m for m in ('torch', 'qt', 'ctk', 'slicer.app') if m in sys.modules]; print(bad); "
            "sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
