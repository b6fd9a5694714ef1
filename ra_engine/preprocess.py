"""Presets that turn one scan into the model's 2D slices, and map model-space results back to the scan's grid.

Two presets (SPEC-RA.md, "Data"):

- ``brain-mri``: a 3D head or brain T1 is aligned to the bundled reference head (Colin27, affine registration), its
  brain is taken with the reference's brain mask (or the user's mask), and it is resampled into the *model space*:
  axial slices of the reference space, a square in-plane field of view of ``fov_mm`` at ``image_size`` pixels,
  centred on the reference brain, slices ``slice_spacing_mm`` apart covering the brain. Intensities are scaled by
  the 0.5-99.5 percentiles of the brain and clipped to [0, 1]; outside the brain is 0.
- ``xray``: a 2D radiograph is divided by its 98th percentile, clipped to [0, 1], padded to a square with 0 and
  resized to ``image_size``.

Skull-stripped scans: a brain-only scan registered to a head with its skull would be stretched to fill the skull,
so such scans are registered to the reference *brain* instead. `preprocess(..., skull_stripped=None)` decides by
the scan's foreground volume (`is_skull_stripped`: under 2.5 litres is a brain, a head is 3-5 litres); pass True
or False where a scan's field of view holds only part of the head. After alignment the result is checked (the
reference brain must lie mostly inside the scan, no axis scaled beyond 1.6, and the aligned brain must correlate
in rank with the reference brain); a failure raises DataError("alignment failed: ...") rather than returning
slices of something that is not a brain.

Axis and coordinate conventions are those of `ra_engine.image`: arrays (z, y, x) or (y, x); physical points in
ITK's LPS convention, listed (x, y, z), in mm. The model space of ``brain-mri`` has identity direction, so a model
slice (y, x) has the patient's anterior at row 0 and the patient's right at column 0 (radiological view), and
slice index grows from inferior to superior.
"""
from __future__ import annotations

import contextlib
import functools
import math
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import numpy as np
import SimpleITK as sitk

from .errors import DataError
from .image import Geometry, Image
from .imageio import array_from_sitk

PRESETS = ("brain-mri", "xray")
RESOURCES = Path(__file__).resolve().parent / "resources"
REFERENCES = {"colin27": RESOURCES / "reference"}

# A skull-stripped T1 is a brain on an empty background (measured 1.65 l for the ITK subject, 1.94-2.05 l for the
# MNI-sized templates); a T1 with its skull is a head (3.1 l for the ITK subject, 4.3 l for Colin27).
SKULL_STRIPPED_MAX_LITRES = 2.5
# Alignment checks: inside the reference brain, an aligned T1 correlates (in rank) with the reference (measured
# 0.53 for the ITK subject with its bias field, 0.68-0.72 for the MNI templates; 0.0-0.08 for noise, smooth noise,
# a ball, a ball in a shell), and no axis of a head is scaled by more than MAX_AXIS_SCALE.
MIN_REFERENCE_CORRELATION = 0.2
MAX_AXIS_SCALE = 1.6
# At least half of the reference brain must lie inside the scan's field of view.
MIN_BRAIN_IN_FIELD = 0.5
# The registration runs on one thread: ITK's threaded metric sums in a varying order, and the same scan must give
# the same slices every time (training cache, detection); at 4 mm this costs a fraction of a second.
REGISTRATION_THREADS = 1


