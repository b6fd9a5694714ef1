"""What the user sees: RALogic's results shown in a slice view and rendered headless by vtkMRMLSliceLogic (no
OpenGL; written to PNG under the test's tmp_path). The detections label layer lies exactly on the flagged voxels,
the heat overlay only where the anomaly map is above 0 and only at a non-zero opacity; with the bundled demonstration
model, a synthetic lesion in an unseen brain is flagged in the picture and the brain far from it mostly is not, and
that picture is the one docs/SLICER.md shows (RA_WRITE_DOC_IMAGES=1 writes it there instead of comparing)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk
from scipy import ndimage
from vtk.util import numpy_support

from fixtures_mrml import ViewScene, ijk_to_ras, load_volume, voxels
from ra_engine.core.samples import insert_lesion, LESION_CENTRE_LPS, LESION_RADIUS_MM, TEST_SCAN
from ra_engine.io.images import read_image
from RALogic import RALogic
from RALogic.geometry import ras_of_index
from RALogic.outputs import DETECTION_COLOUR
from RALogic.sample import DEMO_MODEL as BUNDLED_MODEL, insertSyntheticLesion, sampleScanPath
from test_detect import MNI, RESOURCES, calibrate, make_model

DEMO_MODEL = RESOURCES / "models" / BUNDLED_MODEL
GREEN = np.round(np.asarray(DETECTION_COLOUR) * 255)
DOC_IMAGE = Path(__file__).resolve().parents[1] / "docs" / "images" / "slicer_slice_view.png"
DOC_VIEW_SIZE = (384, 384)


@pytest.fixture(scope="module", autouse=True)
def offline_lpips(alex_safetensors, tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RA_LPIPS_WEIGHTS", str(alex_safetensors))
        patch.setenv("RA_MODELS_DIR", str(tmp_path_factory.mktemp("registry")))  # only bundled models by name
        yield


def sample(node, pixels_xy_to_ras: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """The node's voxel (nearest) under each pixel of a rendered view, rows top to bottom like the picture."""
    height, width = shape
    columns, rows = np.meshgrid(np.arange(width), np.arange(height))
    points = np.stack([columns.ravel(), rows.ravel(), np.zeros(columns.size), np.ones(columns.size)])
    ijk = np.rint((np.linalg.inv(ijk_to_ras(node)) @ pixels_xy_to_ras @ points)[:3]).astype(int)
    array = voxels(node)
    inside = np.all((ijk >= 0) & (ijk < np.array(array.shape[::-1])[:, None]), 0)
    values = np.zeros(columns.size, array.dtype)
    values[inside] = array[ijk[2, inside], ijk[1, inside], ijk[0, inside]]
    return values.reshape(height, width)[::-1]


def ras_of_pixels(pixels_xy_to_ras: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) RAS point of each pixel, rows top to bottom."""
    height, width = shape
    columns, rows = np.meshgrid(np.arange(width), np.arange(height))
    points = np.stack([columns.ravel(), rows.ravel(), np.zeros(columns.size), np.ones(columns.size)])
    return (pixels_xy_to_ras @ points)[:3].T.reshape(height, width, 3)[::-1]


def is_green(pixels: np.ndarray) -> np.ndarray:
    return np.all(np.abs(pixels[..., :3].astype(int) - GREEN) <= 2, axis=-1)


def is_grey(pixels: np.ndarray) -> np.ndarray:
    rgb = pixels[..., :3].astype(int)
    return (np.abs(rgb[..., 0] - rgb[..., 1]) <= 2) & (np.abs(rgb[..., 2] - rgb[..., 1]) <= 2)


def read_png(path) -> np.ndarray:
    reader = vtk.vtkPNGReader()
    reader.SetFileName(str(path))
    reader.Update()
    return reader.GetOutput()


@pytest.fixture(scope="module")
def shown(tmp_path_factory):
    """A tiny calibrated model's results on the MNI scan, shown in the axial (Red) view."""
    from ra_engine.detection.pipeline import detect
    from ra_engine.models.modeldir import load_model

    model_dir = make_model(tmp_path_factory.mktemp("models") / "brain", "brain-mri")
    calibrate(model_dir, [detect(load_model(model_dir), read_image(MNI))])
    views = ViewScene()
    node = load_volume(views.scene, MNI, "mni")
    logic = RALogic(views.scene)
    result = logic.detect(node, model=str(model_dir), device="cpu")
    logic.showResults()
    return views, logic, node, result


