"""The bundled models on what a user gives them: the chest model says that another body part or a radiograph in
another orientation is out of its distribution (its image score at a high percentile of normal) instead of
failing; with the real cohort beside the project (../shared/data), the same radiographs upright stay normal."""
import os
from pathlib import Path

import numpy as np
import pydicom.data
import pytest

import ra_engine
from ra_engine.core.image import Geometry, Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("RA_SHARED_DATA") or REPO.parent / "shared" / "data")
CHEST = "chest-xray"


@pytest.fixture(scope="module")
def chest():
    if not (ra_engine.BUNDLED_MODELS_DIR / CHEST).is_dir():
        pytest.skip(f"the {CHEST} model is not bundled in this checkout")
    model = ra_engine.load_model(CHEST, "cpu")
    return model, ra_engine.make_scorer(model)


def percentile(chest, image: Image) -> float:
    model, scorer = chest
    result = ra_engine.detect(model, image, scorer=scorer)
    assert result.anomaly.array.shape == image.array.shape
    return result.calibration.percentile(result.scan_score, "scan")


def picture(array: np.ndarray) -> Image:
    return Image(np.ascontiguousarray(array, dtype=np.float32), Geometry.identity(2))


def test_other_body_parts_and_orientations_are_out_of_distribution(chest):
    head = ra_engine.read_image(REPO / "ra_engine" / "resources" / "reference" / "head.nii.gz").array
    radiograph = ra_engine.read_image(pydicom.data.get_testdata_file("RG1_UNCI.dcm")).array
    cases = {"an axial slice of a head": head[head.shape[0] // 2], "a sagittal slice": head[::-1, :, head.shape[2] // 2],
             "a chest radiograph turned 90 degrees": np.rot90(radiograph)}
    for what, array in cases.items():
        assert percentile(chest, picture(array)) >= 99, what


@pytest.mark.skipif(not (SHARED / "chest-xray" / "normal-train").is_dir(),
                    reason=f"the chest cohort is not in {SHARED} (set RA_SHARED_DATA)")
def test_normal_radiographs_upright_are_normal_and_turned_or_inverted_are_not(chest):
    model, _ = chest
    names = [s["file"] for s in model.card.calibration.scans[:6]]
    upright, other = [], []
    for name in names:
        array = ra_engine.read_image(SHARED / "chest-xray" / "normal-train" / name).array
        upright.append(percentile(chest, picture(array)))
        other += [percentile(chest, picture(np.rot90(array))), percentile(chest, picture(array[::-1])),
                  percentile(chest, picture(array.max() - array))]
    other = np.array(other)
    assert np.median(upright) < 90 and other.min() >= 95 and np.mean(other >= 99) >= 0.9, (upright, other)