@dataclass(frozen=True)
class PresetConfig:
    """Every parameter of a preset's preprocessing; stored in the model card (`to_dict`) to reproduce it exactly.

    name: "brain-mri" or "xray". image_size: model slices are image_size x image_size pixels.
    fov_mm: brain-mri, the side of the square in-plane field of view of the model space (mm); the pixel size is
        fov_mm / image_size (233 / 128 = 1.82 mm, as in the paper's MNI slices). None for xray.
    slice_spacing_mm: brain-mri, the distance between model slices (mm); the pixel size by default.
    min_foreground: fraction of a slice's pixels that must be brain/body for the slice to be used in training.
    percentiles: (low, high) intensity percentiles of the brain/body mapped to 0 and 1; low None divides by the
        high percentile (radiographs, as in the reference implementation).
    flip: whether training may flip slices left-right (the augmentation itself lives in `augment`).
    align: brain-mri, register the scan to the reference head; False takes the scan as already in reference
        (MNI) space.
    reference: name of the bundled reference head ("colin27": Colin27 at 1.5 mm).
    registration_spacing_mm, registration_levels, registration_iterations, registration_sampling,
    registration_margin_mm, registration_seed: the affine registration (finest grid spacing in mm, pyramid
        levels, optimiser iterations per level, share of reference voxels sampled by the metric, margin in mm
        around the reference brain where the metric is sampled, sampling seed); see `register`.
    """

    name: str
    image_size: int = 128
    fov_mm: float | None = None
    slice_spacing_mm: float | None = None
    min_foreground: float = 0.05
    percentiles: tuple[float | None, float] = (0.5, 99.5)
    flip: bool = True
    align: bool = True
    reference: str = "colin27"
    registration_spacing_mm: float = 4.0
    registration_levels: int = 3
    registration_iterations: int = 200
    registration_sampling: float = 0.2
    registration_margin_mm: float = 25.0
    registration_seed: int = 2109

    def __post_init__(self) -> None:
        if self.name not in PRESETS:
            raise ValueError(f"unknown preset {self.name!r}; choose one of {', '.join(PRESETS)}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {self.image_size}")
        low, high = self.percentiles
        if not (0.0 < high <= 100.0 and (low is None or 0.0 <= low < high)):
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if not 0.0 <= self.min_foreground <= 1.0:
            raise ValueError(f"min_foreground is a fraction in [0, 1], got {self.min_foreground}")
        if self.name == "brain-mri":
            if self.fov_mm is None or self.fov_mm <= 0:
                raise ValueError("brain-mri needs a positive fov_mm")
            if self.reference not in REFERENCES:
                raise ValueError(f"unknown reference {self.reference!r}; choose one of {', '.join(REFERENCES)}")

    @property
    def pixel_mm(self) -> float | None:
        """Model-space pixel size in mm (brain-mri); None for xray, whose pixels follow each radiograph."""
        return None if self.fov_mm is None else self.fov_mm / self.image_size

    def to_dict(self) -> dict:
        return {**asdict(self), "percentiles": list(self.percentiles)}

    @classmethod
    def from_dict(cls, data: dict) -> "PresetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing parameters {sorted(unknown)}: written by a newer version?")
        values = dict(data)
        if "percentiles" in values:
            values["percentiles"] = tuple(values["percentiles"])
        return cls(**values)


_DEFAULTS = {
    "brain-mri": dict(fov_mm=233.0, min_foreground=0.05, percentiles=(0.5, 99.5), flip=True, align=True),
    "xray": dict(fov_mm=None, min_foreground=0.0, percentiles=(None, 98.0), flip=False, align=False),
}


def preset_config(name: str, **overrides) -> PresetConfig:
    """The default configuration of preset `name` ("brain-mri" | "xray") with `overrides` applied; for brain-mri
    an unset slice_spacing_mm becomes the pixel size fov_mm / image_size."""
    if name not in _DEFAULTS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = PresetConfig(name=name, **{**_DEFAULTS[name], **overrides})
    if config.name == "brain-mri" and config.slice_spacing_mm is None:
        config = replace(config, slice_spacing_mm=config.pixel_mm)
    return config


# --------------------------------------------------------------------------------------------------------------
# Model space