def test_the_layers_show_input_heat_overlay_and_detections_where_they_are(shown, tmp_path):
    views, logic, node, result = shown
    composite = views.slice_logics["Red"].GetSliceCompositeNode()
    assert (composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID(), composite.GetLabelVolumeID()) == (
        node.GetID(), result.anomalyMapNode.GetID(), result.detectionsNode.GetID())
    assert composite.GetForegroundOpacity() == 0.5
    labels = voxels(result.detectionsNode)
    k = int(np.argmax(labels.sum(axis=(1, 2))))  # the axial slice with most detections
    offset = float(ras_of_index(ijk_to_ras(node), (0, 0, k))[2])
    png = tmp_path / "detections.png"
    pixels, xy_to_ras = views.render("Red", offset, png)
    assert png.is_file() and read_png(png).GetDimensions()[:2] == (pixels.shape[1], pixels.shape[0])

    flagged = sample(result.detectionsNode, xy_to_ras, pixels.shape[:2]) > 0
    anomaly = sample(result.anomalyMapNode, xy_to_ras, pixels.shape[:2])
    green = is_green(pixels)
    assert flagged.sum() > 20
    assert (green == flagged).mean() > 0.995  # the label layer lies on the flagged voxels
    # The heat overlay: nothing where A is 0 (outside the brain; 2 pixels off its edge, which the overlay's linear
    # interpolation blurs), a red tint where A is high but not flagged.
    outside = ~ndimage.binary_dilation(anomaly > 0, iterations=2)
    assert outside.sum() > 1000 and is_grey(pixels[outside]).all()
    top = result.anomalyMapNode.GetDisplayNode().GetWindowLevelMax()
    hot = (anomaly > 0.6 * top) & ~flagged
    rgb = pixels[hot][:, :3].astype(int)
    assert hot.sum() > 20 and np.mean(rgb[:, 0] > rgb[:, 2] + 20) > 0.9

    # Opacity 0: the heat overlay is gone, the detections stay.
    logic.setOpacity(0.0)
    assert composite.GetForegroundOpacity() == 0.0 and logic.parameters.opacity == 0.0
    clear, _ = views.render("Red", offset, tmp_path / "opacity0.png")
    assert (is_green(clear) == flagged).mean() > 0.995
    assert is_grey(clear[~flagged]).mean() > 0.98
    logic.setOpacity(0.5)


@pytest.mark.skipif(not (DEMO_MODEL / "model.json").is_file(),
                    reason=f"the bundled brain model {DEMO_MODEL} is not there")
def test_the_bundled_brain_model_flags_a_synthetic_lesion_in_the_rendered_slice(tmp_path):
    scan, truth = insert_lesion(read_image(TEST_SCAN))
    path = tmp_path / "lesioned.nii.gz"
    sitk.WriteImage(scan.to_sitk(), str(path))
    views = ViewScene(size=DOC_VIEW_SIZE)
    node = load_volume(views.scene, path, "lesioned")
    logic = RALogic(views.scene)
    result = logic.detect(node, model=BUNDLED_MODEL, device="cpu")
    logic.setOpacity(0.5)  # what the panel does after a detection, at its default opacity
    logic.showResults()
    centre_ras = np.asarray(LESION_CENTRE_LPS) * (-1.0, -1.0, 1.0)
    png = tmp_path / "lesion.png"
    pixels, xy_to_ras = views.render("Red", float(centre_ras[2]), png)
    assert png.is_file()
    if os.environ.get("RA_WRITE_DOC_IMAGES") == "1":
        DOC_IMAGE.parent.mkdir(parents=True, exist_ok=True)
        DOC_IMAGE.write_bytes(png.read_bytes())
    assert DOC_IMAGE.is_file(), f"{DOC_IMAGE} is missing: run this test with RA_WRITE_DOC_IMAGES=1 to write it"
    documented = numpy_support.vtk_to_numpy(read_png(DOC_IMAGE).GetPointData().GetScalars())
    rendered = numpy_support.vtk_to_numpy(read_png(png).GetPointData().GetScalars())
    assert documented.shape == rendered.shape, "the documented slice view has another size: write it again"
    same = np.all(np.abs(documented.astype(int) - rendered.astype(int)) <= 10, axis=-1).mean()
    assert same > 0.98, (f"the slice view in docs/SLICER.md is no longer the panel's result ({same:.1%} of its "
                         "pixels agree): run this test with RA_WRITE_DOC_IMAGES=1 and look at the new picture")

    distance = np.linalg.norm(ras_of_pixels(xy_to_ras, pixels.shape[:2]) - centre_ras, axis=-1)
    brain = sample(result.anomalyMapNode, xy_to_ras, pixels.shape[:2]) > 0
    lesion = distance < LESION_RADIUS_MM - 2.0
    far = brain & (distance > 3 * LESION_RADIUS_MM)
    green = is_green(pixels)
    assert lesion.sum() > 50 and far.sum() > 1000
    in_lesion, elsewhere = green[lesion].mean(), green[far].mean()
    assert in_lesion > 0.3, f"only {in_lesion:.0%} of the lesion's pixels are flagged"
    assert elsewhere < 0.1, f"{elsewhere:.0%} of the brain far from the lesion is flagged"
    assert in_lesion > 5 * elsewhere


def test_the_sample_helper_puts_ra_demos_lesion_into_a_volume_node():
    """What the self-test and the user guide use: the bundled sample loaded by MRML, `ra demo`'s lesion written into
    the node's voxels through RALogic (the panel needs nothing of the engine), on the node's own grid."""
    views = ViewScene()
    node = load_volume(views.scene, sampleScanPath(), "RAColin27Head")
    matrix = ijk_to_ras(node)
    lesion = insertSyntheticLesion(node)
    scan, truth = insert_lesion(read_image(TEST_SCAN))
    assert lesion.dtype == bool and lesion.shape == voxels(node).shape and lesion.sum() > 1000
    np.testing.assert_array_equal(lesion, truth.astype(bool))
    np.testing.assert_allclose(voxels(node), scan.array, rtol=0, atol=1e-3)
    np.testing.assert_array_equal(ijk_to_ras(node), matrix)
