"""2D brain slices in the brain-mri model space: axial slices cut out of a 3D subject and given as plain pictures
(no geometry, no pixel size) land at the level, place and size where the 3D path puts that subject; a picture that
is not a brain slice is refused; slices and volumes go into one slice store."""
from pathlib import Path

import numpy as np
import pytest

from fixtures_io import fake_preprocess
from ra_engine.core.errors import DataError
from ra_engine.core.image import Geometry, Image
from ra_engine.io.images import read_image
from ra_engine.preprocess.pipeline import preprocess
from ra_engine.preprocess.presets import preset_config
from ra_engine.training.pipeline import TrainingPreprocess
from ra_engine.training.slicestore import SliceStore
from ra_engine.io.sources import Source

SAMPLES = Path(__file__).resolve().parents[1] / "ra_engine" / "resources" / "samples"
CONFIG = preset_config("brain-mri", image_size=64)


@pytest.fixture(scope="module")
def subject():
    """A skull-stripped subject in its own grid (the FSL MNI152 brain, 1.5 mm) and its 3D model-space slices."""
    volume = read_image(SAMPLES / "fsl_mni152_t1_brain.nii.gz")
    return volume, preprocess(volume, CONFIG, skull_stripped=True)


def level_of(volume: Image, slices, k: int) -> float:
    """The model-space level (fractional slice index) where the 3D path puts the centre of native axial slice k."""
    g = volume.geometry
    direction = np.asarray(g.direction).reshape(3, 3)
    index = np.array([volume.array.shape[2] / 2, volume.array.shape[1] / 2, k])
    point = np.asarray(g.origin) + direction @ (index * np.asarray(g.spacing))
    model = np.linalg.inv(slices.space.affine) @ np.r_[point, 1.0]
    return (model[2] - slices.space.geometry.origin[2]) / slices.space.geometry.spacing[2]


@pytest.mark.parametrize("k", [36, 49, 75])  # lower, middle and upper brain
def test_a_slice_cut_out_of_a_volume_lands_where_the_3d_path_puts_it(subject, k):
    volume, slices = subject
    picture = Image(volume.array[k] * 3.7 + 20.0, Geometry.identity(2), "a cut-out slice")  # other intensity units
    placed = preprocess(picture, CONFIG, training=True)
    level = placed.space.alignment["level"]
    assert abs(level - level_of(volume, slices, k)) <= 1.0
    same = slices.images[list(slices.positions).index(level)]
    overlap = 2 * (placed.masks[0] & (same > 0)).sum() / (placed.masks[0].sum() + (same > 0).sum())
    assert overlap > 0.9, f"the brain lands where the 3D path puts it (Dice {overlap:.2f})"
    both = placed.masks[0] & (same > 0)
    assert np.corrcoef(placed.images[0][both], same[both])[0, 1] > 0.7
    assert placed.images.shape == (1, 64, 64) and placed.images.max() <= 1 and placed.images.min() >= 0
    assert placed.space.mask == "the slice's foreground"


def test_a_slice_maps_back_onto_its_own_pixels(subject):
    volume, _ = subject
    picture = Image(volume.array[49], Geometry.identity(2), "a cut-out slice")
    placed = preprocess(picture, CONFIG)
    back = placed.space.to_input_grid(placed.masks.astype(np.uint8), "nearest")
    brain = volume.array[49] > 0.08 * np.percentile(volume.array[49], 99)
    overlap = 2 * (back.astype(bool) & brain).sum() / (back.astype(bool).sum() + brain.sum())
    assert back.shape == picture.array.shape and overlap > 0.9


def test_a_picture_that_is_not_a_brain_slice_is_refused():
    rng = np.random.default_rng(0)
    noise = Image(rng.random((80, 90)).astype(np.float32), Geometry.identity(2), "noise")
    with pytest.raises(DataError, match="alignment failed|no brain"):
        preprocess(noise, CONFIG)
    with pytest.raises(DataError, match="constant"):
        preprocess(Image(np.zeros((40, 40), np.float32), Geometry.identity(2), "black"), CONFIG)


def test_slices_and_volumes_go_into_one_store_for_brain_mri_only(tmp_path, subject):
    volume, _ = subject
    import SimpleITK as sitk

    picture = (255 * volume.array[49] / volume.array.max()).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(picture), str(tmp_path / "slice.png"))
    sources = [Source(SAMPLES / "fsl_mni152_t1_brain.nii.gz"), Source(tmp_path / "slice.png")]
    store = SliceStore.build(sources, TrainingPreprocess(CONFIG), tmp_path / "cache", {"test": 1})
    assert store.slice_counts[1] == 1 and store.slice_counts[0] > 20 and store.images.shape[1:] == (64, 64)
    assert TrainingPreprocess(CONFIG).mixed_dimensions
    assert not TrainingPreprocess(preset_config("xray", image_size=64)).mixed_dimensions
    with pytest.raises(DataError, match="mixed dimensions"):  # a preprocessing that does not say it mixes them
        SliceStore.build(sources, fake_preprocess, tmp_path / "other", {"test": 2})