@dataclass
class ModelSpace:
    """Where the model's slices lie relative to one input scan, and how to map results back onto its grid.

    The model grid is a `shape` = (n_slices, H, W) stack placed by `geometry` (LPS, x-y-z). `affine` is the
    homogeneous matrix (4x4; 3x3 for 2D) that maps a model-space point to the input's point (mm): for brain-mri
    the registration's reference -> scan transform. `input_shape` and `input_geometry` are the input's array shape
    and geometry. For xray the model grid lies in the input's pixel index frame (x = column, y = row, spacing 1,
    origin 0): `input_geometry` is that frame, and the radiograph's own geometry stays with its Image.
    `intensity_range` = (raw value mapped to 0, raw value mapped to 1). `skull_stripped` and `alignment` report
    how the scan was aligned (None and {} for xray).
    """

    kind: str
    shape: tuple[int, int, int]
    geometry: Geometry
    affine: np.ndarray
    input_shape: tuple[int, ...]
    input_geometry: Geometry
    intensity_range: tuple[float, float] = (0.0, 1.0)
    skull_stripped: bool | None = None
    alignment: dict = field(default_factory=dict)

    @property
    def n_slices(self) -> int:
        return self.shape[0]

    # ---- resampling ------------------------------------------------------------------------------------------

    def _grid_dimension(self) -> int:
        return self.geometry.dimension

    def _model_image(self, stack: np.ndarray) -> sitk.Image:
        array = stack if self._grid_dimension() == 3 else stack[0]
        return self.geometry.apply_to(sitk.GetImageFromArray(array))

    def _resample_onto(self, moving: sitk.Image, size, geometry: Geometry, transform: sitk.Transform,
                       interpolation: str, fill: float, pixel_type: int) -> sitk.Image:
        """`moving` resampled onto the grid of `size` (x, y[, z]) voxels placed by `geometry`, given as numbers
        rather than as a reference image (an input-sized image would be allocated and zeroed for its geometry only)."""
        return sitk.Resample(moving, [int(v) for v in size], transform, _interpolator(interpolation),
                             [float(v) for v in geometry.origin], [float(v) for v in geometry.spacing],
                             [float(v) for v in geometry.direction], float(fill), pixel_type)

    def _input_grid_shape(self) -> tuple[int, ...]:
        """Shape of the input grid in the resampling frame: the input shape, or (y, x) of a one-slice radiograph."""
        return tuple(self.input_shape[-self._grid_dimension():])

    def _transform(self, inverse: bool) -> sitk.AffineTransform:
        matrix = np.linalg.inv(self.affine) if inverse else self.affine
        d = self._grid_dimension()
        transform = sitk.AffineTransform(d)
        transform.SetMatrix([float(v) for v in matrix[:d, :d].ravel()])
        transform.SetTranslation([float(v) for v in matrix[:d, d]])
        return transform

    def to_input_grid(self, stack: np.ndarray, interpolation: Literal["linear", "nearest"] = "linear",
                      fill: float = 0.0, positions: np.ndarray | None = None) -> np.ndarray:
        """Maps a model-space stack onto the input's grid.

        stack: (n_slices, H, W) values in model space (any units); or (len(positions), H, W) with `positions`, the
        model slice index of each given slice (missing slices count as `fill`).
        Returns an array of exactly the input's shape, (z, y, x) or (y, x): float32 for linear interpolation, the
        stack's dtype for nearest. Input voxels outside the model space get `fill`. Wrap it with the input's
        geometry (`to_input_image`) to keep spacing, origin and direction.
        """
        stack = np.asarray(stack)
        if positions is not None:
            full = np.full(self.shape, fill, dtype=stack.dtype)
            full[np.asarray(positions, dtype=int)] = stack
            stack = full
        if stack.shape != tuple(self.shape):
            raise ValueError(f"expected a model-space stack of shape {tuple(self.shape)}, got {stack.shape}")
        dtype = stack.dtype
        work = stack.astype(np.float32) if interpolation == "linear" or dtype == bool else stack
        moving = self._model_image(np.ascontiguousarray(work))
        mapped = self._resample_onto(moving, self._input_grid_shape()[::-1], self.input_geometry,
                                     self._transform(inverse=True), interpolation, fill,
                                     sitk.sitkFloat32 if interpolation == "linear" else moving.GetPixelID())
        result = array_from_sitk(mapped).reshape(self.input_shape)  # the resampled buffer itself, not a copy
        return result.astype(np.float32 if interpolation == "linear" else dtype, copy=False)

    def to_input_image(self, stack: np.ndarray, input_geometry: Geometry,
                       interpolation: Literal["linear", "nearest"] = "linear", fill: float = 0.0,
                       positions: np.ndarray | None = None) -> Image:
        """`to_input_grid` wrapped as an Image with `input_geometry` (the scan's own geometry, LPS)."""
        return Image(self.to_input_grid(stack, interpolation, fill, positions), input_geometry)

    def from_input_grid(self, array: np.ndarray, interpolation: Literal["linear", "nearest"] = "nearest",
                        fill: float = 0.0) -> np.ndarray:
        """Maps an array on the input's grid (e.g. a lesion mask, shape = the input's) into model space:
        (n_slices, H, W), float32 for linear interpolation, the array's dtype for nearest."""
        array = np.asarray(array)
        if array.shape != tuple(self.input_shape):
            raise ValueError(f"expected an array of the input's shape {tuple(self.input_shape)}, got {array.shape}")
        dtype = array.dtype
        work = array.astype(np.float32) if interpolation == "linear" or dtype == bool else array
        moving = self.input_geometry.apply_to(sitk.GetImageFromArray(
            np.ascontiguousarray(work).reshape(self._input_grid_shape())))
        result = self._from_input_image(moving, interpolation, fill)
        return result.astype(np.float32 if interpolation == "linear" else dtype, copy=False)

    def _from_input_image(self, moving: sitk.Image, interpolation: Literal["linear", "nearest"] = "nearest",
                          fill: float = 0.0) -> np.ndarray:
        """`from_input_grid` of an input already as a SimpleITK image on the input's grid (`input_geometry`):
        (n_slices, H, W) of float32 (linear) or the image's own pixel type (nearest)."""
        mapped = self._resample_onto(moving, self._model_grid_size(), self.geometry, self._transform(inverse=False),
                                     interpolation, fill,
                                     sitk.sitkFloat32 if interpolation == "linear" else moving.GetPixelID())
        return sitk.GetArrayFromImage(mapped).reshape(self.shape)

    def _model_grid_size(self) -> tuple[int, ...]:
        n, h, w = self.shape
        return (w, h, n) if self._grid_dimension() == 3 else (w, h)

    def to_input_intensity(self, values: np.ndarray) -> np.ndarray:
        """Maps model intensities in [0, 1] back to the scan's raw intensity units (e.g. a pseudo-healthy image)."""
        low, high = self.intensity_range
        return self.to_input_intensity_(np.array(values, dtype=np.float32))

    def to_input_intensity_(self, values: np.ndarray) -> np.ndarray:
        """`to_input_intensity` in place on a float32 array (no full-size temporaries; the same float32 arithmetic:
        values * (high - low), then + low). Returns `values`."""
        if values.dtype != np.float32:
            raise TypeError(f"to_input_intensity_ works in place on float32 arrays, got {values.dtype}")
        low, high = self.intensity_range
        np.multiply(values, np.float32(high - low), out=values)
        np.add(values, np.float32(low), out=values)
        return values

    # ---- storage ---------------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "shape": list(self.shape),
            "geometry": self.geometry.to_dict(),
            "affine": np.asarray(self.affine, dtype=float).tolist(),
            "input_shape": list(self.input_shape),
            "input_geometry": self.input_geometry.to_dict(),
            "intensity_range": list(self.intensity_range),
            "skull_stripped": self.skull_stripped,
            "alignment": dict(self.alignment),
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ModelSpace":
        return cls(
            kind=data["kind"],
            shape=tuple(int(v) for v in data["shape"]),
            geometry=_geometry(data["geometry"]),
            affine=np.asarray(data["affine"], dtype=float),
            input_shape=tuple(int(v) for v in data["input_shape"]),
            input_geometry=_geometry(data["input_geometry"]),
            intensity_range=tuple(float(v) for v in data["intensity_range"]),
            skull_stripped=data.get("skull_stripped"),
            alignment=dict(data.get("alignment", {})),
        )


