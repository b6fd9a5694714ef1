"""Reading and writing images: NIfTI, NRRD, MetaImage, DICOM (series folders and single files) and 2D pictures.

Every reader returns an `Image`: a float32 array in SimpleITK's order, (z, y, x) for volumes and (y, x) for 2D
images, holding the stored intensities after the DICOM modality rescale (raw values otherwise, not normalised),
with its geometry in ITK's LPS convention listed (x, y, z). Every problem a user can fix raises a `DataError` that
says what was wrong and what to do.
"""
from __future__ import annotations

import gzip
import math
import os
import struct
import contextlib
import locale
import warnings
import zlib
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError

from ra_engine.core.errors import DataError, error_text
from ra_engine.core.files import atomic_write
from ra_engine.core.image import Geometry, Image

try:  # pydicom >= 3
    from pydicom.pixels import apply_modality_lut
except ImportError:  # pydicom 2.x
    from pydicom.pixel_data_handlers.util import apply_modality_lut

# Longest suffixes first so that ".nii.gz" wins over ".gz".
FORMATS = {
    ".nii.gz": "nifti", ".nii": "nifti",
    ".nrrd": "nrrd", ".nhdr": "nrrd",
    ".mha": "metaimage", ".mhd": "metaimage",
    ".dcm": "dicom", ".dicom": "dicom", ".ima": "dicom",
    ".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".tif": "tiff", ".tiff": "tiff", ".bmp": "bmp",
}
WRITE_FORMATS = {".nii.gz": "nifti", ".nii": "nifti", ".nrrd": "nrrd", ".mha": "metaimage", ".png": "png"}
SUPPORTED = ("NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd), DICOM (a file, or a folder "
             "holding one series), PNG, JPEG, TIFF or BMP")
# ITU-R BT.601 luma, as most viewers and Pillow's "L" mode compute grey from RGB.
LUMA = np.array([0.299, 0.587, 0.114])
_OUTPUT_EXTENSIONS = {"nifti": ".nii.gz", "nrrd": ".nrrd", "metaimage": ".mha"}


def split_extension(path: str | Path) -> tuple[str, str]:
    """Splits a file name into (stem, extension), knowing compound extensions: "a.nii.gz" -> ("a", ".nii.gz").
    The extension is lower-case; a name without a dot has the extension ""."""
    name = Path(path).name
    lower = name.lower()
    for ext in FORMATS:
        if lower.endswith(ext) and len(name) > len(ext):
            return name[: -len(ext)], ext
    stem, dot, ext = name.rpartition(".")
    return (stem, "." + ext.lower()) if dot and stem else (name, "")


def is_dicom_file(path: str | Path) -> bool:
    """True for a file with a DICOM extension or, whatever its name, the "DICM" marker at byte 128."""
    path = Path(path)
    if split_extension(path)[1] in (".dcm", ".dicom", ".ima"):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def file_format(path: str | Path) -> str | None:
    """The format name of an image file ("nifti", "nrrd", "metaimage", "dicom", "png", "jpeg", "tiff", "bmp"), or
    None when it is not an image file this module reads."""
    fmt = FORMATS.get(split_extension(path)[1])
    if fmt is None and Path(path).is_file() and is_dicom_file(path):
        return "dicom"
    return fmt


