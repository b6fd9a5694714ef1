"""One scan -> its model-space slices, by the preset its configuration names.

Axis and coordinate conventions are those of `ra_engine.core.image`: arrays (z, y, x) or (y, x); physical points in
ITK's LPS convention, listed (x, y, z), in mm."""
from __future__ import annotations

from ra_engine.core.errors import DataError, error_text
from ra_engine.core.image import Image
from ra_engine.preprocess.brain import preprocess_brain
from ra_engine.preprocess.presets import PresetConfig
from ra_engine.preprocess.slices import preprocess_brain_slice
from ra_engine.preprocess.space import SliceSet
from ra_engine.preprocess.xray import preprocess_xray


def preprocess(image: Image, config: PresetConfig, mask: Image | None = None, *, training: bool = False,
               skull_stripped: bool | None = None) -> SliceSet:
    """Turns one scan into the model's slices (see the module docstring for each preset).

    image: raw intensities, (z, y, x) for brain-mri; (y, x) or a one-slice (1, y, x) for xray; LPS geometry.
    mask: optional brain/body mask (non-zero = inside): brain-mri, on any grid with its own geometry (resampled by
        nearest neighbour; the reference's brain mask when None); xray, on the radiograph's own pixel grid (the
        radiograph's extent when None).
    training: keep only slices whose foreground fraction is at least `config.min_foreground`; otherwise every
        slice of the model space is returned (detection needs the whole stack).
    skull_stripped: brain-mri, whether the scan is brain only (it is then registered to the reference brain
        instead of the reference head); None detects it (`is_skull_stripped`).
    Raises DataError when the scan cannot be used (wrong dimension, no contrast, alignment failed).
    """
    try:
        if config.name == "brain-mri" and (image.array.ndim == 2 or image.array.shape[0] == 1):
            return preprocess_brain_slice(image, config, mask)
        if config.name == "brain-mri":
            return preprocess_brain(image, config, mask, training, skull_stripped)
        return preprocess_xray(image, config, mask)
    except RuntimeError as error:  # ITK's refusals of what it cannot process: too few voxels, no overlap, no mass
        raise DataError(f"{image.source or 'the image'} {image.array.shape} cannot be brought into the {config.name} "
                        f"model space ({error_text(error)}): alignment failed; check that it is what the preset "
                        f"takes (a head MRI covering the brain, or a radiograph)") from error