@dataclass
class SliceSet:
    """One scan in model space.

    images: (n, H, W) float32 in [0, 1], 0 outside the mask. masks: (n, H, W) bool, brain/body foreground.
    positions: (n,) int, index of each slice in the model-space stack (space.shape[0] slices).
    space: the mapping back to the input's grid.
    """

    images: np.ndarray
    masks: np.ndarray
    positions: np.ndarray
    space: ModelSpace

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _geometry(data: dict) -> Geometry:
    return Geometry(tuple(float(v) for v in data["spacing"]), tuple(float(v) for v in data["origin"]),
                    tuple(float(v) for v in data["direction"]))


def _interpolator(name: str) -> int:
    try:
        return {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[name]
    except KeyError:
        raise ValueError(f"interpolation must be 'linear' or 'nearest', got {name!r}") from None


# --------------------------------------------------------------------------------------------------------------
# Entry point


def preprocess(image: Image, config: PresetConfig, mask: Image | None = None, *, training: bool = False,
               skull_stripped: bool | None = None) -> SliceSet:
    """Turns one scan into the model's slices (see the module docstring for each preset).

    image: raw intensities, (z, y, x) for brain-mri; (y, x) or a one-slice (1, y, x) for xray; LPS geometry.
    mask: optional brain/body mask (non-zero = inside): brain-mri, on any grid with its own geometry (resampled by
        nearest neighbour; the reference's brain mask when None); xray, on the radiograph's own pixel grid (the
        radiograph's extent when None).
    training: keep only slices whose foreground fraction is at least `config.min_foreground`; otherwise every
        slice of the model space is returned (detection needs the whole stack).
    skull_stripped: brain-mri, whether the scan is brain only (it is then registered to the reference brain
        instead of the reference head); None detects it (`is_skull_stripped`).
    Raises DataError when the scan cannot be used (wrong dimension, no contrast, alignment failed).
    """
    if config.name == "brain-mri":
        return _preprocess_brain(image, config, mask, training, skull_stripped)
    return _preprocess_xray(image, config, mask)


# --------------------------------------------------------------------------------------------------------------
# brain-mri


@functools.lru_cache(maxsize=4)
def _reference(name: str) -> dict[str, sitk.Image]:
    """The bundled reference: head, brain and brain mask (1.5 mm, LPS, identity direction), float32/uint8."""
    folder = REFERENCES[name]
    head = sitk.ReadImage(str(folder / "head.nii.gz"), sitk.sitkFloat32)
    brain = sitk.ReadImage(str(folder / "brain.nii.gz"), sitk.sitkFloat32)
    brain_mask = sitk.ReadImage(str(folder / "brain_mask.nii.gz"), sitk.sitkUInt8)
    return {"head": head, "brain": brain, "brain_mask": brain_mask}


@functools.lru_cache(maxsize=8)
def _reference_for_registration(name: str, which: str, spacing_mm: float) -> sitk.Image:
    return _shrink(_reference(name)[which], spacing_mm)


@functools.lru_cache(maxsize=8)
def model_grid(config: PresetConfig) -> tuple[tuple[int, int, int], Geometry]:
    """The brain-mri model space of `config`: (shape (n_slices, H, W), geometry LPS x-y-z, identity direction).

    In-plane: `image_size` pixels of fov_mm / image_size mm, centred on the reference brain mask's bounding box.
    Through-plane: slices `slice_spacing_mm` apart, centred on the mask's z extent and covering it.
    """
    mask = _reference(config.reference)["brain_mask"]
    inside = sitk.GetArrayViewFromImage(mask) > 0
    # The mask's bounding box (index x, y, z) from its projections on each axis (no index list of its voxels).
    extent = [np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis))) for axis in (2, 1, 0)]
    corners = np.array([mask.TransformContinuousIndexToPhysicalPoint([float(v) for v in c])
                        for c in ([e[0] for e in extent], [e[-1] for e in extent])])
    low, high = corners.min(0), corners.max(0)
    centre = (low + high) / 2.0
    pixel, dz = config.pixel_mm, config.slice_spacing_mm
    n_slices = int(math.ceil((high[2] - low[2]) / dz - 1e-6)) + 1
    size = config.image_size
    origin = (centre[0] - (size - 1) / 2.0 * pixel, centre[1] - (size - 1) / 2.0 * pixel,
              centre[2] - (n_slices - 1) / 2.0 * dz)
    geometry = Geometry((pixel, pixel, dz), tuple(float(v) for v in origin), tuple(float(v) for v in np.eye(3).ravel()))
    return (n_slices, size, size), geometry