@contextlib.contextmanager
def kept_locale():
    """Restores the process's locale after ITK's readers and writers: GDCM sets the C locale on some DICOM files, after
    which every text file and subprocess output of the process (Slicer's too) would be decoded as ASCII."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        yield
    finally:
        if locale.setlocale(locale.LC_ALL) != saved:
            locale.setlocale(locale.LC_ALL, saved)


def read_image(path: str | Path, *, validate: bool = True) -> Image:
    """Reads a scan or radiograph. `path`: an image file, or a folder holding a DICOM series (the largest series when
    it holds several, with a warning). Returns a float32 array (z, y, x) or (y, x) with LPS geometry (x, y, z);
    DICOM values are after the modality rescale, MONOCHROME1 inverted so that bright means dense; colour 2D images
    become grey with a warning. `validate`: apply `validate_image` (turn it off for masks, which may be constant)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path} does not exist: check the path (relative paths start at {Path.cwd()})")
    if path.is_dir():
        with kept_locale():
            image = _read_dicom_series(path)
    else:
        fmt = file_format(path)
        if fmt is None:
            raise DataError(f"unsupported file type {split_extension(path)[1] or '(no extension)'!r} for {path}: "
                            f"convert it to {SUPPORTED}")
        if fmt == "nifti":
            _check_nifti_complete(path)
        elif fmt in ("jpeg", "bmp"):
            _check_picture_complete(path, fmt)
        with kept_locale():
            image = (_read_dicom_file(path) if fmt == "dicom"
                     else _from_sitk(_sitk_read(path, fmt), path, {"format": fmt}))
    if validate:
        validate_image(image)
    return image


def validate_image(image: Image) -> None:
    """Raises DataError unless `image` is a 2D or 3D array of finite, not all equal values on a geometry of its
    dimension with positive spacing. The one check shared by reading, training and detection."""
    name = image.source or "the image"
    array = image.array
    if array.ndim not in (2, 3):
        raise DataError(f"{name} has {array.ndim} dimensions {array.shape}; a 2D image or a 3D volume is needed "
                        f"(for a 4D sequence select one time point / extract a 3D volume)")
    if array.size == 0:
        raise DataError(f"{name} is empty (shape {array.shape}): the file holds no voxels; re-export it")
    if image.geometry.dimension != array.ndim:
        raise DataError(f"{name}: its geometry is {image.geometry.dimension}D but its array is {array.ndim}D")
    geometry = image.geometry
    if not all(math.isfinite(s) and s > 0 for s in geometry.spacing):
        raise DataError(f"{name} has a non-positive voxel spacing, or one that is not a number, "
                        f"{geometry.spacing}: fix the file's header")
    direction = np.asarray(geometry.direction, dtype=np.float64).reshape(array.ndim, array.ndim)
    if not (np.isfinite(geometry.origin).all() and np.isfinite(direction).all()
            and abs(np.linalg.det(direction)) > 1e-6):
        raise DataError(f"{name} has an unusable geometry (origin {geometry.origin}, direction {geometry.direction}): "
                        f"the origin must be finite and the axes' directions independent; fix the file's header")
    finite = np.isfinite(array)
    if not finite.all():
        bad = array.size - int(np.count_nonzero(finite))
        raise DataError(f"{name} contains {bad} NaN/inf values: replace them (e.g. by the background value) "
                        f"before using the image")
    low, high = array.min(), array.max()
    if low == high:
        raise DataError(f"{name} is a constant image (every value is {float(low):g}): it holds no anatomy; check "
                        f"that the right file was exported")


def write_image(image: Image, path: str | Path, dtype: str | np.dtype | None = None) -> Path:
    """Writes `image` atomically (a temporary file in the same folder, then a rename), so that `path` is either the
    complete new file or untouched. The format follows the extension: NIfTI (.nii, .nii.gz), NRRD (.nrrd) or
    MetaImage (.mha) keep the geometry; PNG (.png) holds 2D uint8 or uint16 pixels only. `dtype`: the stored pixel
    type (float arrays are rounded into an integer type, and must fit it); default: the array's own."""
    path = Path(path)
    fmt = WRITE_FORMATS.get(split_extension(path)[1])
    if fmt is None:
        raise DataError(f"cannot write {path}: use one of the extensions {', '.join(WRITE_FORMATS)}")
    array = _as_dtype(image.array, np.dtype(dtype) if dtype is not None else image.array.dtype, path)
    if fmt == "png":
        if array.ndim != 2 or array.dtype not in (np.uint8, np.uint16):
            raise DataError(f"cannot write {path}: PNG holds 2D uint8 or uint16 images, this one is {array.ndim}D "
                            f"{array.dtype} (write a volume as .nii.gz, or pass dtype='uint8'/'uint16')")
    sitk_image = image.geometry.apply_to(sitk.GetImageFromArray(array))

    def write(temporary: Path) -> None:
        try:
            with kept_locale():
                sitk.WriteImage(sitk_image, str(temporary), True)
        except RuntimeError as error:  # ITK's failures (a full disk among them)
            raise OSError(error_text(error)) from error

    return atomic_write(path, write, suffix=split_extension(path)[1])


