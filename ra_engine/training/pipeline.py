"""`ra train` end to end: normal scans -> cached model-space slices -> scan-wise split -> Trainer -> model directory.

The run directory holds `checkpoints/` (latest.pt, best.pt), `cache/` (the slice store), `train.log`, and, once
training ends (by its schedule, early stopping or --max-steps), `model/` (model.safetensors + model.json).
"""
from __future__ import annotations

import hashlib
import json
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ra_engine.calibration.calibrate import calibrate_model
from ra_engine.core.errors import DataError, RAError, error_text
from ra_engine.core.files import WriteError, common_root, file_fingerprint, remove_temporaries
from ra_engine.core.image import Image
from ra_engine.core.progress import Progress
from ra_engine.io.sources import list_sources
from ra_engine.models.card import ModelCard, TrainingRecord
from ra_engine.models.modeldir import save_model_dir
from ra_engine.network.config import ArchConfig
from ra_engine.preprocess.pipeline import preprocess
from ra_engine.preprocess.presets import PresetConfig
from ra_engine.runtime.devices import resolve_device
from ra_engine.runtime.distributed import ProcessGroup, init_distributed
from ra_engine.training.checkpoint import load_checkpoint
from ra_engine.training.config import METHODS, TrainConfig
from ra_engine.training.slicestore import SliceStore, split_by_scan, split_by_sources
from ra_engine.training.trainer import Trainer, TrainResult

log = logging.getLogger("ra_engine")
RUN_ARTEFACTS = ("checkpoints", "model", "train.log")
VAL_FRACTION = 0.1  # the share of whole scans held out for validation and then calibration
MAX_LABEL_VALUES = 16  # an image with no more distinct whole-number values is a mask or label map, not a scan