def is_skull_stripped(image: Image) -> bool:
    """Whether a 3D T1 (z, y, x) looks brain-only: its foreground (above 10% of the range from the minimum to the
    99th percentile, closed, holes filled) is smaller than 2.5 litres. A head with its skull and scalp is 3-5
    litres, a brain 1.0-2.0 litres. A scan whose field of view holds only part of the head can be misjudged: pass
    `skull_stripped` to `preprocess` then."""
    return _foreground_litres(_shrink(image.to_sitk(), 4.0)) < SKULL_STRIPPED_MAX_LITRES


def _foreground_litres(image: sitk.Image) -> float:
    array = sitk.GetArrayFromImage(image)
    floor = float(array.min())
    threshold = floor + 0.1 * (float(np.percentile(array, 99.0)) - floor)
    foreground = sitk.BinaryThreshold(image, threshold, 1e30, 1, 0)
    foreground = sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(foreground, [2, 2, 2]))
    return float(sitk.GetArrayViewFromImage(foreground).sum()) * float(np.prod(image.GetSpacing())) / 1e6


def _shrink(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """The image on a grid of (at least) `spacing_mm` along each axis, same direction and extent, float32,
    smoothed first so that detail finer than the new spacing does not alias."""
    old = np.array(image.GetSpacing())
    new = np.maximum(old, spacing_mm)
    if np.allclose(new, old):
        return sitk.Cast(image, sitk.sitkFloat32)
    sigma = np.sqrt(np.maximum(new**2 - old**2, 0.0)) / 2.355
    as_float = image if image.GetPixelID() == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)  # no copy
    smooth = sitk.SmoothingRecursiveGaussian(as_float, [float(max(s, 1e-3)) for s in sigma])
    size = np.maximum(np.round(np.array(image.GetSize()) * old / new), 1).astype(int)
    direction = np.array(image.GetDirection()).reshape(3, 3)
    origin = np.array(image.GetOrigin()) + direction @ ((new - old) / 2.0)
    grid = sitk.Image([int(v) for v in size], sitk.sitkFloat32)
    grid.SetSpacing([float(v) for v in new])
    grid.SetOrigin([float(v) for v in origin])
    grid.SetDirection(image.GetDirection())
    return sitk.Resample(smooth, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkFloat32)