def output_format_for(input_path: str | Path) -> str:
    """The extension of outputs derived from `input_path`: NRRD stays ".nrrd", MetaImage ".mha", NIfTI ".nii.gz";
    DICOM and 2D pictures, which cannot carry a float map with its geometry, give ".nii.gz"."""
    input_path = Path(input_path)
    fmt = None if input_path.is_dir() else FORMATS.get(split_extension(input_path)[1])
    return _OUTPUT_EXTENSIONS.get(fmt, ".nii.gz")


class _PixelBuffer:
    """Exposes a SimpleITK image's pixel buffer to numpy (`__array_interface__`) and keeps the image alive for as
    long as an array uses it."""

    def __init__(self, image: sitk.Image):
        view = sitk.GetArrayViewFromImage(image)  # makes the buffer the image's own (MakeUnique)
        interface = dict(view.__array_interface__)
        interface["data"] = (interface["data"][0], False)  # writable: nothing else shares this buffer
        self.__array_interface__ = interface
        self._image = image


def array_from_sitk(image: sitk.Image) -> np.ndarray:
    """The pixels of `image` as a writable numpy array (z, y, x) without copying them, as `sitk.GetArrayFromImage`
    gives them: the array holds the image (give it an image nothing else uses, e.g. a filter's fresh output; a
    volume's copy costs 0.05-0.1 s). Vector images get their components as the last axis."""
    array = np.asarray(_PixelBuffer(image))
    assert array.base is not None
    return array


def _sitk_read(path: Path, fmt: str) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        raise DataError(f"cannot read {path} as {fmt}: the file is damaged or not what its extension says "
                        f"({error_text(error)}); re-export it") from error


def _nifti_data_end(header: bytes) -> int | None:
    """Where the voxel data of a single-file NIfTI-1 or NIfTI-2 image end (bytes from the start of its uncompressed
    content), from its header; None for a header whose size cannot be told this way (ITK then judges the file)."""
    for order in "<>":
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348 and header[344:348] == b"n+1\0":
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = struct.unpack(order + "f", header[108:112])[0]
        elif len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540 and header[4:8] == b"n+2\0":
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
        else:
            continue
        rank = dims[0]
        if not (1 <= rank <= 7 and bitpix > 0 and all(d >= 1 for d in dims[1:rank + 1]) and offset >= 348):
            return None
        return int(offset) + (math.prod(dims[1:rank + 1]) * bitpix + 7) // 8
    return None


