"""`ra train` end to end: normal scans -> cached model-space slices -> scan-wise split -> Trainer -> model directory.

The run directory holds `checkpoints/` (latest.pt, best.pt), `cache/` (the slice store), `train.log`, and, once
training ends (by its schedule, early stopping or --max-steps), `model/` (model.safetensors + model.json).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from .checkpoint import load_checkpoint
from .devices import resolve_device
from .errors import RAError
from .image import Image
from .model import ArchConfig
from .modeldir import save_model_dir
from .preprocess import PresetConfig, preprocess
from .progress import Progress
from .slicestore import SliceStore, split_by_scan
from .sources import list_sources
from .trainer import METHODS, TrainConfig, Trainer, TrainResult

log = logging.getLogger("ra_engine")
RUN_ARTEFACTS = ("checkpoints", "model", "train.log")


@dataclass(frozen=True)
class TrainingPreprocess:
    """Picklable preprocessing of one training scan (worker processes call it)."""

    config: PresetConfig

    def __call__(self, image: Image, mask: Image | None):
        return preprocess(image, self.config, mask, training=True)


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


def init_distributed(device_name: str) -> bool:
    """Joins the process group when started by torchrun (WORLD_SIZE > 1): NCCL on CUDA, gloo otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    return True


def prepare_run_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuses to touch an existing run unless asked: --resume continues it, --overwrite removes its artefacts
    (checkpoints, model, log; the slice cache is kept, it is reused only if the data and preprocessing match)."""
    existing = [p.name for p in out.iterdir()] if out.is_dir() else []
    if resume:
        if not (out / "checkpoints" / "latest.pt").is_file():
            raise RAError(f"nothing to resume in {out}: it has no checkpoints/latest.pt (drop --resume to start)")
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
    entries = []
    for s in sources:
        stat = Path(s.image).stat()
        entries.append([str(Path(s.image).resolve()), stat.st_size, int(stat.st_mtime),
                        str(Path(s.mask).resolve()) if s.mask else None])
    return {"preset": preset.to_dict(), "sources": entries}


def run_training(data, preset: PresetConfig, out: Path, arch: ArchConfig, config: TrainConfig, *,
                 device: str = "auto", workers: int = 0, resume: bool = False, overwrite: bool = False,
                 val_fraction: float = 0.1, cache_dir: Path | None = None, progress: Progress | None = None,
                 command: list[str] | None = None, calibrate: bool = True) -> tuple[TrainResult, Path | None]:
    """Trains RA on the normal scans `data` (folder, glob, CSV or list). Returns the result and the model
    directory (None when the run was cancelled: resume it with resume=True). With `calibrate`, the model's
    detection thresholds are then calibrated on the scans held out for validation (`ra calibrate` can redo it on
    other normal scans)."""
    out = Path(out)
    if preset.image_size != arch.image_size:
        raise RAError(f"the preset's image size {preset.image_size} differs from the model's {arch.image_size}")
    progress = progress or Progress()
    distributed = init_distributed(device)
    rank = dist.get_rank() if distributed else 0
    torch_device = resolve_device(device)
    sources = list_sources(data)  # before anything is written: bad data leaves no half-made run folder
    created = not out.exists()
    handler = None
    try:
        if rank == 0:
            prepare_run_dir(out, resume, overwrite)
            handler = _log_to(out / "train.log")
        prepared = _prepare_data(sources, preset, out, cache_dir, workers, val_fraction, config.seed, progress, rank,
                             distributed)
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
            model_dir = export_model(result, out / "model", preset, config, prepared.summary, command or sys.argv)
            if calibrate:
                calibrate_after_training(model_dir, prepared.summary["val_sources"], torch_device, progress)
        if distributed:
            dist.barrier()
        return result, model_dir
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


@dataclass
class PreparedData:
    store: SliceStore
    train_indices: np.ndarray
    val_indices: np.ndarray
    summary: dict


def _prepare_data(sources, preset: PresetConfig, out: Path, cache_dir: Path | None, workers: int,
                  val_fraction: float, seed: int, progress: Progress, rank: int, distributed: bool) -> PreparedData:
    """Builds (rank 0) or opens (other ranks) the slice store and splits it by scan."""
    fingerprint = _fingerprint(sources, preset)
    cache = Path(cache_dir) if cache_dir else out / "cache"
    build = lambda: SliceStore.build(sources, TrainingPreprocess(preset), cache, fingerprint, workers=workers,
                                     progress=_store_progress(progress) if rank == 0 else None)
    if distributed:
        dist.barrier()
    store = build() if rank == 0 else None
    if distributed:
        dist.barrier()
    if rank != 0:
        store = build()  # the store rank 0 wrote: same fingerprint, so nothing is read again
    train_idx, val_idx = split_by_scan(store, val_fraction, seed=seed)
    data_hash = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
    summary = {"sources": len(sources), "scans_used": store.n_scans, "skipped": [str(s) for s in store.skipped],
               "slices": len(store), "train_slices": len(train_idx), "val_slices": len(val_idx),
               "val_fraction": val_fraction, "sha256": data_hash,
               "val_sources": [str(store.sources[i].image) for i in np.unique(store.scan_index[val_idx])]}
    log.info("data: %s", summary)
    return PreparedData(store, train_idx, val_idx, summary)


def export_model(result: TrainResult, model_dir: Path, preset: PresetConfig, config: TrainConfig, data: dict,
                 command: list[str]) -> Path:
    """Writes the model directory from the checkpoint that `config.select` names: the best on disk ("best"; the
    latest when no epoch was validated) or the latest ("last")."""
    best = result.best_checkpoint or result.latest_checkpoint
    source = result.latest_checkpoint if config.select == "last" else best
    ckpt = load_checkpoint(source)
    state = ckpt["state"]
    card = {
        "name": model_dir.parent.name,
        "method": config.method,
        "method_description": METHODS[config.method],
        "preset": preset.to_dict(),
        "lpips": {"backbone": "alex"},
        "training": {
            "config": config.to_dict(),
            "data": data,
            "command": list(command),
            "steps": result.state.step,
            "epochs": result.state.epoch,
            "weights_from": source.name,
            "weights_step": state["step"],
            "stopped_by": result.stopped_by,
            "best_val_loss": state["best_val"] if state["best_epoch"] >= 0 else None,
            "best_epoch": state["best_epoch"] if state["best_epoch"] >= 0 else None,
            "history": result.state.history,
        },
        "calibration": None,
        "metrics": {},
    }
    save_model_dir(model_dir, ckpt["model"], ArchConfig.from_dict(ckpt["arch"]), card)
    log.info("model written to %s", model_dir)
    return model_dir


def calibrate_after_training(model_dir: Path, held_out: list[str], device: torch.device, progress: Progress) -> None:
    """Calibrates on the held-out normal scans; when that cannot be done here (no LPIPS weights offline, too few
    pixels, images too small for the LPIPS network), the model stays as written and the log says how to calibrate
    it later."""
    from .calibration import calibrate_model

    try:
        calibrate_model(model_dir, held_out, device=str(device), progress=progress)
        log.info("calibrated on %d held-out scan(s)", len(held_out))
    except Exception as exc:  # the trained model is already written: a failed post-step must not lose it
        message = (f"the model was not calibrated ({exc}); calibrate it with `ra calibrate --model {model_dir} "
                   f"--data NORMAL_SCANS` before detection")
        log.warning(message)
        progress.emit("error", message=message)


def _store_progress(progress: Progress):
    def report(done: int, total: int, message: str) -> bool:
        return progress.emit("step", step=done, total_steps=total, message=f"preprocessing: {message}")

    return report


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler
