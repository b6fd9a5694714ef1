"""Calibration of a model on normal scans held out from training (docs/METHOD.md, "Thresholds"): its detection
thresholds and the distributions of normal slice and scan scores, stored in its card (`thresholds.table.Calibration`).

Each scan is detected and its anomaly map pooled over its foreground (brain/body) pixels in a bounded uniform sample
(`NormalPool`: whole maps are never kept, so memory does not grow with the number of scans). Evaluation pools normal
scans the same way when it calibrates a score of its own.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import replace
from pathlib import Path

from ra_engine.core.errors import DataError
from ra_engine.core.files import common_root, file_fingerprint
from ra_engine.core.progress import Progress
from ra_engine.core.resources import SEED
from ra_engine.detection.pipeline import scorer_for
from ra_engine.detection.result import Detection
from ra_engine.detection.scans import ScanDetections
from ra_engine.io.sources import list_sources
from ra_engine.models.card import read_card, write_card
from ra_engine.models.modeldir import RAModel, load_model
from ra_engine.runtime.devices import resolve_device
from ra_engine.scoring.kinds import IMAGE_SCORES
from ra_engine.thresholds.sampling import MAX_PIXELS, PixelSample
from ra_engine.thresholds.table import (
    DEFAULT_FLAG_RATE,
    MIN_SCANS_FOR_SCAN_SCORES,
    Calibration,
    calibration_table,
    score_distribution,
    validate_flag_rate,
)

SAMPLING = "uniform random sample of the pooled foreground pixels (bottom-k random keys)"


class NormalPool:
    """What detections on normal scans tell about normal anomaly values: a bounded uniform sample of their
    model-space foreground pixels (`PixelSample`), and their slice and scan scores."""

    def __init__(self, max_pixels: int = MAX_PIXELS):
        self.pixels = PixelSample(max_pixels)
        self.slice_scores: list[float] = []
        self.scan_scores: list[float] = []

    def add(self, found: Detection) -> None:
        self.pixels.add(found.anomaly_stack[found.slices.masks])
        self.slice_scores += [s["score"] for s in found.slice_scores]
        self.scan_scores.append(found.scan_score)

    def table(self, default_flag_rate: float = DEFAULT_FLAG_RATE) -> Calibration:
        """The flag-rate table of the pooled pixels (`calibration_table`)."""
        return calibration_table(self.pixels.values, default_flag_rate)


def pool_normals(model: RAModel, sources, scorer, *, batch_size: int = 8, progress: Progress | None = None,
                 max_pixels: int = MAX_PIXELS, start: str = "", cancelled: str = ""
                 ) -> tuple[NormalPool, ScanDetections, list]:
    """Detects on each normal scan of `sources` (anything `io.sources.list_sources` reads; a source's mask is its
    brain/body mask) and pools the results. Returns the pool, the run (its `skipped` scans) and the sources with
    the detections' slice counts and scan scores, in order: [(source, slices, scan score)]."""
    pool, used = NormalPool(max_pixels), []
    run = ScanDetections(model, list_sources(sources), scorer, batch_size=batch_size, progress=progress,
                         start=start, cancelled=cancelled)
    for scan in run:
        pool.add(scan.found)
        used.append((scan.source, len(scan.found.slice_scores), scan.found.scan_score))
        del scan  # before the next scan's detection: one scan's maps in memory at a time
    return pool, run, used


def calibrate_model(model_dir: str | Path, sources, scorer=None, device: str = "cpu", progress=None,
                    batch_size: int = 8, flag_rate: float = DEFAULT_FLAG_RATE, command: list[str] | None = None,
                    max_pixels: int = MAX_PIXELS, image_score: str | None = None) -> Calibration:
    """Calibrates the model in `model_dir` on the normal scans `sources` (a folder, glob, CSV or list, as for
    training; give scans held out from training) and writes the result into its card's `calibration` section.

    Stores the flag-rate table (`flag_rate` as its default), the distribution of per-slice scores, the distribution
    of whole-scan scores (from MIN_SCANS_FOR_SCAN_SCORES scans on; None below), and the scans used (names relative
    to their common folder, size, sha256). Scans that cannot be used (DataError) are skipped with a warning and
    listed. scorer: an `AnomalyScorer` (None: the one the card names, `detection.pipeline.scorer_for`). progress: a
    `Progress`; one "step" event per scan; cancelling it stops the job (raises `Cancelled`) and leaves the card as it
    was. image_score: the image-level score the card names from now on (`scoring.kinds.IMAGE_SCORES`; None keeps
    the card's); the slice and scan score distributions are of that score. The card is rewritten atomically; the
    weights and their sha256 are not touched. Returns the calibration."""
    flag_rate = validate_flag_rate(flag_rate)
    progress = progress or Progress()
    sources = list_sources(sources)
    model = load_model(model_dir, device=resolve_device(device))
    if image_score is not None:
        if image_score not in IMAGE_SCORES:
            raise DataError(f"unknown image score {image_score!r}: choose one of {', '.join(IMAGE_SCORES)}")
        model.card = replace(model.card, image_score=image_score)
    scorer = scorer or scorer_for(model)
    pool, run, used = pool_normals(model, sources, scorer, batch_size=batch_size, progress=progress,
                                   max_pixels=max_pixels, start=f"calibrating on {len(sources)} normal scan(s)",
                                   cancelled="calibration cancelled: the model card was not changed")
    if not used:
        raise DataError(f"none of the {len(sources)} scan(s) could be used for calibration: " +
                        "; ".join(str(s) for s in run.skipped))
    root = common_root([s.image for s in sources])
    scans = [{**file_fingerprint(source.image, root),
              "mask": Path(source.mask).absolute().relative_to(root).as_posix() if source.mask else None,
              "slices": slices, "scan_score": scan_score} for source, slices, scan_score in used]
    enough_scans = len(pool.scan_scores) >= MIN_SCANS_FOR_SCAN_SCORES
    calibration = replace(
        pool.table(flag_rate),
        n_foreground_pixels=pool.pixels.seen,
        pixel_sampling={"method": SAMPLING, "max_pixels": pool.pixels.capacity, "seed": SEED},
        slice_scores=score_distribution(pool.slice_scores),
        scan_scores=score_distribution(pool.scan_scores) if enough_scans else None,
        scorer={"lpips": getattr(scorer.lpips, "pnet_type", None), "sigma": scorer.sigma},
        scans=scans,
        skipped=[{"path": Path(s.image).absolute().relative_to(root).as_posix(), "reason": s.error}
                 for s in run.skipped],
        command=list(command) if command else None,
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    write_card(model_dir, replace(read_card(model_dir), calibration=calibration, image_score=model.card.image_score))
    progress.emit("done", step=len(sources), total_steps=len(sources),
                  message=f"calibrated on {len(used)} scan(s), {pool.pixels.seen} foreground pixels")
    return calibration