def _check_nifti_complete(path: Path) -> None:
    """DataError when a NIfTI file holds fewer bytes than its header says its voxels take: ITK reads a truncated
    file without complaint and fills the missing voxels with zeros. A .nii.gz is measured by its gzip trailer, and
    decompressed to count only when the trailer does not match (several gzip members, trailing data)."""
    compressed = path.name.lower().endswith(".gz")
    damaged = (f"{path} is truncated or damaged: it holds fewer bytes than its header says its voxels need (an "
               f"interrupted copy or download?); copy or export it again")
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as f:
            end = _nifti_data_end(f.read(540))
    except (EOFError, zlib.error) as error:  # a gzip stream that ends inside the header
        raise DataError(f"{damaged} ({error_text(error)})") from error
    except OSError:  # not gzip at all, or unreadable: ITK's reading says what it is
        return
    if end is None:
        return
    try:
        if not compressed:
            if os.path.getsize(path) < end:
                raise DataError(damaged)
            return
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            if struct.unpack("<I", f.read(4))[0] == end % 2**32:
                return
        size = 0
        with gzip.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                size += len(block)
                if size >= end:
                    return
        raise DataError(damaged)
    except (EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise DataError(f"{damaged} ({error_text(error)})") from error
    except OSError as error:
        raise DataError(f"cannot read {path}: {error_text(error)}") from error


def _check_picture_complete(path: Path, fmt: str) -> None:
    """DataError for a JPEG or BMP file that ITK would read without an error though it is cut short (the missing
    rows grey or black), or, for a BMP, that could crash ITK's decoder: a BMP whose header does not describe an
    uncompressed image that fits in the file, a JPEG that Pillow finds truncated (files Pillow cannot judge are left
    to ITK)."""
    truncated = (f"{path} is truncated: the {fmt.upper()} file ends before its last pixels (an interrupted copy or "
                 f"download?); copy or export it again")
    if fmt == "bmp":
        _check_bmp(path, truncated)
        return
    from PIL import Image as Picture  # Pillow: a dependency, imported only here (Slicer loads ra_engine early)

    try:
        with Picture.open(path) as picture:
            picture.load()
    except OSError as error:
        if "truncated" in str(error):
            raise DataError(truncated) from error
    except Exception:  # a variant Pillow does not decode: ITK's reading decides
        pass


def _check_bmp(path: Path, truncated: str) -> None:
    """A BMP with a Windows header (BITMAPINFOHEADER or later) must be uncompressed (or bit fields) and hold all its
    rows: ITK's decoder of run-length compressed BMPs crashes the process on damaged data."""
    with open(path, "rb") as f:
        header = f.read(34)
    if len(header) < 34 or header[:2] != b"BM" or struct.unpack("<I", header[14:18])[0] < 40:
        return  # not a BMP ITK takes for one, or an OS/2 header: ITK's reading says what it is
    file_size, offset = struct.unpack("<I", header[2:6])[0], struct.unpack("<I", header[10:14])[0]
    width, height, _, bits, compression = struct.unpack("<iiHHI", header[18:34])
    if compression not in (0, 3):
        raise DataError(f"{path} is a compressed BMP (compression {compression}), which is not read: convert it to "
                        f"PNG")
    if bits not in (1, 4, 8, 16, 24, 32) or width == 0 or height == 0:
        raise DataError(f"{path} is a damaged BMP: its header gives {width} x {height} pixels of {bits} bits; export "
                        f"it again")
    rows = (bits * abs(width) + 31) // 32 * 4 * abs(height)
    if os.path.getsize(path) < max(file_size, offset + rows):
        raise DataError(truncated)


def _from_sitk(image: sitk.Image, path: Path, metadata: dict) -> Image:
    """Turns a SimpleITK image into an `Image`: 4D and vector-valued volumes are refused, colour 2D becomes grey."""
    if image.GetDimension() == 4 and image.GetSize()[3] == 1:
        image = image[:, :, :, 0]
    if image.GetDimension() > 3:
        raise DataError(f"{path} is a 4D sequence of size {image.GetSize()} (x, y, z, t): select one time point / "
                        f"extract a 3D volume and give that file")
    components = image.GetNumberOfComponentsPerPixel()
    array = array_from_sitk(image)  # the image just read: no copy (float32 files stay as read)
    metadata = {**metadata, "pixel_type": array.dtype.name, "components": components}
    if components > 1:
        if image.GetDimension() == 3:
            raise DataError(f"{path} is a vector-valued volume ({components} values per voxel, e.g. colour, tensor "
                            f"or displacement): extract a 3D volume with one value per voxel")
        array = to_grey(array, path)
    return Image(array.astype(np.float32, copy=False), Geometry.of(image), str(path), metadata)


def to_grey(array: np.ndarray, path: Path | str) -> np.ndarray:
    """(y, x, c) colour pixels -> (y, x) grey: luminance of RGB(A), the grey channel of grey+alpha, with a warning
    that names `path` (the file, or what the array is); grey pixels stored as RGB(A) (three equal channels) become
    their grey without a warning."""
    channels = array.shape[-1]
    if channels == 2:
        warnings.warn(f"{path}: grey+alpha image, the alpha channel is dropped", stacklevel=2)
        return array[..., 0]
    if channels in (3, 4) and (array[..., 0] == array[..., 1]).all() and (array[..., 1] == array[..., 2]).all():
        return array[..., 0]  # grey stored as RGB (8-bit JPEG radiographs often are): its grey, nothing lost
    if channels in (3, 4):
        warnings.warn(f"{path}: {'RGBA' if channels == 4 else 'RGB'} image converted to grey "
                      f"(luminance 0.299 R + 0.587 G + 0.114 B{', alpha dropped' if channels == 4 else ''})",
                      stacklevel=2)
        return array[..., :3].astype(np.float64) @ LUMA
    raise DataError(f"{path} has {channels} channels per pixel: give a grey or RGB image")


def _read_dicom_series(folder: Path) -> Image:
    if not any(folder.iterdir()):
        raise DataError(f"the DICOM folder {folder} is empty: point to the folder that holds the series' files")
    series = {sid: sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid)
              for sid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))}
    if not series:
        raise DataError(f"no DICOM series found in the folder {folder}: it holds no readable DICOM files (sub-folders "
                        f"are not searched; for other images give the file itself, not its folder)")
    uid = max(series, key=lambda s: len(series[s]))
    files = series[uid]
    if len(series) > 1:
        warnings.warn(f"{folder} holds {len(series)} DICOM series; reading the largest ({len(files)} files, series "
                      f"{uid}): put each series in its own folder to choose another", stacklevel=2)
    if len(files) == 1:
        return _read_dicom_file(Path(files[0]))
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise DataError(f"cannot read the DICOM series in {folder} ({error_text(error)}): its slices may differ "
                        f"in size or be damaged; convert it to NIfTI with a DICOM converter") from error

    def tag(key: str) -> str | None:
        value = reader.GetMetaData(0, key).strip() if reader.HasMetaDataKey(0, key) else ""
        return value or None

    _check_slice_spacing(reader, image, folder)
    metadata = {"format": "dicom-series", "modality": tag("0008|0060"), "photometric": tag("0028|0004"),
                "series_uid": uid, "files": len(files)}
    return _from_sitk(image, folder, metadata)


# Slice positions of a series may vary by this share of their spacing (scanners round them); a larger gap is a
# missing slice (a damaged or left-out file), which ITK would read onto an evenly spaced grid all the same.
SLICE_SPACING_TOLERANCE = 0.2


def _check_slice_spacing(reader: sitk.ImageSeriesReader, image: sitk.Image, folder: Path) -> None:
    """DataError when the slices of a DICOM series (their ImagePositionPatient along the slice normal) are not
    evenly spaced: a slice is missing or the series mixes stacks."""
    try:
        positions = np.array([[float(v) for v in reader.GetMetaData(i, "0020|0032").split("\\")]
                              for i in range(len(reader.GetFileNames()))])
    except (RuntimeError, ValueError):  # no positions to compare: ITK's reading stands
        return
    if positions.ndim != 2 or positions.shape != (len(reader.GetFileNames()), 3) or len(positions) < 3:
        return
    normal = np.array(image.GetDirection()).reshape(3, 3)[:, 2]
    gaps = np.diff(np.sort(positions @ normal))
    spacing = float(np.median(gaps))
    if spacing > 0 and np.abs(gaps - spacing).max() > SLICE_SPACING_TOLERANCE * spacing:
        at = int(np.argmax(np.abs(gaps - spacing)))
        raise DataError(f"the DICOM series in {folder} is not evenly spaced: slices {at + 1} and {at + 2} (by "
                        f"position) are {gaps[at]:.3g} mm apart where the others are {spacing:.3g} mm (a missing, "
                        f"damaged or extra slice file?); check that every file of the series is there and intact")


def _read_dicom_file(path: Path) -> Image:
    """A single DICOM file: a radiograph or one slice (pydicom, 2D, spacing from PixelSpacing or ImagerPixelSpacing,
    else 1 mm), or a multi-frame volume (SimpleITK)."""
    try:
        ds = pydicom.dcmread(str(path))
    except InvalidDicomError as error:
        raise DataError(f"cannot read {path} as DICOM: it has no DICOM header (the file is damaged or not "
                        f"DICOM)") from error
    except (OSError, ValueError, EOFError) as error:
        raise DataError(f"cannot read {path} as DICOM ({error_text(error)}): the file is damaged or not "
                        f"DICOM") from error
    if "PixelData" not in ds:
        raise DataError(f"{path} is a DICOM file without an image (e.g. a DICOMDIR, report or presentation "
                        f"state): give the image files instead")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper() or None
    metadata = {"format": "dicom", "modality": ds.get("Modality") or None, "photometric": photometric}
    if ds.get("BodyPartExamined"):
        metadata["body_part"] = str(ds.BodyPartExamined)
    if int(ds.get("NumberOfFrames") or 1) > 1:
        return _from_sitk(_sitk_read(path, "dicom"), path, metadata)
    try:
        raw = ds.pixel_array
    except Exception as error:  # no decoder for this transfer syntax in pydicom's environment
        array = _dicom_pixels_via_gdcm(path, error)
        metadata["pixel_type"] = array.dtype.name
    else:
        metadata["pixel_type"] = raw.dtype.name
        if raw.ndim == 3:
            array = to_grey(raw, path)
        else:
            array = apply_modality_lut(raw, ds)
            if photometric == "MONOCHROME1":
                array = _monochrome1_to_2(array, ds)
    spacing, metadata["spacing_from"] = (1.0, 1.0), None
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        if value is not None and len(value) == 2 and all(float(v) > 0 for v in value):
            spacing, metadata["spacing_from"] = (float(value[1]), float(value[0])), key  # DICOM lists (row, column)
            break
    return Image(np.asarray(array, dtype=np.float32), Geometry.identity(2, spacing), str(path), metadata)


def _dicom_pixels_via_gdcm(path: Path, pydicom_error: Exception) -> np.ndarray:
    """Pixels of a single-frame DICOM file decoded by SimpleITK's GDCM, which applies the modality rescale and
    inverts MONOCHROME1 itself, like the pydicom path."""
    try:
        array = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    except RuntimeError as error:
        raise DataError(f"cannot decode the pixels of {path}: pydicom said {error_text(pydicom_error)!r}, GDCM "
                        f"said {error_text(error)!r}; convert it to an uncompressed DICOM or PNG") from error
    array = array.reshape(array.shape[-3:] if array.ndim == 4 else array.shape[-2:])  # drop the single z
    return to_grey(array, path) if array.ndim == 3 else array


def _monochrome1_to_2(values: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Mirrors modality values over the range the stored bits can hold, so bright means dense (as GDCM does)."""
    bits = int(ds.BitsStored)
    signed = int(ds.get("PixelRepresentation", 0)) == 1
    stored_range = np.array([-(1 << (bits - 1)), (1 << (bits - 1)) - 1] if signed else [0, (1 << bits) - 1])
    ends = np.asarray(apply_modality_lut(stored_range, ds), dtype=np.float64)
    return ends.min() + ends.max() - np.asarray(values, dtype=np.float64)


def _as_dtype(array: np.ndarray, dtype: np.dtype, path: Path) -> np.ndarray:
    """`array` in `dtype`; bool becomes uint8; floats going to an integer type are rounded and must fit it."""
    if dtype == np.bool_:
        dtype = np.dtype(np.uint8)
    if array.dtype == dtype:
        return array
    if np.issubdtype(dtype, np.integer) and not np.issubdtype(array.dtype, np.integer):
        info = np.iinfo(dtype)
        if array.size and not (np.isfinite(array).all() and info.min <= array.min() and array.max() <= info.max):
            raise DataError(f"cannot write {path} as {dtype}: values span [{np.nanmin(array):g}, "
                            f"{np.nanmax(array):g}], outside [{info.min}, {info.max}]; scale the image first")
        array = np.rint(array)
    return array.astype(dtype)
