"""Detection end to end with tiny untrained models and the real LPIPS-alex weights: results on the input's exact grid
for anisotropic, oblique and flipped scans made from a bundled brain under a known transform; batched inference
equal to a one-slice-at-a-time reading; thresholds from the calibration without the network; regions in physical
units; radiographs; and the refusals (model/modality mismatch, unusable images, cancellation)."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom.data
import pytest
import SimpleITK as sitk
import torch
from skimage.util import img_as_uint

from ra_engine.thresholds.table import calibration_table, score_distribution
from ra_engine.detection.result import Detection
from ra_engine.detection.pipeline import detect, detect_array, detect_slices
from ra_engine.core.errors import Cancelled, DataError, ModelError
from ra_engine.core.image import Geometry, Image
from ra_engine.io.images import read_image
from ra_engine.network.config import ArchConfig
from ra_engine.network.model import ReversedAutoEncoder
from ra_engine.models.card import read_card, write_card
from ra_engine.models.card import ModelCard
from ra_engine.models.modeldir import load_model, save_model_dir
from ra_engine.preprocess.presets import preset_config, PresetConfig
from ra_engine.preprocess.pipeline import preprocess
from ra_engine.detection.regions import find_regions

RESOURCES = Path(__file__).resolve().parents[1] / "ra_engine" / "resources"
MNI = RESOURCES / "samples" / "mni152_2009a_t1.nii.gz"
BUNDLED_DEMO = RESOURCES / "models" / "brain-t1-demo"
SIZE = 32


# ---- helpers shared with test_detect_cli.py --------------------------------------------------------------------


def make_model(directory: Path, preset: str, seed: int = 0) -> Path:
    """A tiny untrained RA (32 x 32 slices) with the `preset` section of the card, not calibrated."""
    torch.manual_seed(seed)
    arch = ArchConfig(image_size=SIZE, latent_dim=16, widths=(8, 16, 16))
    card = ModelCard(name=directory.name, architecture=arch, preset=preset_config(preset, image_size=SIZE))
    save_model_dir(directory, ReversedAutoEncoder(arch).state_dict(), card)
    return directory


def calibrate(directory: Path, found: list[Detection]) -> dict:
    """Writes a calibration section made from detections on normal scans into the card, as `ra calibrate` does."""
    card = read_card(directory)
    values = np.concatenate([f.anomaly_stack[f.slices.masks] for f in found])
    card.calibration = replace(calibration_table(values),
                               slice_scores=score_distribution([s["score"] for f in found for s in f.slice_scores]),
                               scan_scores=score_distribution([f.scan_score for f in found]))
    write_card(directory, card)
    return card.calibration


def rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.radians(degrees)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def affine(matrix: np.ndarray) -> sitk.AffineTransform:
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([float(v) for v in matrix[:3, :3].ravel()])
    transform.SetTranslation([float(v) for v in matrix[:3, 3]])
    return transform


def resampled(image: Image, direction: np.ndarray, spacing, known: np.ndarray) -> Image:
    """`image`'s anatomy on a new grid with `direction` (columns: the axes, LPS) and `spacing`, covering all of it;
    `known` (4x4) maps a point of the new scan to the point of `image` that it shows."""
    source = image.to_sitk()
    corners = np.array([source.TransformContinuousIndexToPhysicalPoint([float(v) for v in c]) for c in
                        np.stack(np.meshgrid(*[[-0.5, s - 0.5] for s in source.GetSize()], indexing="ij"), -1)
                        .reshape(-1, 3)])
    inverse = np.linalg.inv(known)
    along_axes = (corners @ inverse[:3, :3].T + inverse[:3, 3]) @ direction
    low, high = along_axes.min(0), along_axes.max(0)
    grid = sitk.Image([int(np.ceil((h - l) / s)) + 1 for l, h, s in zip(low, high, spacing)], sitk.sitkFloat32)
    grid.SetSpacing([float(s) for s in spacing])
    grid.SetOrigin([float(v) for v in direction @ low])
    grid.SetDirection([float(v) for v in direction.ravel()])
    return Image.from_sitk(sitk.Resample(source, grid, affine(known), sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def on_grid_of(result: Image, known: np.ndarray, target: Image, interpolation=sitk.sitkNearestNeighbor) -> np.ndarray:
    """A result on a resampled scan's grid pulled back onto the original scan's grid through `known`."""
    return sitk.GetArrayFromImage(sitk.Resample(result.to_sitk(), target.to_sitk(), affine(np.linalg.inv(known)),
                                                interpolation, 0.0, sitk.sitkFloat32))


# ---- fixtures ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mni() -> Image:
    return read_image(MNI)


@pytest.fixture(scope="module")
def brain_dir(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "brain", "brain-mri")


@pytest.fixture(scope="module")
def found_mni(brain_dir, mni, scorer) -> Detection:
    return detect(load_model(brain_dir), mni, scorer)


@pytest.fixture(scope="module")
def brain(brain_dir, found_mni):
    calibrate(brain_dir, [found_mni])
    return load_model(brain_dir)


@pytest.fixture(scope="module")
def mni_slices(brain, mni):
    return preprocess(mni, brain.card.preset)


@pytest.fixture(scope="module")
def xray(tmp_path_factory):
    return load_model(make_model(tmp_path_factory.mktemp("models") / "xray", "xray"))


def radiograph(name: str = "RG1_UNCI.dcm") -> Image:
    return read_image(pydicom.data.get_testdata_file(name))


# ---- geometry ---------------------------------------------------------------------------------------------------

CENTRE = np.array([0.0, -18.0, 18.0])
MOTION = np.eye(4)
MOTION[:3, :3] = rotation((0.0, 0.2, 1.0), 12.0)
MOTION[:3, 3] = np.array([5.0, -8.0, 3.0]) + CENTRE - MOTION[:3, :3] @ CENTRE
GRIDS = {  # direction (columns: the image axes in LPS), spacing (mm), known motion of the anatomy
    "anisotropic": (np.eye(3), (1.1, 1.4, 2.6), np.eye(4)),
    "oblique": (rotation((0.3, 1.0, 0.2), 25.0), (1.5, 1.5, 1.5), MOTION),
    "flipped": (np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), (2.0, 1.0, 1.2), np.eye(4)),
}


@pytest.mark.parametrize("grid", GRIDS)
def test_results_lie_on_the_input_grid_over_the_same_anatomy(grid, brain, mni, found_mni, scorer):
    direction, spacing, known = GRIDS[grid]
    scan = resampled(mni, direction, spacing, known)
    found = detect(brain, scan, scorer)
    for result in (found.pseudo_healthy, found.anomaly, found.mask, found.detections_at()):
        assert result.array.shape == scan.array.shape
        assert result.geometry == scan.geometry
    assert found.anomaly.array.dtype == np.float32 and found.mask.array.dtype == np.uint8
    assert not found.anomaly.array[found.mask.array == 0].any()
    # Pulled back through the known transform, the brain and its anomaly map fall where they fall on the original.
    brain_back = on_grid_of(found.mask, known, mni) > 0
    brain_mni = found_mni.mask.array > 0
    assert 2 * (brain_back & brain_mni).sum() / (brain_back.sum() + brain_mni.sum()) > 0.96
    both = brain_back & brain_mni  # the brain is nearly symmetric: a left-right mirror is told by the map
    anomaly_back = on_grid_of(found.anomaly, known, mni, sitk.sitkLinear)
    assert np.corrcoef(anomaly_back[both], found_mni.anomaly.array[both])[0, 1] > 0.85
    # The pseudo-healthy scan is in the input's intensity units: its brain is as bright as the scan's.
    inside = found.mask.array > 0
    ratio = np.median(found.pseudo_healthy.array[inside]) / np.median(scan.array[inside])
    assert 0.2 < ratio < 5


# ---- batched inference -----------------------------------------------------------------------------------------


def test_batched_detection_equals_the_per_slice_path(brain, mni, mni_slices, scorer):
    slices, batch = mni_slices, 7
    found = detect_slices(brain, slices, scorer, mni.geometry, batch_size=batch)
    # The straightforward reading: the network on one slice, the scorer on one slice, no batching anywhere.
    used = np.flatnonzero(slices.masks.any((1, 2)))
    x_ph, anomaly = np.zeros_like(slices.images), np.zeros_like(slices.images)
    for i in used:
        x = torch.from_numpy(slices.images[i])[None, None]
        with torch.no_grad():
            rec = brain.network.reconstruct(x)
        x_ph[i] = rec[0, 0].numpy()
        anomaly[i] = scorer.score(x, rec).anomaly[0] * slices.masks[i]
    space = slices.space
    low, high = space.intensity_range
    expected_ph = space.to_input_intensity(space.to_input_grid(x_ph, positions=slices.positions))
    np.testing.assert_allclose(found.pseudo_healthy.array, expected_ph, rtol=0, atol=1e-5 * (high - low))
    # Given the same reconstructions, the batched scorer gives the one-slice maps everywhere.
    images = torch.from_numpy(slices.images[used])[:, None]
    rebatched = np.concatenate([scorer.score(images[k:k + batch], torch.from_numpy(x_ph[used][k:k + batch])[:, None])
                                .anomaly for k in range(0, used.size, batch)])
    np.testing.assert_allclose(rebatched * slices.masks[used], anomaly[used], rtol=0, atol=1e-5)
    # CLAHE sees a reconstruction as 16-bit integers (skimage's img_as_uint): the network's batched and one-slice
    # outputs may differ in the last float bit (oneDNN splits work by batch), which can move a pixel across a step
    # and change that slice's CLAHE tiles. On every slice where CLAHE sees the same values, the maps agree.
    with torch.inference_mode():
        batched_ph = np.concatenate([brain.network.reconstruct(images[k:k + batch])[:, 0].numpy()
                                     for k in range(0, used.size, batch)])
    same = np.array([np.array_equal(img_as_uint(a), img_as_uint(b)) for a, b in zip(batched_ph, x_ph[used])])
    assert same.mean() > 0.5
    np.testing.assert_allclose(found.anomaly_stack[used][same], anomaly[used][same], rtol=0, atol=1e-5)
    assert found.scan_score == pytest.approx(float(anomaly[slices.masks].mean()), rel=1e-5 if same.all() else 1e-2)


def test_inference_runs_in_bounded_batches_without_graphs(brain, mni, mni_slices, scorer, monkeypatch):
    slices = mni_slices
    seen = []
    reconstruct, score = brain.inference_network.reconstruct, scorer.score

    def spy_reconstruct(x):
        seen.append((x.shape[0], torch.is_inference_mode_enabled()))
        return reconstruct(x)

    def spy_score(x, rec):
        assert not rec.requires_grad and rec.grad_fn is None
        return score(x, rec)

    monkeypatch.setattr(brain.inference_network, "reconstruct", spy_reconstruct)
    monkeypatch.setattr(scorer, "score", spy_score)
    found = detect_slices(brain, slices, scorer, mni.geometry, batch_size=6)
    used = int(slices.masks.any((1, 2)).sum())
    assert [n for n, _ in seen] == [6] * (used // 6) + ([used % 6] if used % 6 else [])
    assert all(inference for _, inference in seen)
    assert not any(isinstance(v, torch.Tensor) for v in vars(found).values())


# ---- thresholds and reports -------------------------------------------------------------------------------------


def test_detections_follow_the_calibration_without_the_network(brain, found_mni, monkeypatch):
    for network in (brain.network, brain.inference_network):
        monkeypatch.setattr(network, "reconstruct", lambda x: pytest.fail("the network ran again"))
    table = brain.card.calibration
    assert found_mni.calibration is None  # detected before calibration: a flag rate needs a calibrated model
    with pytest.raises(ModelError, match="ra calibrate"):
        found_mni.detections_at(flag_rate=0.05)
    found_mni = replace(found_mni, calibration=table)
    default, strict = found_mni.detections_at(), found_mni.detections_at(flag_rate=0.01)
    assert np.array_equal(default.array, found_mni.detections_at(threshold=table.threshold(0.05)).array)
    assert np.array_equal(strict.array, found_mni.detections_at(table.threshold(0.01)).array)
    # Calibrated on this very scan: about the flag rate of its model-space foreground is flagged.
    flagged = (found_mni.anomaly_stack >= found_mni.threshold_at(0.05))[found_mni.slices.masks].mean()
    assert flagged == pytest.approx(0.05, abs=0.01)
    assert 0 < strict.array.sum() < default.array.sum()
    assert default.geometry == found_mni.anomaly.geometry and default.array.dtype == np.uint8
    with pytest.raises(DataError, match="flag rate"):
        found_mni.detections_at(flag_rate=0.5)
    with pytest.raises(ValueError, match="not both"):
        found_mni.detections_at(0.01, flag_rate=0.05)

    report = found_mni.report(default, found_mni.threshold_at(), 0.05)
    assert report["flag_rate"] == 0.05 and report["threshold"] == pytest.approx(table.threshold())
    assert 0 <= report["scan_percentile_of_normal"] <= 100
    assert all(0 <= s["percentile_of_normal"] <= 100 and "reference_z_mm" in s for s in report["slice_scores"])
    assert report["regions_total"] >= 1 and sum(r["voxels"] for r in report["regions"]) <= report["flagged_voxels"]
    assert "research use only" in report["notice"].lower()
    found_mni = replace(found_mni, calibration=replace(table, scan_scores=None))  # too few normal scans: absent
    assert found_mni.report(default, 0.1)["scan_percentile_of_normal"] is None


def test_regions_have_size_and_position_in_physical_units():
    direction = rotation((1.0, 2.0, 0.5), 30.0) @ np.diag([-1.0, 1.0, 1.0])
    geometry = Geometry((0.5, 1.0, 2.0), (10.0, -20.0, 30.0), tuple(direction.ravel()))
    labels = np.zeros((10, 20, 30), np.uint8)
    labels[2:5, 3:8, 4:10] = 1  # 3 x 5 x 6 = 90 voxels
    labels[8, 15, 20] = labels[9, 16, 21] = 1  # corner-touching: one region of 2
    anomaly = labels * np.float32(0.5)
    anomaly[3, 4, 5] = 2.0
    big, small = find_regions(Image(labels, geometry), Image(anomaly, geometry))
    assert (big["id"], big["voxels"], small["voxels"]) == (1, 90, 2)
    assert big["volume_mm3"] == pytest.approx(90 * 0.5 * 1.0 * 2.0)
    assert big["bbox_index"] == {"min": [4, 3, 2], "max": [9, 7, 4]}  # (x, y, z)
    assert big["extent_mm"] == pytest.approx([6 * 0.5, 5 * 1.0, 3 * 2.0])
    centre_index = np.array([6.5, 5.0, 3.0])  # (x, y, z)
    expected = sitk.Image([30, 20, 10], sitk.sitkUInt8)
    geometry.apply_to(expected)
    assert big["centroid_lps_mm"] == pytest.approx(expected.TransformContinuousIndexToPhysicalPoint(centre_index),
                                                   abs=1e-3)
    assert big["max_anomaly"] == 2.0 and small["mean_anomaly"] == 0.5
    flat = find_regions(Image(labels[3], Geometry((0.2, 0.3), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))))
    assert flat[0]["area_mm2"] == pytest.approx(30 * 0.2 * 0.3) and len(flat[0]["centroid_lps_mm"]) == 2
    assert find_regions(Image(np.zeros((4, 4), np.uint8), Geometry.identity(2))) == []


# ---- radiographs and the scripting API ----------------------------------------------------------------------------


def test_radiograph_results_keep_its_grid(xray, scorer):
    image = radiograph()
    found = detect(xray, image, scorer, batch_size=4)
    for result in (found.pseudo_healthy, found.anomaly, found.mask, found.detections_at(threshold=0.01)):
        assert result.array.shape == image.array.shape and result.geometry == image.geometry
    assert found.mask.array.mean() > 0.9 and len(found.slice_scores) == 1  # all but the border at 32 pixels
    assert found.slice_scores[0]["score"] == pytest.approx(found.scan_score)


def test_detect_array_takes_numpy_and_geometry(xray, scorer):
    image = radiograph("RG3_UNCI.dcm")
    calls = []
    found = detect_array(xray, image.array[::4, ::4], spacing=(0.4, 0.4), origin=(5.0, -3.0),
                         scorer=scorer, progress=lambda done, total: calls.append((done, total)))
    assert found.anomaly.geometry == Geometry((0.4, 0.4), (5.0, -3.0), (1.0, 0.0, 0.0, 1.0))
    assert found.anomaly.array.shape == image.array[::4, ::4].shape and calls == [(0, 1), (1, 1)]
    with pytest.raises(Cancelled):
        detect_array(xray, image.array[::4, ::4], scorer=scorer, progress=lambda done, total: False)
    rgb = np.repeat(image.array[::8, ::8, None], 3, axis=2) * np.array([1.0, 0.9, 0.8])  # real colour
    with pytest.warns(UserWarning, match="grey"):
        grey = detect_array(xray, rgb, scorer=scorer)
    assert grey.anomaly.array.shape == rgb.shape[:2]
    with pytest.raises(DataError, match="values"):
        detect_array(xray, image.array, spacing=(1.0, 1.0, 1.0), scorer=scorer)


def test_model_and_input_must_match(brain, xray, mni, scorer):
    with pytest.raises(ModelError, match="DICOM CR image, but the model is a brain-mri model made for MR"):
        detect(brain, radiograph(), scorer)
    with pytest.raises(ModelError, match="brain-mri model"):
        detect(xray, mni, scorer)
    with pytest.raises(ModelError, match="colour picture"):
        detect_array(brain, np.random.default_rng(0).random((40, 50, 3)), scorer=scorer)
    mr_slice = radiograph("MR2_UNCI.dcm")  # a 2D MR slice is not a radiograph
    with pytest.raises(ModelError, match="MR image.*--force"):
        detect(xray, mr_slice, scorer)
    assert detect(xray, mr_slice, scorer, force=True).anomaly.array.shape == mr_slice.array.shape


@pytest.mark.parametrize("array, match", [
    (np.ones((2, 8, 8, 8), np.float32), "4 dimensions"),
    (np.zeros((0, 8), np.float32), "empty"),
    (np.full((30, 30), 7.0, np.float32), "constant"),
    (np.where(np.eye(30) > 0, np.nan, 1.0).astype(np.float32), "NaN"),
])
def test_unusable_images_are_refused(xray, scorer, array, match):
    with pytest.raises(DataError, match=match):
        detect_array(xray, array, scorer=scorer)


def test_bf16_autocast_detection_stays_close_to_float32(scorer):
    """The network under bfloat16 autocast (load_model(amp=True), ra detect --amp) gives maps within the stated
    tolerance of the float32 default and detections that agree (docs/BENCHMARKS.md)."""
    from ra_engine.core.samples import TEST_SCAN, insert_lesion

    scan, _ = insert_lesion(read_image(TEST_SCAN))
    plain = detect(load_model(BUNDLED_DEMO), scan, scorer)
    fast = detect(load_model(BUNDLED_DEMO, amp=True), scan, scorer)
    inside = plain.mask.array > 0
    assert np.abs(fast.anomaly.array - plain.anomaly.array)[inside].max() < 0.05
    a, b = plain.detections_at().array > 0, fast.detections_at().array > 0
    assert 2 * (a & b).sum() / (a.sum() + b.sum()) > 0.9
    assert fast.pseudo_healthy.array.dtype == np.float32
