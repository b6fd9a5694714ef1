"""The Python API of ra: what the `ra` command, the Slicer logic, the benchmarks and a user's scripts call.

    import ra_engine
    model = ra_engine.load_model("brain-t1")                            # a name, a model directory or a run folder
    result = ra_engine.detect(model, "scan.nii.gz")                     # or an Image, or a numpy array + geometry
    result.anomaly.array, result.detections_at(flag_rate=0.01)
    ra_engine.train("normals/", "runs/mine", preset="brain-mri")         # the paper's configuration by default
    ra_engine.calibrate("runs/mine", "more_normals/")
    ra_engine.evaluate("runs/mine", "test.csv", out="eval/")

Arrays are (z, y, x) volumes or (y, x) images; geometry is in ITK's LPS convention, listed (x, y, z)
(`Image`, `Geometry`). The configuration types (`ArchConfig`, `TrainConfig`, `PresetConfig`, ...) and the model
card (`ModelCard`, `read_card`) are torch-free. The functions that compute import their stage when called: `import
ra_engine` imports neither PyTorch nor the other packages those stages need, so that Slicer can load the extension
before PyTorch is installed. This module is the one place where the engine imports its own packages inside
functions, for that reason.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ra_engine.core.errors import Cancelled, DataError, ModelError, RAError
from ra_engine.core.image import Geometry, Image
from ra_engine.core.progress import Progress, ProgressFn
from ra_engine.core.resources import BUNDLED_MODELS_DIR, DEVICE_CHOICES
from ra_engine.core.samples import LESION_CENTRE_LPS, LESION_RADIUS_MM, TEST_SCAN, insert_lesion
from ra_engine.io.images import read_image, write_image
from ra_engine.io.sources import Source, list_sources
from ra_engine.models.card import ModelCard, read_card
from ra_engine.models.registry import (
    list_models,
    models_dir,
    remove_model,
    resolve_model,
)
from ra_engine.network.config import ArchConfig
from ra_engine.preprocess.presets import PRESETS, PresetConfig, preset_config
from ra_engine.scoring.kinds import IMAGE_SCORES, SCORE_KINDS
from ra_engine.thresholds.table import (
    DEFAULT_FLAG_RATE,
    FLAG_RATES,
    Calibration,
    resolve_threshold,
    validate_flag_rate,
)
from ra_engine.training.config import METHODS, AcquisitionConfig, AugmentConfig, LossWeights, TrainConfig

__all__ = [
    "AcquisitionConfig", "ArchConfig", "AugmentConfig", "BUNDLED_MODELS_DIR", "Calibration", "Cancelled", "DataError",
    "DEFAULT_FLAG_RATE", "DEVICE_CHOICES", "FLAG_RATES", "Geometry", "Image", "IMAGE_SCORES", "LESION_CENTRE_LPS",
    "LESION_RADIUS_MM", "LossWeights", "METHODS", "ModelCard", "ModelError", "PresetConfig", "PRESETS", "Progress",
    "ProgressFn", "RAError", "SCORE_KINDS", "Source", "TEST_SCAN", "TrainConfig", "calibrate", "detect", "detect_files",
    "evaluate", "import_model", "insert_lesion", "list_models", "list_sources", "load_model", "make_scorer",
    "models_dir", "preset_config", "read_card", "read_image", "remove_model", "resolve_model", "resolve_threshold",
    "save_detection", "train", "validate_flag_rate", "write_image",
]


def load_model(model, device: str = "auto", amp: bool = False):
    """The model `model` names (a registered or bundled name, a model directory, or a run folder of `ra train`) on
    `device` ("auto": CUDA, then Apple MPS, then the CPU): a `models.modeldir.RAModel`, its weights checked against
    the sha256 in its card; `amp`: its detections run the network under bfloat16 autocast. A loaded model is passed
    through as it is."""
    from ra_engine.models.modeldir import RAModel
    from ra_engine.models.modeldir import load_model as load
    from ra_engine.runtime.devices import resolve_device

    if isinstance(model, RAModel):
        return model
    return load(model, device=resolve_device(device), amp=amp)


def import_model(source: str | Path, name: str | None = None, sha256: str | None = None, overwrite: bool = False,
                 progress: Callable[[int, "int | None"], "bool | None"] | None = None) -> Path:
    """`ra models import`: registers a model from a folder, a .zip or a URL, checked before it is registered
    (`models.install.import_model`). Returns its folder in the registry."""
    from ra_engine.models.install import import_model as install

    return install(source, name=name, sha256=sha256, overwrite=overwrite, progress=progress)


def make_scorer(model, kind: str = "full"):
    """The anomaly scorer of `kind` ("full", the RA score; "l1", the plain reconstruction error) for a loaded model:
    its card's LPIPS backbone on its device. Pass it to `detect` to reuse it across scans."""
    from ra_engine.detection.pipeline import scorer_for

    return scorer_for(model, kind)


