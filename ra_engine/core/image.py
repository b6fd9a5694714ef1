"""The one in-memory form of an image in the engine: a voxel array plus its physical geometry.

Arrays are in SimpleITK's order, (z, y, x) for volumes and (y, x) for 2D images. Spacing, origin and direction
are in ITK's LPS physical convention, listed (x, y, z): spacing in mm, origin in mm, direction as the row-major
flattened D x D matrix whose columns are the image axes' directions (SimpleITK's `GetDirection()`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk


@dataclass(frozen=True)
class Geometry:
    """Physical placement of a voxel grid (LPS, x-y-z order)."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]

    @property
    def dimension(self) -> int:
        return len(self.spacing)

    @classmethod
    def identity(cls, dimension: int, spacing: tuple[float, ...] | None = None) -> "Geometry":
        eye = tuple(float(v) for v in np.eye(dimension).ravel())
        return cls(tuple(spacing or (1.0,) * dimension), (0.0,) * dimension, eye)

    @classmethod
    def of(cls, image: sitk.Image) -> "Geometry":
        return cls(tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection()))

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        """Sets this geometry on `image` (in place) and returns it."""
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def to_dict(self) -> dict:
        return {"spacing": list(self.spacing), "origin": list(self.origin), "direction": list(self.direction)}


@dataclass
class Image:
    """A scan or radiograph: `array` (z, y, x) or (y, x), float32, raw intensities; `geometry` in LPS."""

    array: np.ndarray
    geometry: Geometry
    source: str = ""
    metadata: dict = field(default_factory=dict)

    @property
    def is_volume(self) -> bool:
        return self.array.ndim == 3

    def to_sitk(self) -> sitk.Image:
        return self.geometry.apply_to(sitk.GetImageFromArray(self.array))

    @classmethod
    def from_sitk(cls, image: sitk.Image, source: str = "", dtype=np.float32) -> "Image":
        return cls(sitk.GetArrayFromImage(image).astype(dtype, copy=False), Geometry.of(image), source)