def register(image: Image, config: PresetConfig, skull_stripped: bool) -> tuple[np.ndarray, dict]:
    """Affine (12-DOF) registration of a 3D scan to the reference head (or to the reference brain, for a
    skull-stripped scan).

    Returns the 4x4 homogeneous matrix that maps a reference point to the scan's point (LPS, mm), and a report
    (reference used, final metric value, seconds). Both images are brought to `registration_spacing_mm` first;
    the centres of mass are matched, then a similarity stage (rotation, translation, one scale: well posed even
    for a head much smaller than the reference) and an affine stage each run a `registration_levels`-level
    pyramid. Mattes mutual information, sampled on a regular grid over the reference brain and
    `registration_margin_mm` around it (skull, scalp, background edge), so that a neck, face or field of view
    cut short does not pull the brain out of place.
    """
    return _register(_shrink(image.to_sitk(), config.registration_spacing_mm), config, skull_stripped)


def _register(small: sitk.Image, config: PresetConfig, skull_stripped: bool) -> tuple[np.ndarray, dict]:
    """`register` of a scan already brought to the registration grid (`_shrink`)."""
    start = time.perf_counter()
    which = "brain" if skull_stripped else "head"
    fixed = _reference_for_registration(config.reference, which, config.registration_spacing_mm)
    region = _registration_region(config.reference, config.registration_spacing_mm, config.registration_margin_mm)
    moving = _clip_bright(small)
    similarity = sitk.CenteredTransformInitializer(fixed, moving, sitk.Similarity3DTransform(),
                                                   sitk.CenteredTransformInitializerFilter.MOMENTS)
    similarity, _ = _run_registration(fixed, moving, region, similarity, config)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(similarity.GetCenter())
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    affine, method = _run_registration(fixed, moving, region, affine, config)
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(affine.GetMatrix()).reshape(3, 3)
    centre = np.array(affine.GetCenter())
    matrix[:3, 3] = np.array(affine.GetTranslation()) + centre - matrix[:3, :3] @ centre
    report = {"fixed": which, "metric": round(float(method.GetMetricValue()), 4),
              "seconds": round(time.perf_counter() - start, 3)}
    return matrix, report


@functools.lru_cache(maxsize=8)
def _registration_region(name: str, spacing_mm: float, margin_mm: float) -> sitk.Image:
    """The reference brain mask dilated by `margin_mm`, on the registration grid (uint8)."""
    grid = _reference_for_registration(name, "head", spacing_mm)
    mask = sitk.Resample(_reference(name)["brain_mask"], grid, sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                         sitk.sitkUInt8)
    radius = int(round(margin_mm / spacing_mm))
    return sitk.BinaryDilate(mask, [radius] * 3) if radius > 0 else mask


@contextlib.contextmanager
def _threads(count: int):
    """SimpleITK's default thread count set to `count` for the duration (the registration's metric follows the
    global default, not the method's own setting)."""
    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(count)
    try:
        yield
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _clip_bright(image: sitk.Image) -> sitk.Image:
    """Clips the brightest 0.1% (fat, vessels, artefacts) so that they do not take most of the histogram's bins."""
    array = sitk.GetArrayViewFromImage(image)
    high = float(np.percentile(array, 99.9))
    return sitk.Clamp(image, sitk.sitkFloat32, float(array.min()), high)


def _run_registration(fixed: sitk.Image, moving: sitk.Image, region: sitk.Image, initial: sitk.Transform,
                      config: PresetConfig) -> tuple[sitk.Transform, sitk.ImageRegistrationMethod]:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricFixedMask(region)
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(config.registration_sampling, config.registration_seed)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=0.01,
                                                    numberOfIterations=config.registration_iterations,
                                                    relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    factors = [2**k for k in reversed(range(config.registration_levels))]
    method.SetShrinkFactorsPerLevel(factors)
    method.SetSmoothingSigmasPerLevel([float(f - 1) for f in factors])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(initial, inPlace=False)
    with _threads(REGISTRATION_THREADS):
        transform = method.Execute(fixed, moving)
    if isinstance(transform, sitk.CompositeTransform):
        transform = transform.GetNthTransform(transform.GetNumberOfTransforms() - 1)
    return transform.Downcast(), method


