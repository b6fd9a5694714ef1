"""The sample scan bundled with the extension, for Slicer's Sample Data module (category "RA") and the module's
self-test: the Colin27 average head that ra_engine aligns brain scans to (`ra_engine/resources/reference`), copied
by Sample Data from its installed file (a file:// address, no download) and checked against `SAMPLE_SHA256`; and
`ra demo`'s synthetic lesion, written into a volume node's voxels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

import ra_engine

from .geometry import array_ijk_to_ras, image_from_volume, set_volume_from_image

SAMPLE_NAME = "RAColin27Head"
SAMPLE_FILE_NAME = "RA-Colin27-head.nii.gz"
SAMPLE_SHA256 = "c8423c7c75a0c9c89b486936caff63ce2eba7947e585e657e8f9adfbe69c97c4"
DEMO_MODEL = "brain-t1"  # the brain T1 model bundled with the extension (trained on real normal cohorts; research use)


def sampleScanPath() -> Path:
    """The bundled sample scan (NIfTI), inside the installed ra_engine package."""
    return Path(ra_engine.__file__).resolve().parent / "resources" / "reference" / "head.nii.gz"


def insertSyntheticLesion(volumeNode) -> np.ndarray:
    """Puts `ra demo`'s synthetic lesion (a 10 mm hypointense sphere in the right periventricular white matter, placed
    in LPS mm: the sample is in MNI space) into the volume node's voxels, which become float32; the node's geometry
    stays. Returns the lesion mask, bool, indexed (k, j, i) like `slicer.util.arrayFromVolume`."""
    matrix = array_ijk_to_ras(volumeNode)
    scan, lesion = ra_engine.insert_lesion(image_from_volume(volumeNode))
    set_volume_from_image(volumeNode, scan, matrix)
    return lesion.astype(bool)
