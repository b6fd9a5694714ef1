"""The model space of one scan: where the model's slices lie relative to the scan, and the mapping of model-space
results back onto the scan's own grid (`ModelSpace`); one scan's preprocessed slices (`SliceSet`).

Axis and coordinate conventions are those of `ra_engine.core.image`: arrays (z, y, x) or (y, x); physical points in
ITK's LPS convention, listed (x, y, z), in mm.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import SimpleITK as sitk

from ra_engine.core.image import Geometry, Image
from ra_engine.io.images import array_from_sitk


@dataclass
class ModelSpace:
    """Where the model's slices lie relative to one input scan, and how to map results back onto its grid.

    The model grid is a `shape` = (n_slices, H, W) stack placed by `geometry` (LPS, x-y-z). `affine` is the
    homogeneous matrix (4x4; 3x3 for 2D) that maps a model-space point to the input's point (mm): for brain-mri
    the registration's reference -> scan transform. `input_shape` and `input_geometry` are the input's array shape
    and geometry. For xray the model grid lies in the input's pixel index frame (x = column, y = row, spacing 1,
    origin 0): `input_geometry` is that frame, and the radiograph's own geometry stays with its Image.
    `intensity_range` = (raw value mapped to 0, raw value mapped to 1). `skull_stripped` and `alignment` report
    how the scan was aligned (None and {} for xray). `mask` says which brain/body mask the slices use (a file, or
    the preset's own: the reference brain, the whole radiograph).
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
    mask: str = ""

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
            "mask": self.mask,
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
            mask=data.get("mask", ""),
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