def _preprocess_brain(image: Image, config: PresetConfig, mask: Image | None, training: bool,
                      skull_stripped: bool | None) -> SliceSet:
    if image.array.ndim != 3 or min(image.array.shape) < 2:
        raise DataError(f"the brain-mri preset needs a 3D volume; got an array of shape {image.array.shape}")
    array = image.array
    if not np.all(np.isfinite(array)):
        raise DataError("the scan has non-finite voxels (NaN or infinity)")
    if float(array.max()) - float(array.min()) <= 0:
        raise DataError("the scan is constant: there is no anatomy to align or score")
    start = time.perf_counter()
    scan_image = image.to_sitk()  # float32 on the input's grid: shrunk for the registration, resampled below
    small = _shrink(scan_image, config.registration_spacing_mm)
    if skull_stripped is None:
        skull_stripped = _foreground_litres(small) < SKULL_STRIPPED_MAX_LITRES
    shape, geometry = model_grid(config)
    if config.align:
        affine, alignment = _register(small, config, skull_stripped)
        _check_affine(affine)
    else:
        affine, alignment = np.eye(4), {"fixed": None}
    space = ModelSpace("brain-mri", shape, geometry, affine, tuple(array.shape), image.geometry,
                       skull_stripped=bool(skull_stripped), alignment=alignment)

    # One resampling gives both the scan and its field of view: model voxels whose point falls outside the input's
    # grid get NaN (ITK's "inside the buffer" test is the same for the linear and the nearest interpolator, so this
    # equals resampling a volume of ones by nearest neighbour), and 0 like before once the field is known.
    scan = space._from_input_image(scan_image if scan_image.GetPixelID() == sitk.sitkFloat32
                                   else sitk.Cast(scan_image, sitk.sitkFloat32), "linear", fill=math.nan)
    del scan_image
    in_field = ~np.isnan(scan)
    scan[~in_field] = 0.0
    if mask is None:
        brain = _reference_in_model_space(config, "brain_mask") > 0
    else:
        brain = _mask_in_model_space(mask, space)
    if not brain.any():
        raise DataError("the brain mask is empty in the model space: is the mask on this scan's anatomy?")
    inside = brain & in_field
    covered = inside.sum() / brain.sum()
    if covered < MIN_BRAIN_IN_FIELD:
        raise DataError(f"alignment failed: no brain in the model space (only {covered:.0%} of the brain lies "
                        "inside the scan's field of view); check that the scan is a head T1")
    if config.align:
        reference = _reference_in_model_space(config, "brain" if skull_stripped else "head")
        correlation = _rank_correlation(scan[inside], reference[inside])
        space.alignment["reference_correlation"] = round(correlation, 4)
        if not correlation >= MIN_REFERENCE_CORRELATION:
            raise DataError(f"alignment failed: no brain in the model space (the aligned scan does not look like "
                            f"the reference T1 brain: correlation {correlation:.2f} < {MIN_REFERENCE_CORRELATION}); "
                            "check that the scan is a T1 of a head, or pass a brain mask")

    low_p, high_p = config.percentiles
    values = scan[inside]
    high = float(np.percentile(values, high_p))
    low = 0.0 if low_p is None else float(np.percentile(values, low_p))
    if not high > low:
        raise DataError("no brain in the model space: the brain has no contrast (its intensity percentiles "
                        f"{low_p} and {high_p} are equal)")
    space.intensity_range = (low, high)
    space.alignment["seconds_total"] = round(time.perf_counter() - start, 3)
    images = np.where(inside, np.clip((scan - low) / (high - low), 0.0, 1.0), 0.0).astype(np.float32)
    return _slice_set(images, inside, space, config, training)


@functools.lru_cache(maxsize=8)
def _reference_in_model_space(config: PresetConfig, which: str) -> np.ndarray:
    """The reference's "head", "brain" or "brain_mask" resampled into the model space of `config` (linear;
    nearest for the mask): (n_slices, H, W) float32, read-only."""
    shape, geometry = model_grid(config)
    grid = geometry.apply_to(sitk.Image([shape[2], shape[1], shape[0]], sitk.sitkUInt8))
    interpolator = sitk.sitkNearestNeighbor if which == "brain_mask" else sitk.sitkLinear
    image = sitk.Resample(_reference(config.reference)[which], grid, sitk.Transform(), interpolator, 0.0,
                          sitk.sitkFloat32)
    result = sitk.GetArrayFromImage(image)
    result.setflags(write=False)
    return result


def _mask_in_model_space(mask: Image, space: ModelSpace) -> np.ndarray:
    """A user mask (any grid, LPS geometry, non-zero = inside) in model space by nearest neighbour."""
    moving = Image((mask.array != 0).astype(np.uint8), mask.geometry).to_sitk()
    n, h, w = space.shape
    reference = space.geometry.apply_to(sitk.Image([w, h, n], sitk.sitkUInt8))
    mapped = sitk.Resample(moving, reference, space._transform(inverse=False), sitk.sitkNearestNeighbor, 0,
                           sitk.sitkUInt8)
    return sitk.GetArrayFromImage(mapped) > 0


