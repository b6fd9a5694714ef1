"""Data sources from folders, globs, CSV files and lists: images found, masks paired, errors that list problems."""
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from fixtures_io import write_dicom_series, write_volume
from ra_engine.core.errors import DataError
from ra_engine.core.image import Geometry
from ra_engine.io.sources import list_sources, Source


@pytest.fixture
def tree(tmp_path) -> Path:
    """A data folder with masks, a DICOM series, single-file radiographs, hidden and non-image files."""
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    for name in ("a.nii.gz", "a_mask.nii.gz", "b.nrrd", "sub/c.mha", "sub/c_seg.mha", "series1_mask.nii.gz",
                 ".hidden.nii.gz", "orphan_mask.nii.gz"):
        write_volume(root / name, shape=(2, 4, 4))
    (root / ".cache").mkdir()
    write_volume(root / ".cache" / "x.nii.gz", shape=(2, 4, 4))
    (root / "notes.txt").write_text("not an image")
    (root / "sub" / "meta.json").write_text("{}")
    write_dicom_series(root / "series1", np.arange(3 * 8 * 8).reshape(3, 8, 8), Geometry.identity(3),
                       "1.2.826.0.1.3680043.2.1125.11")
    (root / "cr").mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), root / "cr" / "one.dcm")
    shutil.copy(get_testdata_file("MR_small.dcm"), root / "cr" / "IM0002")  # no extension: found by its header
    return root


def test_folder_finds_images_pairs_masks_and_skips_the_rest(tree):
    with pytest.warns(UserWarning, match="1 mask file.*orphan_mask.nii.gz"):
        sources = list_sources(tree)
    found = {s.image.relative_to(tree).as_posix(): s.mask and s.mask.relative_to(tree).as_posix() for s in sources}
    assert found == {
        "a.nii.gz": "a_mask.nii.gz",
        "b.nrrd": None,
        "cr/IM0002": None,
        "cr/one.dcm": None,
        "series1": "series1_mask.nii.gz",  # a DICOM series folder is one source
        "sub/c.mha": "sub/c_seg.mha",
    }
    assert all(s.image.is_absolute() and s.label is None and s.type is None for s in sources)
    assert [s.image for s in sources] == sorted(s.image for s in sources)


def test_glob_patterns(tree):
    with pytest.warns(UserWarning, match="2 mask file.*orphan_mask.nii.gz.*series1_mask.nii.gz"):
        found = list_sources(str(tree / "*.nii.gz"))  # the pattern leaves out the series folder of series1_mask
    assert found == [Source(tree / "a.nii.gz", tree / "a_mask.nii.gz")]
    assert list_sources(str(tree / "**" / "c.mha")) == [Source(tree / "sub" / "c.mha", tree / "sub" / "c_seg.mha")]
    with pytest.raises(DataError, match="no image files match the pattern .*zzz"):
        list_sources(str(tree / "zzz*.nii.gz"))


def test_list_of_files_folders_and_sources(tree):
    given = Source(tree / "a.nii.gz", label=1, type="normal")
    sources = list_sources([tree / "b.nrrd", str(tree / "sub"), given])
    assert sources == [given, Source(tree / "b.nrrd"), Source(tree / "sub" / "c.mha", tree / "sub" / "c_seg.mha")]
    with pytest.raises(DataError, match=r"2 listed source\(s\) do not exist: .*nope1.*nope2"):
        list_sources([tree / "b.nrrd", tree / "nope1.nii", tree / "nope2.nii"])


def test_a_list_reads_its_csv_files_and_expands_its_patterns(tree):
    """`ra train --data cohort.csv` or `--data 'dir/*.nii.gz'` reach list_sources as one-element lists."""
    (tree / "cohort.csv").write_text("image,label\nb.nrrd,0\n")
    assert list_sources([tree / "cohort.csv"]) == [Source(tree / "b.nrrd", None, 0, None)]
    with pytest.warns(UserWarning, match="mask file"):
        found = list_sources([str(tree / "*.nii.gz"), tree / "cohort.csv"])
    assert found == [Source(tree / "b.nrrd", None, 0, None), Source(tree / "a.nii.gz", tree / "a_mask.nii.gz")]


def test_csv_with_relative_paths_labels_and_types(tree):
    table = tree / "cohort.csv"
    table.write_text("\ufeffImage, mask ,label,type\n"  # a BOM and loose header spelling, as spreadsheets write
                     "a.nii.gz,a_mask.nii.gz,1,mass\n"
                     f"{tree / 'b.nrrd'},,0,\n"
                     "series1,,,\n", encoding="utf-8")
    assert list_sources(table) == [
        Source(tree / "a.nii.gz", tree / "a_mask.nii.gz", 1, "mass"),
        Source(tree / "b.nrrd", None, 0, None),
        Source(tree / "series1", None, None, None),
    ]


@pytest.mark.parametrize("text, message", [
    ("path,label\na.nii.gz,0\n", "no 'image' column .*path, label"),
    ("image,mask,label\n", "lists no images"),
    ("image,mask,label\nmissing1.nii.gz,,0\na.nii.gz,missing_mask.nii.gz,1\nmissing2.nrrd,,x\n",
     r"(?s)4 problem.*line 2: image .*missing1.nii.gz does not exist.*line 3: mask .*missing_mask.nii.gz does not exist"
     r".*line 4: image .*missing2.nrrd does not exist.*line 4: label 'x'"),
])
def test_csv_errors_list_every_problem(tree, text, message):
    (tree / "bad.csv").write_text(text)
    with pytest.raises(DataError, match=message):
        list_sources(tree / "bad.csv")


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        list_sources(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(DataError, match="no image files in .*empty"):
        list_sources(tmp_path / "empty")


def test_two_masks_for_one_image_is_an_error(tmp_path):
    for name in ("x.nii.gz", "x_mask.nii.gz", "x_seg.nii.gz"):
        write_volume(tmp_path / name, shape=(2, 4, 4))
    with pytest.raises(DataError, match="has 2 masks"):
        list_sources(tmp_path)
