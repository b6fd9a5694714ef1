"""Image reading and writing: geometry round trips, DICOM series and radiographs, 2D pictures, every DataError,
atomic writes."""
import shutil

import warnings

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage
from pydicom.data import get_testdata_file

from fixtures_io import oblique_geometry, random_volume, write_dicom_series
from ra_engine.io import images as imageio
from ra_engine.core.errors import DataError, RAError
from ra_engine.core.image import Geometry, Image
from ra_engine.io.images import output_format_for, read_image, split_extension, validate_image, write_image

# NIfTI stores spacing and the orientation in float32; NRRD and MetaImage write float64 as text.
TOLERANCE = {".nii.gz": 1e-6, ".nii": 1e-6, ".nrrd": 1e-12, ".mha": 1e-12}


def assert_geometry(actual: Geometry, expected: Geometry, atol: float) -> None:
    for name in ("spacing", "origin", "direction"):
        np.testing.assert_allclose(getattr(actual, name), getattr(expected, name), rtol=0, atol=atol, err_msg=name)


@pytest.mark.parametrize("ext", list(TOLERANCE))
@pytest.mark.parametrize("signs", [(-1.0, 1.0, 1.0), (1.0, -1.0, -1.0)], ids=["left-handed", "flipped-yz"])
def test_volume_round_trip_keeps_geometry_and_values(tmp_path, ext, signs):
    image = random_volume(signs=signs)
    path = write_image(image, tmp_path / f"scan{ext}")
    back = read_image(path)
    assert back.array.dtype == np.float32 and np.array_equal(back.array, image.array)
    assert_geometry(back.geometry, image.geometry, TOLERANCE[ext])
    assert back.metadata["format"] == imageio.FORMATS[ext]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"scan{ext}"]  # no temporary left


def test_label_map_and_2d_round_trip(tmp_path):
    labels = Image(np.arange(24).reshape(2, 3, 4) % 3 == 0, oblique_geometry())
    path = write_image(labels, tmp_path / "labels.nrrd")
    assert sitk.ReadImage(str(path)).GetPixelID() == sitk.sitkUInt8  # bool is stored as uint8
    assert np.array_equal(read_image(path).array, labels.array.astype(np.float32))

    flat = Image(np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4), Geometry((0.2, 0.3), (5.0, -2.0), (0, 1, 1, 0)))
    back = read_image(write_image(flat, tmp_path / "flat.nii.gz"))
    assert back.array.shape == (3, 4) and np.array_equal(back.array, flat.array)
    assert_geometry(back.geometry, flat.geometry, 1e-6)


def test_4d_file_with_one_time_point_is_a_volume(tmp_path):
    volume = random_volume().to_sitk()
    sitk.WriteImage(sitk.JoinSeries([volume]), str(tmp_path / "one_frame.nii.gz"))
    image = read_image(tmp_path / "one_frame.nii.gz")
    assert image.array.shape == (5, 6, 7) and np.array_equal(image.array, sitk.GetArrayFromImage(volume))


def test_png_16_bit(tmp_path):
    pixels = np.random.default_rng(1).integers(0, 65536, (40, 30), dtype=np.uint16)
    sitk.WriteImage(sitk.GetImageFromArray(pixels), str(tmp_path / "x.png"))
    image = read_image(tmp_path / "x.png")
    assert np.array_equal(image.array, pixels.astype(np.float32))
    assert image.metadata["pixel_type"] == "uint16" and image.metadata["format"] == "png"

    written = write_image(Image(pixels.astype(np.float32), Geometry.identity(2)), tmp_path / "y.png", dtype="uint16")
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(written))), pixels)


def test_rgb_becomes_grey_with_a_warning(tmp_path):
    rgb = np.random.default_rng(2).integers(0, 256, (8, 9, 3), dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "colour.png"))
    with pytest.warns(UserWarning, match="RGB image converted to grey"):
        image = read_image(tmp_path / "colour.png")
    np.testing.assert_allclose(image.array, rgb @ np.array([0.299, 0.587, 0.114]), atol=1e-4)


def test_grey_stored_as_rgb_is_read_as_its_grey_without_a_warning(tmp_path):
    grey = np.random.default_rng(3).integers(0, 256, (8, 9), dtype=np.uint8)
    PILImage.fromarray(np.repeat(grey[..., None], 3, axis=2)).save(tmp_path / "grey.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = read_image(tmp_path / "grey.png")
    assert np.array_equal(image.array, grey.astype(np.float32))


def test_png_writes_refuse_what_png_cannot_hold(tmp_path):
    with pytest.raises(DataError, match="PNG holds 2D uint8 or uint16"):
        write_image(Image(np.ones((4, 4), np.float32), Geometry.identity(2)), tmp_path / "a.png")
    with pytest.raises(DataError, match="PNG holds 2D"):
        write_image(random_volume(), tmp_path / "b.png", dtype="uint8")
    with pytest.raises(DataError, match="outside"):
        write_image(Image(np.full((4, 4), 300.0, np.float32), Geometry.identity(2)), tmp_path / "c.png", "uint8")
    with pytest.raises(DataError, match="extensions"):
        write_image(random_volume(), tmp_path / "d.vtk")
    assert list(tmp_path.iterdir()) == []


def test_dicom_series_folder(tmp_path):
    geometry = Geometry((0.8, 0.9, 2.5), (-40.0, 12.5, 3.0),
                        tuple(float(v) for v in oblique_geometry((1.0, 1.0, 1.0)).direction))
    array = np.random.default_rng(3).integers(-500, 2000, (6, 16, 12)).astype(np.int16)
    write_dicom_series(tmp_path / "series", array, geometry, "1.2.826.0.1.3680043.2.1125.7")
    image = read_image(tmp_path / "series")
    assert np.array_equal(image.array, array.astype(np.float32))
    assert_geometry(image.geometry, geometry, 1e-6)
    assert image.metadata["format"] == "dicom-series" and image.metadata["modality"] == "MR"
    assert image.metadata["files"] == 6


def test_dicom_folder_with_two_series_reads_the_largest(tmp_path):
    geometry = Geometry((1.0, 1.0, 2.0), (0.0, 0.0, 0.0), tuple(np.eye(3).ravel()))
    rng = np.random.default_rng(4)
    write_dicom_series(tmp_path, rng.integers(0, 100, (2, 8, 8)), geometry, "1.2.826.0.1.3680043.2.1125.8")
    write_dicom_series(tmp_path / "tmp", rng.integers(0, 100, (4, 8, 8)), geometry, "1.2.826.0.1.3680043.2.1125.9")
    for f in (tmp_path / "tmp").iterdir():
        f.rename(tmp_path / f"b{f.name}")
    (tmp_path / "tmp").rmdir()
    with pytest.warns(UserWarning, match="holds 2 DICOM series; reading the largest"):
        image = read_image(tmp_path)
    assert image.array.shape == (4, 8, 8)


def test_radiograph_monochrome1_is_inverted():
    path = get_testdata_file("RG1_UNCI.dcm")
    dataset = pydicom.dcmread(path)
    assert dataset.PhotometricInterpretation == "MONOCHROME1" and dataset.BitsStored == 15
    image = read_image(path)
    assert image.array.shape == dataset.pixel_array.shape and image.array.dtype == np.float32
    # No rescale in this file: inversion mirrors the stored values over their 15-bit range, as GDCM does.
    assert np.array_equal(image.array, (2**15 - 1) - dataset.pixel_array.astype(np.float32))
    assert image.metadata["photometric"] == "MONOCHROME1" and image.metadata["modality"] == "CR"
    assert image.geometry.spacing == (1.0, 1.0) and image.metadata["spacing_from"] is None  # PixelSpacing is 0\0


def test_radiograph_without_pydicom_decoder_uses_gdcm(monkeypatch):
    path = get_testdata_file("RG1_UNCI.dcm")
    expected = read_image(path).array

    def no_decoder(self):
        raise RuntimeError("no pixel data handler for this transfer syntax")

    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(no_decoder))
    assert np.array_equal(read_image(path).array, expected)


def test_dicom_file_rescale_spacing_and_no_extension(tmp_path):
    path = tmp_path / "IM0001"  # scanners often write files without an extension
    shutil.copy(get_testdata_file("CT_small.dcm"), path)
    dataset = pydicom.dcmread(path)
    image = read_image(path)
    expected = dataset.pixel_array * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept)
    assert np.array_equal(image.array, expected.astype(np.float32))
    assert image.geometry.spacing == (float(dataset.PixelSpacing[1]), float(dataset.PixelSpacing[0]))
    assert image.metadata["spacing_from"] == "PixelSpacing" and image.metadata["modality"] == "CT"


def test_multiframe_dicom_is_a_volume():
    image = read_image(get_testdata_file("emri_small.dcm"))
    assert image.array.shape == (10, 64, 64) and image.is_volume


def write_array(path, array):
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


def write_sitk(path, image):
    sitk.WriteImage(image, str(path))
    return path


def garbage(path):
    path.write_bytes(b"not an image " * 20)
    return path


def folder_with(path, *names):
    path.mkdir()
    for name in names:
        (path / name).write_text("x")
    return path


@pytest.mark.parametrize("make, message", [
    (lambda d: d / "missing.nii.gz", "does not exist"),
    (lambda d: garbage(d / "notes.txt"), "unsupported file type '.txt'"),
    (lambda d: garbage(d / "broken.nii.gz"), "cannot read .* damaged"),
    (lambda d: garbage(d / "broken.dcm"), "no DICOM header"),
    (lambda d: write_array(d / "nan.nrrd", np.where(np.eye(4, dtype=bool), np.nan, 1).astype(np.float32)),
     "4 NaN/inf values"),
    (lambda d: write_array(d / "inf.mha", np.full((3, 4, 5), np.inf, np.float32)), "60 NaN/inf values"),
    (lambda d: write_array(d / "blank.nii.gz", np.full((3, 4, 5), 7, np.int16)), "constant image .* 7"),
    (lambda d: write_sitk(d / "t.nii.gz", sitk.JoinSeries([sitk.Image(4, 4, 3, sitk.sitkFloat32)] * 2)),
     "4D sequence .* select one time point"),
    (lambda d: write_sitk(d / "v.nrrd", sitk.Image([4, 4, 3], sitk.sitkVectorFloat32, 3)), "vector-valued volume"),
    (lambda d: folder_with(d / "series"), "DICOM folder .* is empty"),
    (lambda d: folder_with(d / "series", "readme.md"), "no DICOM series found"),
], ids=["missing", "extension", "corrupt", "corrupt-dicom", "nan", "inf", "constant", "4d", "vector",
        "empty-folder", "no-dicom-in-folder"])
def test_data_errors_name_the_problem(tmp_path, make, message):
    with pytest.raises(DataError, match=message):
        read_image(make(tmp_path))


def test_validate_image_checks_dimension_and_spacing():
    with pytest.raises(DataError, match="4 dimensions .* 4D sequence"):
        validate_image(Image(np.ones((2, 2, 2, 2), np.float32), Geometry.identity(3)))
    with pytest.raises(DataError, match="non-positive voxel spacing"):
        validate_image(Image(np.arange(4, dtype=np.float32).reshape(2, 2), Geometry.identity(2, (1.0, 0.0))))
    validate_image(Image(np.arange(4, dtype=np.float32).reshape(2, 2), Geometry.identity(2)))


def test_masks_may_be_constant_when_not_validated(tmp_path):
    path = write_array(tmp_path / "all_brain_mask.nrrd", np.ones((3, 4, 5), np.uint8))
    assert read_image(path, validate=False).array.sum() == 60


@pytest.mark.parametrize("existing", [False, True])
def test_failed_write_leaves_nothing_behind(tmp_path, monkeypatch, existing):
    target = tmp_path / "out.nii.gz"
    if existing:
        target.write_bytes(b"previous result")

    def write_half_then_fail(image, name, *args):
        with open(name, "wb") as f:
            f.write(b"\x1f\x8b half a file")
        raise RuntimeError("ITK ERROR: No space left on device")

    monkeypatch.setattr(imageio.sitk, "WriteImage", write_half_then_fail)
    with pytest.raises(RAError, match="could not write .*No space left on device"):
        write_image(random_volume(), target)
    assert [p.name for p in tmp_path.iterdir()] == (["out.nii.gz"] if existing else [])
    if existing:
        assert target.read_bytes() == b"previous result"


def test_output_format_and_extensions(tmp_path):
    assert [output_format_for(p) for p in ("a.nrrd", "a.nhdr", "a.nii", "a.NII.GZ", "a.mha", "a.mhd", "a.dcm",
                                           "a.png", "a.jpg")] == \
        [".nrrd", ".nrrd", ".nii.gz", ".nii.gz", ".mha", ".mha", ".nii.gz", ".nii.gz", ".nii.gz"]
    assert output_format_for(tmp_path) == ".nii.gz"  # a DICOM series folder
    assert split_extension("sub-01.T1w.nii.gz") == ("sub-01.T1w", ".nii.gz")
    assert split_extension("IM0001") == ("IM0001", "")


def test_arrays_from_sitk_share_the_buffer_and_keep_the_image():
    import gc

    from ra_engine.io.images import array_from_sitk

    source = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    image = sitk.GetImageFromArray(source)
    array = array_from_sitk(image)
    assert array.dtype == np.float32 and array.shape == (2, 3, 4) and array.flags.writeable
    del image
    gc.collect()
    filler = sitk.Image([64, 64, 64], sitk.sitkFloat32) + 7.0  # would reuse freed memory
    assert np.array_equal(array, source)
    array *= 2
    assert np.array_equal(array, 2 * source)
    vector = sitk.GetImageFromArray(np.zeros((3, 4, 2), np.uint8), isVector=True)
    assert array_from_sitk(vector).shape == sitk.GetArrayFromImage(vector).shape == (3, 4, 2)
    del filler
