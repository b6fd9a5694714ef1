"""Truncated and corrupted files of every supported format: NIfTI (.nii, .nii.gz), NRRD, MetaImage, DICOM (a file and
a series folder), PNG (8 and 16 bit), JPEG, TIFF and BMP. A file cut short is refused with a DataError, also where
ITK reads it without complaint (a truncated .nii, .nii.gz, JPEG or BMP: the missing voxels would silently be zeros
or grey; a series missing a slice); a file with damaged bytes is read (its values are what the file says) or
refused with a DataError, never with another exception; and `ra detect` reports such a file and writes nothing for
it while the other inputs are done."""
from __future__ import annotations

import locale
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from hypothesis import event, given, settings
from hypothesis import strategies as st

from fixtures_io import oblique_geometry, write_dicom_series, write_radiographs
from ra_engine.core.errors import DataError
from ra_engine.core.image import Image
from ra_engine.io.images import read_image, validate_image
from robust_helpers import scaled

VOLUME = (np.random.default_rng(0).random((10, 20, 24)) * 1000).astype(np.int16)
PICTURE = (np.random.default_rng(1).random((40, 30)) * 255).astype(np.uint8)
PICTURE_16 = (np.random.default_rng(2).random((40, 30)) * 60000).astype(np.uint16)
# name -> (array, extension); every format the readers take, written as the usual tools write them.
FORMATS = {
    "nifti": (VOLUME, ".nii"), "nifti-gz": (VOLUME, ".nii.gz"), "nrrd": (VOLUME, ".nrrd"),
    "metaimage": (VOLUME, ".mha"), "dicom": (PICTURE_16, ".dcm"), "png": (PICTURE, ".png"),
    "png-16": (PICTURE_16, ".png"), "jpeg": (PICTURE, ".jpg"), "tiff": (PICTURE, ".tif"), "bmp": (PICTURE, ".bmp"),
}


def write_format(folder: Path, name: str) -> Path:
    """A small, valid file of the format `name` in `folder`."""
    array, extension = FORMATS[name]
    path = folder / f"{name}{extension}"
    image = oblique_geometry((1.0, 1.0, 1.0)).apply_to(sitk.GetImageFromArray(array)) if array.ndim == 3 else \
        sitk.GetImageFromArray(array)
    sitk.WriteImage(image, str(path), name == "nifti-gz")
    return path


@pytest.fixture(scope="module")
def originals(tmp_path_factory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("formats")
    return {name: write_format(folder, name).read_bytes() for name in FORMATS}


def read_outcome(path: Path) -> str:
    """"read" (an image that passes `validate_image`), or "DataError" with a message; anything else fails."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            image = read_image(path)
        except DataError as exc:
            assert str(exc).strip()
            return "DataError"
    assert isinstance(image, Image) and image.array.dtype == np.float32
    validate_image(image)
    return "read"


def test_every_format_is_read_whole(originals, tmp_path):
    for name, data in originals.items():
        path = tmp_path / f"{name}{FORMATS[name][1]}"
        path.write_bytes(data)
        assert read_outcome(path) == "read", name


# Where each file is cut: nothing left, inside the header, half of it, all but its last byte.
CUTS = {"empty": lambda n: 0, "header": lambda n: 100, "half": lambda n: n // 2, "last-byte": lambda n: n - 1}
# Bytes at a file's end that hold no pixels: TIFF writes its tags after the pixels (ITK reads the image whole
# without them).
NO_PIXELS_AT_THE_END = {"tiff"}


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("name", FORMATS)
def test_a_truncated_file_is_refused(originals, tmp_path, name, cut):
    data = originals[name]
    path = tmp_path / f"cut{FORMATS[name][1]}"
    path.write_bytes(data[:CUTS[cut](len(data))])
    outcome = read_outcome(path)
    if cut == "last-byte" and name in NO_PIXELS_AT_THE_END:
        assert outcome in ("read", "DataError")
    else:
        assert outcome == "DataError", f"a {name} file cut at {cut} was read"


def test_a_truncated_nifti_is_measured_by_its_header_also_when_gzip_members_are_concatenated(tmp_path):
    """A .nii.gz written as several gzip members (pigz -i, concatenated parts) is measured by decompressing it when
    its trailer does not give the size; whole, it is read, cut inside the data, refused."""
    import gzip

    whole = tmp_path / "whole.nii"
    sitk.WriteImage(sitk.GetImageFromArray(VOLUME), str(whole))
    raw = whole.read_bytes()
    members = tmp_path / "members.nii.gz"
    members.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:]))
    assert read_outcome(members) == "read"
    short = tmp_path / "short.nii.gz"
    short.write_bytes(gzip.compress(raw[:5000]) + gzip.compress(raw[5000:-10]))
    assert read_outcome(short) == "DataError"


@pytest.mark.parametrize("damage", ["truncated", "removed"])
def test_a_dicom_series_missing_a_slice_is_refused(tmp_path, damage):
    files = write_dicom_series(tmp_path / "series", VOLUME, oblique_geometry((1.0, 1.0, 1.0)), "1.2.826.0.1.99")
    assert read_outcome(tmp_path / "series") == "read"
    if damage == "truncated":
        files[4].write_bytes(files[4].read_bytes()[:1000])
    else:
        files[4].unlink()
    before = locale.setlocale(locale.LC_ALL)
    with pytest.raises(DataError, match="not evenly spaced"):
        read_image(tmp_path / "series")
    assert locale.setlocale(locale.LC_ALL) == before, "GDCM's C locale does not outlive the read"


@pytest.mark.long
@settings(max_examples=scaled(60, 600), deadline=None)
@given(name=st.sampled_from(sorted(FORMATS)), where=st.integers(0, 999),
       count=st.integers(1, 16), value=st.integers(0, 255))
def test_damaged_bytes_give_an_image_or_a_data_error(originals, tmp_path_factory, name, where, count, value):
    """`count` bytes overwritten with `value` at `where` thousandths of the file's length: header or pixels."""
    data = bytearray(originals[name])
    start = where * len(data) // 1000
    data[start:start + count] = bytes([value]) * len(data[start:start + count])
    path = tmp_path_factory.mktemp("damaged") / f"damaged{FORMATS[name][1]}"
    path.write_bytes(bytes(data))
    event(f"{name}: {read_outcome(path)}")


@pytest.mark.parametrize("content", [b"", b"\0" * 4096, b"not an image at all\n" * 50, b"PK\x03\x04" + b"\xff" * 600])
@pytest.mark.parametrize("extension", sorted({ext for _, ext in FORMATS.values()}))
def test_a_file_that_is_not_what_its_extension_says_is_refused(tmp_path, extension, content):
    path = tmp_path / f"scan{extension}"
    path.write_bytes(content)
    assert read_outcome(path) == "DataError"


def test_ra_detect_reports_a_damaged_input_writes_nothing_for_it_and_does_the_others(tiny_models, tmp_path, capsys):
    from ra_engine.cli import main

    folder = write_radiographs(tmp_path / "inputs")
    good = sorted(folder.glob("*.png"))[:2]
    for path in sorted(folder.glob("*.png"))[2:]:
        path.unlink()
    damaged = folder / "damaged.png"
    damaged.write_bytes(good[0].read_bytes()[:-200])
    truncated_nii = folder / "cut.nii"
    sitk.WriteImage(sitk.GetImageFromArray(PICTURE.astype(np.float32)), str(truncated_nii))
    truncated_nii.write_bytes(truncated_nii.read_bytes()[:-100])
    out = tmp_path / "out"
    model = tiny_models["xray"].path
    code = main(["detect", str(folder), "--model", str(model), "--out", str(out), "--threshold", "0.1",
                 "--device", "cpu"])
    err = capsys.readouterr().err
    assert code != 0 and "damaged.png" in err and "cut.nii" in err and "truncated" in err
    written = sorted(p.name for p in out.iterdir())
    assert all(not name.startswith(("damaged", "cut", ".")) for name in written), written
    assert {name.split("_")[0] + "_" + name.split("_")[1] for name in written} == {p.stem for p in good}
    assert len(written) == 5 * len(good)
    shutil.rmtree(out)


@pytest.mark.parametrize("offset, value", [(30, 1), (30, 2), (28, 7), (18, 0)], ids=["rle8", "rle4", "7-bit", "width-0"])
def test_a_bmp_header_that_would_crash_itk_is_refused(originals, tmp_path, offset, value):
    """A damaged BMP header (found by the full form of the byte damage test: its compression field turned to
    run-length) crashed SimpleITK's decoder with a segmentation fault, which ends the process (Slicer with it). Read
    in a child process here, so that a crash fails this test instead of ending the run."""
    import subprocess
    import sys

    from robust_helpers import REPO, child_env

    data = bytearray(originals["bmp"])
    data[offset:offset + 2] = value.to_bytes(2, "little")
    path = tmp_path / "damaged.bmp"
    path.write_bytes(bytes(data))
    code = ("from ra_engine.core.errors import DataError\nfrom ra_engine.io.images import read_image\n"
            f"try:\n    read_image({str(path)!r})\nexcept DataError as exc:\n    print('DataError', exc)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env(), cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, f"reading crashed the process (exit {done.returncode})"
    assert done.stdout.startswith("DataError"), done.stdout