@dataclass(frozen=True)
class TrainingPreprocess:
    """Picklable preprocessing of one training scan (worker processes call it)."""

    config: PresetConfig

    @property
    def mixed_dimensions(self) -> bool:
        """brain-mri places 2D axial slices and 3D volumes in one model space (`preprocess.slices`)."""
        return self.config.name == "brain-mri"

    def __call__(self, image: Image, mask: Image | None):
        values = label_map_values(image.array)
        if values is not None:
            shown = ", ".join(f"{v:g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
            raise DataError(f"it holds only {len(values)} distinct value(s) ({shown}): a mask or label map, not a scan, "
                            f"so it is not trained on (name a brain/body mask <image>_mask beside its image to use it)")
        return preprocess(image, self.config, mask, training=True)


def label_map_values(array: np.ndarray) -> np.ndarray | None:
    """The distinct values of `array` when it looks like a mask or label map (at most MAX_LABEL_VALUES distinct
    whole numbers; a blank image too), else None. A sample of the voxels decides first, so a real scan costs little."""
    flat = np.asarray(array).ravel()
    for values in (np.unique(flat[:: max(1, flat.size // 100_000)]), None):
        values = np.unique(flat) if values is None else values
        if len(values) > MAX_LABEL_VALUES or not np.all(values == np.round(values)):
            return None
    return values


class SliceSubset:
    """The rows `indices` of an (N, H, W) slice memory map, read on demand (never loaded whole)."""

    def __init__(self, images: np.ndarray, indices: np.ndarray):
        self.images, self.indices = images, np.asarray(indices)

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.indices), *self.images.shape[1:])

    def __getitem__(self, rows) -> np.ndarray:
        return self.images[self.indices[rows]]


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuses to touch an existing run unless asked: --resume continues it, --overwrite removes its artefacts
    (checkpoints, model, log; the slice cache is kept, it is reused only if the data and preprocessing match)."""
    existing = [p.name for p in out.iterdir()] if out.is_dir() else []
    if resume:
        if not (out / "checkpoints" / "latest.pt").is_file():
            raise RAError(f"nothing to resume in {out}: it has no checkpoints/latest.pt (drop --resume to start)")
        for folder in ("checkpoints", "model"):  # what a killed run was writing when it died
            remove_temporaries(out / folder)
        return
    if existing and not overwrite:
        raise RAError(f"output folder {out} already exists and is not empty: pass --resume to continue that run, "
                      f"--overwrite to replace it, or choose another --out")
    if overwrite:
        for name in RUN_ARTEFACTS:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _fingerprint(sources, preset: PresetConfig) -> dict:
    """The slice cache's key: the preprocessing and each source's path, size and date (cheap to check)."""
    entries = []
    for s in sources:
        stat = Path(s.image).stat()
        entries.append([str(Path(s.image).resolve()), stat.st_size, int(stat.st_mtime),
                        str(Path(s.mask).resolve()) if s.mask else None])
    return {"preset": preset.to_dict(), "sources": entries}


def data_identity(sources, preset: PresetConfig) -> str:
    """What `--resume` checks the data by: the preprocessing and every source's content (its name relative to the
    sources' common folder and its sha256, in the order given). A cohort copied to another disk or given new file
    dates still resumes; a changed, added or reordered file does not. (The slice cache, by contrast, is keyed on
    paths, sizes and dates, which are cheap to check: it is rebuilt when they change.)"""
    files = [s.image for s in sources] + [s.mask for s in sources if s.mask]
    root = common_root(files)
    described = [[file_fingerprint(s.image, root), file_fingerprint(s.mask, root) if s.mask else None]
                 for s in sources]
    identity = {"preset": preset.to_dict(), "sources": described}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def run_training(data, preset: PresetConfig, out: Path, arch: ArchConfig, config: TrainConfig, *,
                 device: str = "auto", workers: int = 0, resume: bool = False, overwrite: bool = False,
                 val_fraction: float = VAL_FRACTION, val_data=None, cache_dir: Path | None = None,
                 progress: Progress | None = None,
                 command: list[str] | None = None, calibrate: bool = True) -> tuple[TrainResult, Path | None]:
    """Trains RA on the normal scans `data` (folder, glob, CSV or list), validating on the scans `val_data` when
    given (e.g. other patients), else on a random `val_fraction` of the scans. Returns the result and the model
    directory (None when the run was cancelled: resume it with resume=True). With `calibrate`, the model's
    detection thresholds are then calibrated on the scans held out for validation (`ra calibrate` can redo it on
    other normal scans)."""
    out = Path(out)
    if preset.image_size != arch.image_size:
        raise RAError(f"the preset's image size {preset.image_size} differs from the model's {arch.image_size}")
    progress = progress or Progress()
    init_distributed(device)
    group = ProcessGroup.current()
    rank = group.rank
    torch_device = resolve_device(device)
    sources = list_sources(data)  # before anything is written: bad data leaves no half-made run folder
    held_out = None
    if val_data is not None:
        val_sources = list_sources(val_data)
        both = sorted(str(s.image) for s in {s.image for s in sources} & {s.image for s in val_sources})
        if both:
            raise DataError(f"{len(both)} scan(s) are both training and validation data ({', '.join(both[:3])}): "
                            "hold validation scans out of the training data")
        sources, held_out = sources + val_sources, {s.image for s in val_sources}
    created = not out.exists()
    handler = None
    try:
        try:
            if rank == 0:
                prepare_run_dir(out, resume, overwrite)
                handler = _log_to(out / "train.log")
            prepared = _prepare_data(sources, preset, out, cache_dir, workers, val_fraction, held_out, config.seed,
                                     progress, group)
        except OSError as exc:
            if isinstance(exc, RAError):
                raise
            raise WriteError(f"cannot write the run folder {out}: {error_text(exc)} (check free disk space and "
                             f"write permission, or choose another --out)") from exc
    except BaseException:
        if created and rank == 0:
            shutil.rmtree(out, ignore_errors=True)
        if handler is not None:
            log.removeHandler(handler)
        raise
    try:
        trainer = Trainer(SliceSubset(prepared.store.images, prepared.train_indices),
                          SliceSubset(prepared.store.images, prepared.val_indices), arch, config, out, torch_device,
                          progress, meta={"data": prepared.summary["sha256"]})
        if resume:
            trainer.resume()
            log.info("resumed at step %d (epoch %d)", trainer.state.step, trainer.state.epoch)
        result = trainer.fit()
        log.info("stopped by %s at step %d", result.stopped_by, result.state.step)
        model_dir = None
        if rank == 0 and result.stopped_by != "cancelled":
            model_dir = export_model(result, out / "model", preset, config, _card_data(prepared),
                                     command or sys.argv)
            if calibrate:
                calibrate_after_training(model_dir, prepared.held_out, torch_device, progress)
        group.barrier()
        return result, model_dir
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


@dataclass
class PreparedData:
    """The slice store of a run, its split by scan, a summary for the log, and the held-out scans' paths."""

    store: SliceStore
    train_indices: np.ndarray
    val_indices: np.ndarray
    summary: dict
    held_out: list[str]


def _prepare_data(sources, preset: PresetConfig, out: Path, cache_dir: Path | None, workers: int,
                  val_fraction: float, held_out: set[Path] | None, seed: int, progress: Progress,
                  group: ProcessGroup) -> PreparedData:
    """Builds (rank 0) or opens (other ranks) the slice store and splits it by scan: the `held_out` scans (given
    validation data), else a random `val_fraction` of them."""
    fingerprint = _fingerprint(sources, preset)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    build = lambda: SliceStore.build(sources, TrainingPreprocess(preset), cache, fingerprint, workers=workers,
                                     progress=progress if group.rank == 0 else None)
    group.barrier()
    store = build() if group.rank == 0 else None
    group.barrier()
    if group.rank != 0:
        store = build()  # the store rank 0 wrote: same fingerprint, so nothing is read again
    if held_out is None:
        train_idx, val_idx = split_by_scan(store, val_fraction, seed=seed)
    else:
        train_idx, val_idx = split_by_sources(store, held_out)
    data_hash = data_identity(sources, preset)
    summary = {"sources": len(sources), "scans_used": store.n_scans, "skipped": [str(s) for s in store.skipped],
               "slices": len(store), "train_slices": len(train_idx), "val_slices": len(val_idx),
               "val_fraction": None if held_out is not None else val_fraction, "sha256": data_hash}
    held_out = [str(store.sources[i].image) for i in np.unique(store.scan_index[val_idx])]
    log.info("data: %s; held out: %s", summary, held_out)
    return PreparedData(store, train_idx, val_idx, summary, held_out)


def _card_data(prepared: PreparedData) -> dict:
    """The training data as the model card gives it: counts, and files by their names relative to the data's
    common folder (`root`, by its name only) with their sha256 (no path of this machine): the held-out scans one by
    one, all of them as one digest of the sorted names and sha256s (`content_sha256`). `sha256` is the identity
    that resuming checks (`data_identity`: the preprocessing and the sources' contents in order)."""
    store = prepared.store
    images = [s.image for s in store.sources] + [s.image for s in store.skipped]
    root = common_root(images)
    described = sorted((file_fingerprint(path, root) for path in images), key=lambda d: d["file"])
    listing = "".join(f"{d['file']}\t{d['sha256']}\n" for d in described)
    relative = lambda path: Path(path).absolute().relative_to(root).as_posix()
    return {**{k: v for k, v in prepared.summary.items() if k != "skipped"},
            "root": root.name,
            "skipped": [{"file": relative(s.image), "reason": s.error} for s in store.skipped],
            "content_sha256": hashlib.sha256(listing.encode("utf-8")).hexdigest(),
            "held_out": [file_fingerprint(path, root) for path in prepared.held_out]}


def export_model(result: TrainResult, model_dir: Path, preset: PresetConfig, config: TrainConfig, data: dict,
                 command: list[str]) -> Path:
    """Writes the model directory from the checkpoint that `config.select` names: the best on disk ("best"; the
    latest when no epoch was validated) or the latest ("last")."""
    best = result.best_checkpoint or result.latest_checkpoint
    source = result.latest_checkpoint if config.select == "last" else best
    ckpt = load_checkpoint(source)
    state = ckpt["state"]
    validated = state["best_epoch"] >= 0
    training = TrainingRecord(
        config=config.to_dict(), data=data, command=list(command), steps=result.state.step,
        epochs=result.state.epoch, weights_from=source.name, weights_step=state["step"],
        stopped_by=result.stopped_by, best_val_loss=state["best_val"] if validated else None,
        best_epoch=state["best_epoch"] if validated else None, history=result.state.history,
        seconds=round(result.state.seconds, 1))
    card = ModelCard(name=model_dir.parent.name, architecture=ArchConfig.from_dict(ckpt["arch"]), preset=preset,
                     method=config.method, method_description=METHODS[config.method], training=training)
    save_model_dir(model_dir, ckpt["model"], card)
    log.info("model written to %s", model_dir)
    return model_dir


def calibrate_after_training(model_dir: Path, held_out: list[str], device: torch.device, progress: Progress) -> None:
    """Calibrates on the held-out normal scans; when that cannot be done here (no LPIPS weights offline, too few
    pixels, images too small for the LPIPS network), the model stays as written and the log says how to calibrate
    it later."""
    try:
        calibrate_model(model_dir, held_out, device=str(device), progress=progress)
        log.info("calibrated on %d held-out scan(s)", len(held_out))
    except Exception as exc:  # the trained model is already written: a failed post-step must not lose it
        message = (f"the model was not calibrated ({exc}); calibrate it with `ra calibrate --model {model_dir} "
                   f"--data NORMAL_SCANS` before detection")
        log.warning(message)
        progress.emit("error", message=message)


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler
