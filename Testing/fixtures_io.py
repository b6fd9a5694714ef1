"""Helpers shared by the tests: synthetic scans with awkward geometry, a DICOM series written slice by slice with the
tags a scanner would set, a small picklable preprocessing, and a folder of tiny radiographs to train on."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from skimage.transform import resize

from ra_engine.core.image import Geometry, Image
from ra_engine.io.images import kept_locale

SLICE_SIZE = 32


def rotation(yaw: float, pitch: float) -> np.ndarray:
    """A 3x3 rotation: `pitch` about y, then `yaw` about z (radians)."""
    cz, sz, cy, sy = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    return np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]]) @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])


def oblique_geometry(signs: tuple[float, float, float] = (-1.0, 1.0, 1.0)) -> Geometry:
    """Oblique, anisotropic LPS geometry whose axes are mirrored by `signs` (the default flips x: a left-handed
    voxel frame, which NIfTI stores with its qfac)."""
    direction = rotation(0.3, 0.2) @ np.diag(signs)
    return Geometry((0.7, 1.3, 2.9), (-12.5, 30.25, 7.125), tuple(float(v) for v in direction.ravel()))


def random_volume(shape=(5, 6, 7), seed: int = 0, signs: tuple[float, float, float] = (-1.0, 1.0, 1.0)) -> Image:
    """A (z, y, x) float32 volume of values in [0, 1) on `oblique_geometry(signs)`."""
    array = np.random.default_rng(seed).random(shape, dtype=np.float32)
    return Image(array, oblique_geometry(signs))


def write_volume(path: Path, shape=(6, 20, 24), seed: int = 0) -> Path:
    """Writes a random positive (z, y, x) volume to `path` (format by extension) and returns the path."""
    array = (np.random.default_rng(seed).random(shape, dtype=np.float32) * 100 + 1).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def write_dicom_series(folder: Path, array: np.ndarray, geometry: Geometry, series_uid: str,
                       modality: str = "MR") -> list[Path]:
    """Writes the int16 (z, y, x) `array` as one DICOM file per axial slice, with the position, orientation and
    instance tags a scanner writes (SimpleITK's DICOM series example); returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    volume = geometry.apply_to(sitk.GetImageFromArray(array.astype(np.int16)))
    d = geometry.direction
    shared = {
        "0008|0060": modality,
        "0008|0008": "DERIVED\\SECONDARY",
        "0020|000d": "1.2.826.0.1.3680043.2.1125.1.1",
        "0020|000e": series_uid,
        "0020|0037": "\\".join(f"{v:.10g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7])),
        "0008|103e": "synthetic series",
    }
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    files = []
    for k in range(array.shape[0]):
        piece = volume[:, :, k]
        for tag, value in shared.items():
            piece.SetMetaData(tag, value)
        piece.SetMetaData("0020|0032", "\\".join(f"{v:.10g}" for v in volume.TransformIndexToPhysicalPoint((0, 0, k))))
        piece.SetMetaData("0020|0013", str(k + 1))
        piece.SetMetaData("0008|0018", f"{series_uid}.{k + 1}")
        files.append(folder / f"slice{k:03d}.dcm")
        writer.SetFileName(str(files[-1]))
        with kept_locale():  # GDCM's writer sets the C locale
            writer.Execute(piece)
    return files


@dataclass
class FakeSliceSet:
    """What `ra_engine.preprocess` returns: `images` (n, H, W) float32 in [0, 1], `masks` (n, H, W) bool."""

    images: np.ndarray
    masks: np.ndarray


def fake_preprocess(image: Image, mask: Image | None, size: int = SLICE_SIZE) -> FakeSliceSet:
    """Every axial slice (or the 2D image), scaled to [0, 1] over the scan, resized to size x size; the mask is the
    given one resized by nearest neighbour, else the pixels above the scan's minimum."""
    array = image.array if image.is_volume else image.array[None]
    low, high = float(array.min()), float(array.max())
    images = np.stack([resize((s - low) / (high - low), (size, size), order=1, anti_aliasing=False)
                       for s in array]).astype(np.float32)
    if mask is None:
        masks = images > 0
    else:
        m = mask.array if mask.is_volume else mask.array[None]
        masks = np.stack([resize(s > 0, (size, size), order=0, anti_aliasing=False) for s in m]).astype(bool)
    return FakeSliceSet(np.clip(images, 0, 1), masks)


def write_radiographs(folder: Path) -> Path:
    """Eight smooth 16-bit 'radiographs' (40 x 30 PNG) in `folder` (created): 7 training slices and 1 held-out
    scan at `ra train`'s defaults."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:40, 0:30]
    for i in range(8):
        body = np.exp(-(((yy - 20 - rng.integers(-3, 4)) / 14.0) ** 2 + ((xx - 15) / 9.0) ** 2))
        img = (body * 30000 + rng.normal(0, 300, body.shape)).clip(0, 65535).astype(np.uint16)
        sitk.WriteImage(sitk.GetImageFromArray(img), str(folder / f"cxr_{i}.png"))
    return folder
