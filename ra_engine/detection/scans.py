"""Detection on a list of scans, one after the other: what calibration and evaluation run over their data sets.
Each scan is read (with its brain/body mask, if it has one), detected, and handed on; a scan that cannot be used
(`DataError`) is skipped with a warning and listed; progress is one "step" event per scan, and cancelling it stops
the loop (`Cancelled`)."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ra_engine.core.errors import Cancelled, DataError
from ra_engine.core.image import Image
from ra_engine.core.progress import Progress
from ra_engine.detection.pipeline import detect
from ra_engine.detection.result import Detection
from ra_engine.io.images import read_image
from ra_engine.io.sources import Skipped, Source
from ra_engine.models.modeldir import RAModel


def read_source(source: Source) -> tuple[Image, Image | None]:
    """The image of a source and its brain/body mask (None when it has none)."""
    image = read_image(source.image)
    return image, read_image(source.mask, validate=False) if source.mask else None


def detect_source(model: RAModel, source: Source, scorer, *, batch_size: int = 8, progress=None,
                  force: bool = False) -> tuple[Image, Detection]:
    """Reads one source and detects on it (its mask, if any, as the brain/body mask): the image and the result."""
    image, mask = read_source(source)
    return image, detect(model, image, scorer, mask, batch_size=batch_size, progress=progress, force=force)




@dataclass
class ScanResult:
    """One scan of a `ScanDetections` run: its source, image and detection."""

    source: Source
    image: Image
    found: Detection


class ScanDetections:
    """Iterates over `ScanResult`s of `sources` (each detected with `scorer`); `skipped` lists the scans left out.
    `brain_masks`: use a source's mask as its brain/body mask (calibration) or not (evaluation, where it is the
    lesion mask). `start` is the message of the "start" event, `cancelled` that of the `Cancelled` error."""

    def __init__(self, model: RAModel, sources: list[Source], scorer, *, batch_size: int = 8,
                 progress: Progress | None = None, brain_masks: bool = True, start: str = "", cancelled: str = ""):
        self.model, self.sources, self.scorer = model, list(sources), scorer
        self.batch_size, self.brain_masks = batch_size, brain_masks
        self.progress = progress or Progress()
        self.start = start or f"detecting on {len(self.sources)} scan(s)"
        self.cancelled = cancelled or "detection cancelled"
        self.skipped: list[Skipped] = []

    def skip(self, source: Source, error: Exception) -> None:
        """Leaves `source` out, with a warning and its reason in `skipped`."""
        warnings.warn(f"skipping {source.image}: {error}", stacklevel=3)
        self.skipped.append(Skipped(source.image, str(error)))

    def __iter__(self) -> Iterator[ScanResult]:
        progress = self.progress
        still_wanted = lambda done, total: not progress.cancelled
        total = len(self.sources)
        progress.emit("start", step=0, total_steps=total, message=self.start)
        for i, source in enumerate(self.sources):
            try:
                brain_source = source if self.brain_masks else Source(source.image)
                image, found = detect_source(self.model, brain_source, self.scorer, batch_size=self.batch_size,
                                             progress=still_wanted)
            except DataError as exc:
                self.skip(source, exc)
            else:
                yield ScanResult(source, image, found)
            if not progress.emit("step", step=i + 1, total_steps=total, message=Path(source.image).name):
                raise Cancelled(self.cancelled)
