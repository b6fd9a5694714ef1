"""The presets that turn a scan into the model's 2D slices, and every parameter of their preprocessing
(docs/METHOD.md, "Data and model space").

- ``brain-mri``: a 3D head or brain T1 is aligned to the bundled reference head (Colin27, affine registration), its
  brain is taken with the reference's brain mask (or the user's mask), and it is resampled into the *model space*:
  axial slices of the reference space, a square in-plane field of view of ``fov_mm`` at ``image_size`` pixels,
  centred on the reference brain, slices ``slice_spacing_mm`` apart covering the brain. Intensities are scaled by
  the 0.5-99.5 percentiles of the brain and clipped to [0, 1]; outside the brain is 0 (`preprocess.brain`).
- ``xray``: a 2D radiograph is divided by its 98th percentile, clipped to [0, 1], padded to a square with 0 and
  resized to ``image_size`` (`preprocess.xray`).

Torch-free, so that the Slicer panel and model cards can use it before PyTorch is installed."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from ra_engine.core.resources import REFERENCES, SEED

PRESETS = ("brain-mri", "xray")


@dataclass(frozen=True)
class PresetConfig:
    """Every parameter of a preset's preprocessing; stored in the model card (`to_dict`) to reproduce it exactly.

    name: "brain-mri" or "xray". image_size: model slices are image_size x image_size pixels.
    fov_mm: brain-mri, the side of the square in-plane field of view of the model space (mm); the pixel size is
        fov_mm / image_size (233 / 128 = 1.82 mm, as in the paper's MNI slices). None for xray.
    slice_spacing_mm: brain-mri, the distance between model slices (mm); the pixel size by default.
    min_foreground: fraction of a slice's pixels that must be brain/body for the slice to be used in training.
    percentiles: (low, high) intensity percentiles of the brain/body mapped to 0 and 1; low None divides by the
        high percentile (radiographs, as in the reference implementation).
    headroom: the value the high percentile maps to (before the clip at 1): 1 is the paper's scaling; below 1 leaves
        room above normal tissue, so that a lesion brighter than the brightest normal tissue (contrast enhancement,
        some tumours) keeps its contrast instead of being flattened to 1.
    flip: whether training may flip slices left-right (the augmentation itself lives in `augment`).
    align: brain-mri, register the scan to the reference head; False takes the scan as already in reference
        (MNI) space.
    reference: name of the bundled reference head ("colin27": Colin27 at 1.5 mm).
    registration_spacing_mm, registration_levels, registration_iterations, registration_sampling,
    registration_margin_mm, registration_seed: the affine registration (finest grid spacing in mm, pyramid
        levels, optimiser iterations per level, share of reference voxels sampled by the metric, margin in mm
        around the reference brain where the metric is sampled, sampling seed); see `register`.
    """

    name: str
    image_size: int = 128
    fov_mm: float | None = None
    slice_spacing_mm: float | None = None
    min_foreground: float = 0.05
    percentiles: tuple[float | None, float] = (0.5, 99.5)
    headroom: float = 1.0
    flip: bool = True
    align: bool = True
    reference: str = "colin27"
    registration_spacing_mm: float = 4.0
    registration_levels: int = 3
    registration_iterations: int = 200
    registration_sampling: float = 0.2
    registration_margin_mm: float = 25.0
    registration_seed: int = SEED

    def __post_init__(self) -> None:
        if self.name not in PRESETS:
            raise ValueError(f"unknown preset {self.name!r}; choose one of {', '.join(PRESETS)}")
        if self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {self.image_size}")
        low, high = self.percentiles
        if not (0.0 < high <= 100.0 and (low is None or 0.0 <= low < high)):
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got {self.percentiles}")
        if not 0.0 < self.headroom <= 1.0:
            raise ValueError(f"headroom is in (0, 1], got {self.headroom}")
        if not 0.0 <= self.min_foreground <= 1.0:
            raise ValueError(f"min_foreground is a fraction in [0, 1], got {self.min_foreground}")
        if self.name == "brain-mri":
            if self.fov_mm is None or self.fov_mm <= 0:
                raise ValueError("brain-mri needs a positive fov_mm")
            if self.reference not in REFERENCES:
                raise ValueError(f"unknown reference {self.reference!r}; choose one of {', '.join(REFERENCES)}")

    @property
    def pixel_mm(self) -> float | None:
        """Model-space pixel size in mm (brain-mri); None for xray, whose pixels follow each radiograph."""
        return None if self.fov_mm is None else self.fov_mm / self.image_size

    def to_dict(self) -> dict:
        """The parameters as JSON; `headroom` only when it is not the paper's 1 (so that the caches, checkpoints and
        cards of runs made before it existed stay valid)."""
        d = {**asdict(self), "percentiles": list(self.percentiles)}
        if d["headroom"] == 1.0:
            del d["headroom"]
        return d

    @classmethod
    def from_dict(cls, data: dict) -> "PresetConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing parameters {sorted(unknown)}: written by a newer version?")
        values = dict(data)
        if "percentiles" in values:
            values["percentiles"] = tuple(values["percentiles"])
        return cls(**values)


_DEFAULTS = {
    "brain-mri": dict(fov_mm=233.0, min_foreground=0.05, percentiles=(0.5, 99.5), flip=True, align=True),
    "xray": dict(fov_mm=None, min_foreground=0.0, percentiles=(None, 98.0), flip=False, align=False),
}


def preset_config(name: str, **overrides) -> PresetConfig:
    """The default configuration of preset `name` ("brain-mri" | "xray") with `overrides` applied; for brain-mri
    an unset slice_spacing_mm becomes the pixel size fov_mm / image_size."""
    if name not in _DEFAULTS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    config = PresetConfig(name=name, **{**_DEFAULTS[name], **overrides})
    if config.name == "brain-mri" and config.slice_spacing_mm is None:
        config = replace(config, slice_spacing_mm=config.pixel_mm)
    return config
