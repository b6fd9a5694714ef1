"""The demo's test case, torch-free (the Slicer panel's self-test uses it before PyTorch is installed): an unseen
subject (Colin27, the bundled reference head) and a synthetic lesion placed in it."""
from __future__ import annotations

import numpy as np

from ra_engine.core.errors import RAError
from ra_engine.core.image import Image
from ra_engine.core.resources import REFERENCES

TEST_SCAN = REFERENCES["colin27"] / "head.nii.gz"
# Lesion centre in LPS mm (Colin27 lies in MNI space): right periventricular white matter, MNI (RAS) (26, -10, 28).
LESION_CENTRE_LPS = (-26.0, 10.0, 28.0)
LESION_RADIUS_MM = 10.0


def insert_lesion(image: Image, centre_lps=LESION_CENTRE_LPS, radius_mm=LESION_RADIUS_MM, seed=0):
    """A textured hypointense sphere at `centre_lps` (mm), about a third of the surrounding tissue's intensity (a
    CSF-like, cavity- or "black hole"-like T1 lesion): returns (image with lesion, lesion mask uint8), both on the
    image's grid."""
    zz, yy, xx = np.indices(image.array.shape)
    index = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], 1).astype(float)
    spacing, origin = np.asarray(image.geometry.spacing), np.asarray(image.geometry.origin)
    direction = np.asarray(image.geometry.direction).reshape(3, 3)
    points = origin + (index * spacing) @ direction.T
    distance = np.linalg.norm(points - np.asarray(centre_lps), axis=1).reshape(image.array.shape)
    mask = distance <= radius_mm
    if not mask.any():
        raise RAError(f"the lesion centre {centre_lps} lies outside the test scan (shape {image.array.shape})")
    rng = np.random.default_rng(seed)
    texture = 1.0 + 0.1 * rng.standard_normal(image.array.shape)
    weight = np.clip((radius_mm - distance) / 2.0, 0.0, 1.0)  # a 2 mm soft edge
    lesioned = image.array * (1 - weight) + 0.35 * image.array * texture * weight
    return Image(lesioned.astype(np.float32), image.geometry, "synthetic lesion"), mask.astype(np.uint8)