def _check_affine(affine: np.ndarray) -> None:
    scales = np.linalg.svd(affine[:3, :3], compute_uv=False)
    if scales.max() > MAX_AXIS_SCALE or scales.min() < 1.0 / MAX_AXIS_SCALE:
        raise DataError("alignment failed: no brain in the model space (the registration to the reference "
                        f"scaled an axis by {scales.max():.2f} or {scales.min():.2f}, beyond anatomy); check that "
                        "the scan is a head T1")


def _rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation of two equally long samples: monotonic intensity changes (contrast, gamma)
    leave it unchanged, and it is not dominated by a few bright voxels."""
    ranks = [_ranks(v) for v in (a, b)]
    x, y = (r - r.mean() for r in ranks)
    denominator = float(np.sqrt((x * x).sum() * (y * y).sum()))
    return float((x * y).sum() / denominator) if denominator > 0 else 0.0


def _ranks(values: np.ndarray) -> np.ndarray:
    """0-based ranks of `values` (ties in order of position), float64: the inverse of the stable sorting
    permutation, equal to argsort(argsort(values, stable), stable) with one sort instead of two."""
    order = np.argsort(values, kind="stable")
    ranks = np.empty(order.size, np.float64)
    ranks[order] = np.arange(order.size, dtype=np.float64)
    return ranks


def _slice_set(images: np.ndarray, masks: np.ndarray, space: ModelSpace, config: PresetConfig,
               training: bool) -> SliceSet:
    fractions = masks.reshape(masks.shape[0], -1).mean(1)
    if training:
        positions = np.flatnonzero(fractions >= max(config.min_foreground, 1e-12))
    else:
        positions = np.arange(masks.shape[0])
    if positions.size == 0 or not masks[positions].any():
        raise DataError(f"no usable slice: no slice has at least {config.min_foreground:.0%} foreground")
    return SliceSet(images[positions], masks[positions], positions, space)


# --------------------------------------------------------------------------------------------------------------
# xray


def _preprocess_xray(image: Image, config: PresetConfig, mask: Image | None) -> SliceSet:
    from skimage.transform import resize

    array = image.array
    if array.ndim == 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 2:
        raise DataError(f"the xray preset needs a 2D image (or a volume of one slice); got shape {image.array.shape}")
    if not np.all(np.isfinite(array)):
        raise DataError("the radiograph has non-finite pixels (NaN or infinity)")
    h, w = array.shape
    side = max(h, w)
    pad_y, pad_x = (side - h) // 2, (side - w) // 2
    scale = side / config.image_size
    size = config.image_size
    # Model pixel (r, c) covers padded pixels around ((r + 0.5) * scale - 0.5), as skimage's resize samples them.
    offset = 0.5 * scale - 0.5
    geometry = Geometry((scale, scale), (offset - pad_x, offset - pad_y), (1.0, 0.0, 0.0, 1.0))
    space = ModelSpace("xray", (1, size, size), geometry, np.eye(3), tuple(image.array.shape),
                       Geometry.identity(2))

    low_p, high_p = config.percentiles
    high = float(np.percentile(array, high_p))
    low = 0.0 if low_p is None else float(np.percentile(array, low_p))
    if not high > low:
        raise DataError(f"the radiograph has no signal: its {high_p}th percentile is {high:g}, not above {low:g}")
    space.intensity_range = (low, high)
    scaled = np.clip((array.astype(np.float32) - low) / (high - low), 0.0, 1.0)
    padded = np.zeros((side, side), np.float32)
    padded[pad_y:pad_y + h, pad_x:pad_x + w] = scaled
    resized = resize(padded, (size, size), order=1, anti_aliasing=side > size, preserve_range=True)
    extent = space.from_input_grid(np.ones(image.array.shape, np.uint8), "nearest").astype(bool)
    images = np.where(extent, np.clip(resized, 0.0, 1.0)[None], 0.0).astype(np.float32)
    masks = extent if mask is None else space.from_input_grid(_mask_on_grid(mask, image.array.shape)).astype(bool)
    if not masks.any():
        raise DataError("no usable slice: the body mask is empty")
    return SliceSet(images, masks, np.zeros(1, dtype=int), space)


def _mask_on_grid(mask: Image, shape: tuple[int, ...]) -> np.ndarray:
    """A radiograph's body mask (non-zero = body) as uint8 on the radiograph's own pixel grid."""
    if mask.array.size != int(np.prod(shape)) or mask.array.squeeze().shape != tuple(s for s in shape if s != 1):
        raise DataError(f"the radiograph's mask has shape {mask.array.shape}; it must match the image's {shape}")
    return (mask.array != 0).astype(np.uint8).reshape(shape)