def detect(model, image, *, mask=None, spacing=None, origin=None, direction=None, batch_size: int = 8,
           progress: Callable[[int, int], "bool | None"] | None = None, force: bool = False, scorer=None,
           device: str = "auto"):
    """Detects anomalies in one scan or radiograph; returns a `detection.result.Detection` whose maps lie on the
    input's exact grid.

    model: a loaded model or anything `load_model` takes (loaded on `device`). image: an `Image`, a path (any format
    `read_image` reads), or a numpy array (z, y, x) or (y, x) with its `spacing`, `origin` (mm, listed (x, y, z)) and
    `direction` (the row-major matrix of the axes' directions), all LPS (defaults: 1 mm, 0, identity); a (y, x, 3|4)
    colour array becomes grey for an xray model. mask: the brain/body mask (an Image, a path, or an array on the
    array's grid); None: the reference brain (brain-mri) or the whole radiograph. progress(done, total) after each
    batch of `batch_size` slices; returning False raises `Cancelled`. force: run although a DICOM's modality is not
    the model's. scorer: reuse an `AnomalyScorer` across scans."""
    from ra_engine.detection.pipeline import detect as detect_image
    from ra_engine.detection.pipeline import detect_array

    loaded = load_model(model, device)
    if isinstance(image, np.ndarray):
        return detect_array(loaded, image, spacing, origin, direction, mask=mask, scorer=scorer, progress=progress,
                            batch_size=batch_size, force=force)
    if not isinstance(image, Image):
        image = read_image(image)
    if mask is not None and not isinstance(mask, Image):
        mask = read_image(mask, validate=False)
    return detect_image(loaded, image, scorer, mask, batch_size=batch_size, progress=progress, force=force)


def detect_files(model, inputs: Sequence[str | Path], out: str | Path, *, flag_rate: float | None = None,
                 threshold: float | None = None, masks: str = "none", device: str = "auto", amp: bool = False,
                 batch_size: int = 8, overwrite: bool = False, force: bool = False, progress: Progress | None = None,
                 say: Callable[[str], None] | None = None, complain: Callable[[str], None] | None = None):
    """`ra detect`: detects on image files, folders, globs or CSVs and writes each input's outputs into `out`
    (`detection.files.detect_files`). Returns a `detection.files.FilesResult`."""
    from ra_engine.detection.files import detect_files as run

    return run(model, inputs, out, flag_rate=flag_rate, threshold=threshold, masks=masks, device=device, amp=amp,
               batch_size=batch_size, overwrite=overwrite, force=force, progress=progress, say=say,
               complain=complain)


def save_detection(model, image: Image, detection, out: str | Path, *, name: str | None = None,
                   flag_rate: float | None = None, threshold: float | None = None) -> dict:
    """Writes a detection's outputs as `ra detect` does (`<name>_pseudo_healthy`, `_anomaly_map`, `_detections`,
    `_scores.json`, `_overlay.png` in `out`, all or none; NIfTI unless the image's source is NRRD or MetaImage),
    with the detections at `threshold`, else at `flag_rate` (the card's default when None). image: the input (its
    `source` names it); name: the outputs' stem (default: the source's). Returns the report."""
    from ra_engine.detection.files import save_detection as save
    from ra_engine.detection.outputs import OutputJob
    from ra_engine.io.images import output_format_for, split_extension

    loaded = load_model(model)
    chosen = resolve_threshold(loaded.card.calibration, flag_rate, threshold, model=str(loaded.path),
                               option="threshold=")
    source = Path(image.source) if image.source else Path("image")
    job = OutputJob(Source(source), name or split_extension(source)[0], Path(out), output_format_for(source))
    Path(out).mkdir(parents=True, exist_ok=True)
    return save(job, loaded, image, detection, *chosen)


