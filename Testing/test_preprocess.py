"""Preprocessing presets on real bundled scans: alignment to the reference head, the model space and its mapping
back to the input grid (oblique, anisotropic, flipped geometries), intensity scaling, slice selection, and the
radiograph preset on a real DICOM radiograph."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
import SimpleITK as sitk

from ra_engine.core.errors import DataError
from ra_engine.core.image import Geometry, Image
from ra_engine.preprocess.space import ModelSpace, SliceSet
from ra_engine.preprocess.presets import preset_config, PresetConfig
from ra_engine.preprocess.brain import is_skull_stripped
from ra_engine.preprocess.reference import model_grid
from ra_engine.preprocess.pipeline import preprocess

RESOURCES = Path(__file__).resolve().parents[1] / "ra_engine" / "resources"
BRAIN = preset_config("brain-mri")
XRAY = preset_config("xray")


def read(relative: str) -> Image:
    return Image.from_sitk(sitk.ReadImage(str(RESOURCES / relative)))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2.0 * (a & b).sum() / (a.sum() + b.sum()))


def reference_mask() -> np.ndarray:
    """The reference brain mask in model space (as preprocess uses it when no mask is given)."""
    shape, geometry = model_grid(BRAIN)
    grid = geometry.apply_to(sitk.Image([shape[2], shape[1], shape[0]], sitk.sitkUInt8))
    mask = sitk.Resample(sitk.ReadImage(str(RESOURCES / "reference" / "brain_mask.nii.gz")), grid,
                         sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(mask) > 0


def physical_points(shape: tuple[int, ...], geometry: Geometry) -> np.ndarray:
    """LPS points (mm) of every voxel of a (z, y, x) grid: array (z, y, x, 3) listing (x, y, z)."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)[..., ::-1].astype(float)
    direction = np.array(geometry.direction).reshape(3, 3)
    return np.array(geometry.origin) + (index * np.array(geometry.spacing)) @ direction.T


def ball_on_grid(shape: tuple[int, int, int], geometry: Geometry, centre: np.ndarray, radius: float) -> np.ndarray:
    """Voxels of a (z, y, x) grid whose LPS point lies within `radius` mm of `centre` (x, y, z), as bool."""
    direction = np.array(geometry.direction).reshape(3, 3) * np.array(geometry.spacing)  # columns: index steps
    axes = [np.arange(n, dtype=np.float32) for n in shape[::-1]]  # x, y, z indices
    squared = np.zeros(shape, np.float32)
    for c in range(3):
        x, y, z = (direction[c, k] * axes[k] for k in range(3))
        squared += (geometry.origin[c] - centre[c] + x[None, None, :] + y[None, :, None] + z[:, None, None]) ** 2
    return squared <= radius**2


def apply(affine: np.ndarray, point: np.ndarray) -> np.ndarray:
    return affine[:3, :3] @ point + affine[:3, 3]


def rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    angle = np.radians(degrees)
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def moved_scan(image: Image, known: np.ndarray, spacing=(1.0, 1.0, 3.0)) -> Image:
    """`image` resampled onto an oblique grid with anisotropic `spacing` and flipped axes (negative direction
    entries, as a RAS-stored scan has in LPS), after moving its anatomy: `known` (4x4) maps a point of the new
    scan to the point of `image` that it shows."""
    source = image.to_sitk()
    direction = rotation((0.3, 1.0, 0.2), 25.0) @ np.diag([-1.0, 1.0, -1.0])
    content = np.argwhere(image.array > 0)[:, ::-1]  # (x, y, z) indices of the anatomy
    box = [[lo - 1.0, hi + 1.0] for lo, hi in zip(content.min(0), content.max(0))]
    corners = np.array([source.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])
                        for c in np.stack(np.meshgrid(*box, indexing="ij"), -1).reshape(-1, 3)])
    inverse = np.linalg.inv(known)
    in_frame = np.array([apply(inverse, c) for c in corners]) @ direction  # coordinates along the new axes
    low, high = in_frame.min(0), in_frame.max(0)
    grid = sitk.Image([int(np.ceil((hi - lo) / s)) + 1 for lo, hi, s in zip(low, high, spacing)], sitk.sitkFloat32)
    grid.SetSpacing(spacing)
    grid.SetOrigin([float(v) for v in direction @ low])
    grid.SetDirection([float(v) for v in direction.ravel()])
    transform = sitk.AffineTransform(3)
    transform.SetMatrix([float(v) for v in known[:3, :3].ravel()])
    transform.SetTranslation([float(v) for v in known[:3, 3]])
    return Image.from_sitk(sitk.Resample(source, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def rigid(axis, degrees: float, translation, centre) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = rotation(axis, degrees)
    matrix[:3, 3] = np.asarray(translation) + np.asarray(centre) - matrix[:3, :3] @ np.asarray(centre)
    return matrix


def centre_of(image: Image) -> np.ndarray:
    points = physical_points(image.array.shape, image.geometry)
    weights = image.array > 0
    return points[weights].mean(0)


# ---- shared, expensive fixtures (one registration each) ------------------------------------------------------


@pytest.fixture(scope="module")
def mni() -> Image:
    return read("samples/mni152_2009a_t1.nii.gz")


@pytest.fixture(scope="module")
def subject() -> Image:
    return read("samples/itk_subject_t1.nii.gz")


@pytest.fixture(scope="module")
def subject_brain() -> Image:
    return read("samples/itk_subject_brain_mask.nii.gz")


@pytest.fixture(scope="module")
def mni_slices(mni) -> SliceSet:
    return preprocess(mni, BRAIN)


@pytest.fixture(scope="module")
def subject_slices(subject) -> SliceSet:
    return preprocess(subject, BRAIN)


# ---- configuration -------------------------------------------------------------------------------------------


def test_config_round_trip_through_json():
    for name in ("brain-mri", "xray"):
        config = preset_config(name, image_size=64)
        again = PresetConfig.from_dict(json.loads(json.dumps(config.to_dict())))
        assert again == config
    assert BRAIN.fov_mm == 233.0 and BRAIN.slice_spacing_mm == pytest.approx(233.0 / 128)
    assert BRAIN.flip and not XRAY.flip and XRAY.percentiles == (None, 98.0)
    assert preset_config("brain-mri", image_size=64).slice_spacing_mm == pytest.approx(233.0 / 64)
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("ct")
    with pytest.raises(ValueError, match="unknown preprocessing parameters"):
        PresetConfig.from_dict({**BRAIN.to_dict(), "sharpen": True})


def test_model_space_is_centred_on_the_reference_brain():
    (n, h, w), geometry = model_grid(BRAIN)
    assert (h, w) == (128, 128) and geometry.spacing[:2] == pytest.approx((233 / 128, 233 / 128))
    mask = reference_mask()
    assert mask.shape == (n, h, w)
    # The brain fills the stack from the first slice to the last and never touches the in-plane border.
    assert mask[0].any() or mask[1].any()
    assert mask[-1].any() or mask[-2].any()
    assert not mask[:, 0, :].any() and not mask[:, -1, :].any() and not mask[:, :, 0].any() and not mask[:, :, -1].any()


# ---- brain-mri: alignment -------------------------------------------------------------------------------------


def test_skull_stripped_scans_are_recognised(mni, subject, subject_brain):
    assert is_skull_stripped(mni)
    assert is_skull_stripped(read("samples/fsl_mni152_t1_brain.nii.gz"))
    assert not is_skull_stripped(subject)
    assert not is_skull_stripped(read("reference/head.nii.gz"))
    stripped = Image(subject.array * (subject_brain.array > 0), subject.geometry)
    assert is_skull_stripped(stripped)


def test_skull_on_and_skull_stripped_scans_align_to_the_reference(mni_slices, mni, subject_slices, subject,
                                                                  subject_brain):
    reference = reference_mask()
    # A brain-only template: its own brain (> 0) lands on the reference brain.
    assert mni_slices.space.skull_stripped
    own = mni_slices.space.from_input_grid((mni.array > 0).astype(np.uint8)).astype(bool)
    assert dice(own, reference) > 0.9
    # A real subject with its skull: its brain (from its skull-strip classes) lands on the reference brain.
    assert not subject_slices.space.skull_stripped
    own = subject_slices.space.from_input_grid(subject_brain.array.astype(np.uint8)).astype(bool)
    assert dice(own, reference) > 0.8
    # The same subject skull-stripped aligns as well (to the reference brain).
    stripped = preprocess(Image(subject.array * (subject_brain.array > 0), subject.geometry), BRAIN)
    assert stripped.space.skull_stripped and stripped.space.alignment["fixed"] == "brain"
    own = stripped.space.from_input_grid(subject_brain.array.astype(np.uint8)).astype(bool)
    assert dice(own, reference) > 0.8
    # Without alignment an MNI-space scan is taken as it lies: the reference space is MNI space too.
    unaligned = preprocess(mni, preset_config("brain-mri", align=False))
    assert np.array_equal(unaligned.space.affine, np.eye(4))
    own = unaligned.space.from_input_grid((mni.array > 0).astype(np.uint8)).astype(bool)
    assert dice(own, reference) > 0.85


@pytest.mark.parametrize("sample", ["mni", "subject"])
def test_known_motion_is_recovered_and_maps_back(sample, request):
    """An oblique, 1x1x3 mm, axis-flipped copy of a real scan whose anatomy was moved by a known rigid transform;
    a bright ball at a known point must appear at the corresponding model-space point, and a model-space ball
    must map back onto the scan's voxels of the ball."""
    image = request.getfixturevalue(sample)
    baseline = request.getfixturevalue(f"{sample}_slices").space.affine  # reference -> original scan
    known = rigid((1.0, -0.5, 0.3), 12.0, (12.0, -8.0, 6.0), centre_of(image))  # moved scan -> original scan
    moved = moved_scan(image, known)
    target = centre_of(image) + np.array([25.0, 15.0, 20.0])  # inside the brain, away from its centre
    ball_centre = apply(np.linalg.inv(known), target)
    radius = 15.0  # about 1% of the brain: above the 99.5th percentile, so it alone scales to 1
    ball = ball_on_grid(moved.array.shape, moved.geometry, ball_centre, radius)
    marked = Image(np.where(ball, 1.5 * moved.array.max(), moved.array).astype(np.float32), moved.geometry)

    slices = preprocess(marked, BRAIN)
    space = slices.space
    assert len(slices) == space.n_slices and slices.images.shape == space.shape

    # Whole-brain accuracy: the reference -> moved scan mapping equals known^-1 o baseline (measured: 0.1-0.4 mm
    # mean, under 1 mm at most).
    reference_points = physical_points(space.shape, space.geometry)[reference_mask()][::50]
    expected = reference_points @ baseline[:3, :3].T + baseline[:3, 3]
    expected = expected @ np.linalg.inv(known)[:3, :3].T + np.linalg.inv(known)[:3, 3]
    found = reference_points @ space.affine[:3, :3].T + space.affine[:3, 3]
    error = np.linalg.norm(found - expected, axis=1)
    assert error.mean() < 1.0 and error.max() < 2.5

    # The ball appears in the model-space slices at the reference point of `target`, with the ball's volume seen
    # through the alignment's scaling.
    expected_model_point = apply(np.linalg.inv(baseline), target)
    bright = slices.images >= 0.8  # the brain scales to at most 1/1.5 of the ball
    model_points = physical_points(space.shape, space.geometry)
    centroid = model_points[bright].mean(0)
    assert np.linalg.norm(centroid - expected_model_point) < 2.0
    volume = 4 / 3 * np.pi * radius**3 / abs(np.linalg.det(space.affine[:3, :3]))
    assert bright.sum() * np.prod(space.geometry.spacing) == pytest.approx(volume, rel=0.2)

    # The ball as the expected alignment (known motion after the baseline) sees it in model space maps back
    # onto the scan's ball voxels, on the scan's exact grid.
    expected_map = np.linalg.inv(known) @ baseline  # reference -> moved scan
    model_ball = np.linalg.norm(model_points @ expected_map[:3, :3].T + expected_map[:3, 3] - ball_centre,
                                axis=-1) <= radius
    back = space.to_input_grid(model_ball, "nearest")
    assert back.shape == moved.array.shape and back.dtype == bool
    assert dice(back, ball) > 0.85
    restored = space.to_input_image(model_ball.astype(np.float32), moved.geometry, "linear")
    assert restored.geometry == moved.geometry and restored.array.dtype == np.float32
    assert dice(restored.array >= 0.5, ball) > 0.85


def test_model_space_round_trip_is_stored_exactly(subject_slices, subject):
    space = subject_slices.space
    again = ModelSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    stack = np.random.default_rng(0).random(space.shape).astype(np.float32)
    assert np.array_equal(again.to_input_grid(stack), space.to_input_grid(stack))
    # Mapping the scan's own brain to model space and back returns it, up to the model's coarser sampling.
    brain = read("samples/itk_subject_brain_mask.nii.gz").array > 0
    there = space.from_input_grid(brain.astype(np.float32), "linear")
    assert dice(space.to_input_grid(there, "linear") >= 0.5, brain) > 0.9
    # A stack of the kept slices only, with their positions.
    kept = np.arange(5, space.n_slices - 5)
    partial = space.to_input_grid(stack[kept], positions=kept)
    dropped = np.ones(space.n_slices, bool)
    dropped[kept] = False
    assert np.array_equal(partial, space.to_input_grid(np.where(dropped[:, None, None], 0.0, stack)))
    assert partial.shape == subject.array.shape


# ---- brain-mri: intensities and slices -----------------------------------------------------------------------


def test_intensities_are_scaled_by_brain_percentiles(mni_slices):
    images, masks = mni_slices.images, mni_slices.masks
    assert images.dtype == np.float32 and masks.dtype == bool
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert not images[~masks].any()  # outside the brain (skull, background) is 0
    brain = images[masks]
    # 0.5% of the brain is clipped at each end of the 0.5-99.5 percentile range.
    assert (brain >= 1.0).mean() == pytest.approx(0.005, abs=0.003)
    assert (brain <= 0.0).mean() <= 0.01
    low, high = mni_slices.space.intensity_range
    assert 0 <= low < high <= 255
    assert mni_slices.space.to_input_intensity(np.array([0.0, 1.0])) == pytest.approx([low, high])


def test_training_keeps_slices_with_enough_brain(mni, mni_slices):
    fractions = mni_slices.masks.reshape(len(mni_slices), -1).mean(1)
    assert np.array_equal(mni_slices.positions, np.arange(mni_slices.space.n_slices))
    assert fractions.min() < BRAIN.min_foreground  # the stack runs past the brain's top and bottom
    training = preprocess(mni, BRAIN, training=True)
    kept = training.masks.reshape(len(training), -1).mean(1)
    assert kept.min() >= BRAIN.min_foreground
    assert np.array_equal(training.positions, np.flatnonzero(fractions >= BRAIN.min_foreground))
    assert np.array_equal(training.images, mni_slices.images[training.positions])
    assert 40 <= len(training) < len(mni_slices)


def test_ranks_equal_the_double_argsort():
    from ra_engine.preprocess.brain import _ranks

    rng = np.random.default_rng(3)
    for values in (rng.random(1000), rng.integers(0, 5, 1000).astype(np.float32), np.zeros(7), np.arange(5.0)[::-1]):
        expected = np.argsort(np.argsort(values, kind="stable"), kind="stable").astype(np.float64)
        assert np.array_equal(_ranks(values), expected)


def test_the_field_of_view_is_that_of_nearest_neighbour_resampling(mni):
    """The scan's field of view in model space comes from one NaN-filled linear resampling; it equals resampling a
    volume of ones by nearest neighbour (ITK's inside-the-buffer test), also for an oblique, flipped, cut scan."""
    known = rigid((0.2, 0.1, 1.0), 12.0, (4.0, -6.0, 3.0), centre_of(mni))
    moved = moved_scan(mni, known)
    cut = Image(moved.array[: moved.array.shape[0] * 2 // 3], moved.geometry)  # the top of the head cut off
    slices = preprocess(cut, BRAIN)
    in_field = slices.space.from_input_grid(np.ones(cut.array.shape, np.uint8), "nearest").astype(bool)
    assert not in_field.all()
    assert np.array_equal(slices.masks, reference_mask() & in_field)
    assert not slices.images[~in_field].any()


def test_a_user_mask_replaces_the_reference_mask(subject, subject_brain, subject_slices):
    slices = preprocess(subject, BRAIN, mask=subject_brain, skull_stripped=False)
    expected = subject_slices.space.from_input_grid(subject_brain.array.astype(np.uint8)).astype(bool)
    assert dice(slices.masks, expected) > 0.95
    assert not slices.images[~slices.masks].any()


def test_scans_without_a_brain_are_refused(mni):
    rng = np.random.default_rng(1)
    noise = Image(rng.normal(100.0, 20.0, (100, 120, 110)).astype(np.float32), Geometry.identity(3, (1.5, 1.5, 1.5)))
    with pytest.raises(DataError, match="alignment failed"):
        preprocess(noise, BRAIN)
    flat = Image(np.full((60, 60, 60), 7.0, np.float32), Geometry.identity(3, (3.0, 3.0, 3.0)))
    with pytest.raises(DataError, match="constant"):
        preprocess(flat, BRAIN)
    # A 2D axial slice is no longer refused: it is placed at its level (Testing/test_brain_slices.py).
    assert len(preprocess(Image(mni.array[40], Geometry.identity(2)), BRAIN)) == 1


# ---- xray ------------------------------------------------------------------------------------------------------


def radiograph() -> Image:
    dataset = pydicom.dcmread(pydicom.data.get_testdata_file("RG1_UNCI.dcm"))
    pixels = dataset.pixel_array.astype(np.float32)
    if dataset.PhotometricInterpretation == "MONOCHROME1":
        pixels = pixels.max() - pixels
    spacing = [float(v) for v in getattr(dataset, "ImagerPixelSpacing", [1.0, 1.0])]
    return Image(pixels, Geometry((spacing[1], spacing[0]), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)))


def model_pixel(space: ModelSpace, row: float, column: float) -> tuple[float, float]:
    """Where the centre of input pixel (row, column) lies in model pixels (row, column)."""
    (ox, oy), (sx, sy) = space.geometry.origin, space.geometry.spacing
    return (row - oy) / sy, (column - ox) / sx


def test_real_radiograph_keeps_its_aspect_and_maps_back():
    image = radiograph()
    h, w = image.array.shape
    row, column = int(h * 0.3), int(w * 0.6)
    marked = image.array.copy()
    marked[row - 30:row + 31, column - 30:column + 31] = marked.max() * 3  # about 4x4 model pixels
    slices = preprocess(Image(marked, image.geometry), XRAY)
    assert slices.images.shape == (1, 128, 128) and slices.masks.shape == (1, 128, 128)
    assert slices.images.min() >= 0 and slices.images.max() <= 1
    assert np.array_equal(slices.positions, [0])
    # The body mask is the radiograph's own extent, centred, with its aspect ratio.
    rows, columns = np.nonzero(slices.masks[0])
    extent = (rows.max() - rows.min() + 1, columns.max() - columns.min() + 1)
    assert extent[1] / extent[0] == pytest.approx(w / h, rel=0.03)
    assert max(extent) == 128
    assert not slices.images[0][~slices.masks[0]].any()  # padding is 0
    # Divided by the 98th percentile (no offset), as the reference implementation scales radiographs.
    assert slices.space.intensity_range == pytest.approx((0.0, np.percentile(marked, 98)))
    body = slices.images[0][slices.masks[0]]
    assert np.median(body) == pytest.approx(np.median(marked) / np.percentile(marked, 98), abs=0.02)
    # The marker lands at the corresponding model pixel.
    expected = model_pixel(slices.space, row, column)
    difference = np.clip(slices.images[0] - preprocess(image, XRAY).images[0], 0, None)
    assert difference.max() > 0.3
    weights = np.where(difference > 0.1 * difference.max(), difference, 0)
    centroid = (np.argwhere(weights > 0) * weights[weights > 0, None]).sum(0) / weights.sum()
    assert np.linalg.norm(centroid - expected) < 0.5
    # And back: a model-space marker lands on the marker's input pixels, on the input's exact grid.
    model_marker = np.zeros((1, 128, 128), bool)
    r, c = np.round(expected).astype(int)
    model_marker[0, r - 1:r + 2, c - 1:c + 2] = True
    back = slices.space.to_input_grid(model_marker, "nearest")
    assert back.shape == image.array.shape
    rows, columns = np.nonzero(back)
    assert abs(rows.mean() - row) < 0.6 * h / 128 + 1 and abs(columns.mean() - column) < 0.6 * h / 128 + 1
    assert slices.space.to_input_image(slices.images, image.geometry).geometry == image.geometry


@pytest.mark.parametrize("shape", [(90, 200), (257, 130)])
def test_synthetic_radiograph_round_trip(shape):
    h, w = shape
    rows, columns = np.mgrid[:h, :w]
    picture = (1000.0 + 500.0 * np.sin(rows / 9.0) * np.cos(columns / 13.0)).astype(np.float32)
    row, column = h // 3, (2 * w) // 3
    picture[(rows - row) ** 2 + (columns - column) ** 2 <= 36] = 0.0  # a dark disk: the picture is >= 500
    volume = Image(picture[None], Geometry.identity(3, (0.2, 0.2, 1.0)))  # a one-slice volume is a radiograph too
    slices = preprocess(volume, XRAY)
    assert slices.images.shape == (1, 128, 128)
    back = slices.space.to_input_grid(slices.images, "linear")
    assert back.shape == (1, h, w)
    scaled = np.clip(picture / np.percentile(picture, 98), 0, 1)
    inner = (slice(3, -3), slice(3, -3))
    error = np.abs(back[0] - scaled)[inner]
    assert np.median(error) < 0.03
    # The disk's centroid survives the trip to model space and back.
    disk = back[0] < 0.1
    ys, xs = np.nonzero(disk)
    assert abs(ys.mean() - row) < 1.5 and abs(xs.mean() - column) < 1.5
    mask_back = slices.space.to_input_grid(slices.masks, "nearest")
    assert mask_back.shape == (1, h, w) and mask_back.all()
    again = ModelSpace.from_dict(json.loads(json.dumps(slices.space.to_dict())))
    assert np.array_equal(again.to_input_grid(slices.images), back)


def test_unusable_radiographs_are_refused():
    with pytest.raises(DataError, match="no signal"):
        preprocess(Image(np.zeros((50, 60), np.float32), Geometry.identity(2)), XRAY)
    with pytest.raises(DataError, match="2D image"):
        preprocess(Image(np.ones((3, 50, 60), np.float32), Geometry.identity(3)), XRAY)