def train(data, out: str | Path, *, preset: str | PresetConfig = "brain-mri", arch: ArchConfig | None = None,
          config: TrainConfig | None = None, device: str = "auto", workers: int = 0, resume: bool = False,
          overwrite: bool = False, val_fraction: float | None = None, val_data=None,
          cache_dir: str | Path | None = None,
          progress: Progress | None = None, command: list[str] | None = None, calibrate: bool = True):
    """`ra train`: trains on the normal scans `data` (a folder, glob, CSV or list) into the run folder `out`
    (`training.pipeline.run_training`). preset: a preset's name (its defaults at the architecture's image size) or a
    `PresetConfig`; arch, config: the paper's configuration when None. Returns (TrainResult, model directory or None
    when the run was cancelled: resume it with resume=True)."""
    from ra_engine.training.pipeline import VAL_FRACTION, run_training

    arch = arch or ArchConfig()
    if isinstance(preset, str):
        preset = preset_config(preset, image_size=arch.image_size)
    if config is None:
        config = TrainConfig(augment=AugmentConfig(flip=preset.flip))
    return run_training(data, preset, Path(out), arch, config, device=device, workers=workers, resume=resume,
                        overwrite=overwrite, val_fraction=VAL_FRACTION if val_fraction is None else val_fraction,
                        val_data=val_data,
                        cache_dir=cache_dir, progress=progress, command=command, calibrate=calibrate)


def calibrate(model, data, *, flag_rate: float = DEFAULT_FLAG_RATE, device: str = "auto", batch_size: int = 8,
              progress: Progress | None = None, command: list[str] | None = None, scorer=None,
              image_score: str | None = None) -> Calibration:
    """`ra calibrate`: calibrates the model in a model directory (or run folder, or registered name) on normal scans
    held out from training and writes the result into its card (`calibration.calibrate.calibrate_model`);
    `image_score` sets the card's image-level score (`IMAGE_SCORES`) and the distributions are of it."""
    from ra_engine.calibration.calibrate import calibrate_model

    return calibrate_model(resolve_model(model), data, scorer=scorer, device=device, progress=progress,
                           batch_size=batch_size, flag_rate=flag_rate, command=command, image_score=image_score)


def evaluate(model, data, *, out: str | Path | None = None, score: str = "full",
             flag_rates: Sequence[float] | None = None, calibration_data=None, device: str = "auto",
             batch_size: int = 8, examples: int = 6, overwrite: bool = False, progress: Progress | None = None,
             command: list[str] | None = None):
    """`ra eval`: the figures of `model` on a test set (a CSV with columns image, mask, label, type; see
    `evaluation.metrics`). With `out`, writes metrics.json, metrics.md and the plots there and returns the metrics
    (`evaluation.report.evaluate_into`); without, returns (EvaluationResult, examples)
    (`evaluation.evaluate.evaluate`), writing nothing."""
    from ra_engine.evaluation.evaluate import evaluate as run
    from ra_engine.evaluation.metrics import DEFAULT_FLAG_RATES
    from ra_engine.evaluation.report import evaluate_into

    flag_rates = DEFAULT_FLAG_RATES if flag_rates is None else flag_rates
    if out is not None:
        return evaluate_into(out, model, data, score=score, flag_rates=flag_rates, calibration_data=calibration_data,
                             device=device, batch_size=batch_size, examples=examples, overwrite=overwrite,
                             progress=progress, command=command)
    return run(load_model(model, device), data, kind=score, flag_rates=flag_rates, calibration_data=calibration_data,
               batch_size=batch_size, examples=examples, progress=progress)
