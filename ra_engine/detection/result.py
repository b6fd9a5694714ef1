"""The result of one detection (`Detection`): the maps on the scan's own grid, the scores, and the detections at any
threshold or normal flag rate, recomputed without running the network again; and its JSON report."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ra_engine.core.image import Image
from ra_engine.detection.regions import find_regions
from ra_engine.models.card import NOTICE
from ra_engine.preprocess.space import SliceSet
from ra_engine.thresholds.table import Calibration, resolve_threshold

# `_scores.json` lists at most this many regions (the largest); `regions_total` says how many there are.
MAX_REPORTED_REGIONS = 100


@dataclass
class Detection:
    """Results on the input's grid (arrays (z, y, x) or (y, x), the input's geometry, LPS).

    pseudo_healthy: the reconstruction in the scan's intensity units; anomaly: A (float32, 0 outside the brain/body
    and the model space); mask: the brain/body mask (uint8). slice_scores: per model slice with foreground, its
    position in the model-space stack, for brain-mri the height of the axial slice in the reference (Colin27/MNI)
    space in mm (`reference_z_mm`), and its score (mean A in its mask); scan_score: mean A in the whole mask.
    `slices` and `anomaly_stack` keep the model-space results for calibration and evaluation. `calibration`: the
    model card's calibration section (None when the model has none), for `detections_at(flag_rate=...)`; `notice`:
    the card's (a baseline's says it is not RA)."""

    pseudo_healthy: Image
    anomaly: Image
    mask: Image
    slice_scores: list[dict]
    scan_score: float
    slices: SliceSet
    anomaly_stack: np.ndarray
    calibration: Calibration | None = None
    notice: str = NOTICE

    def threshold_at(self, flag_rate: float | None = None) -> float:
        """The threshold on A that flags `flag_rate` (0.001 to 0.2) of normal foreground pixels, from the model's
        calibration table; None: the card's default flag rate. ModelError when the model is not calibrated."""
        return resolve_threshold(self.calibration, flag_rate, option="detections_at(threshold=...)")[0]

    def detections_at(self, threshold: float | None = None, *, flag_rate: float | None = None) -> Image:
        """Label map (uint8, 1 = flagged) of the pixels with A >= threshold inside the mask, on the input grid.
        Give the threshold on A, or a normal flag rate (`threshold_at`); neither: the card's default flag rate.
        Recomputed from the stored map: the network does not run again."""
        threshold, _ = resolve_threshold(self.calibration, flag_rate, threshold, option="detections_at(threshold=...)")
        flagged = (self.anomaly.array >= threshold) & (self.mask.array > 0)
        return Image(flagged.astype(np.uint8), self.anomaly.geometry, self.anomaly.source)

    def report(self, detections: Image, threshold: float, flag_rate: float | None = None) -> dict:
        """The JSON-able summary of one detection (`ra detect`'s `_scores.json`, the Slicer panel's scores).

        detections: from `detections_at(threshold)`; flag_rate: the normal flag rate the threshold came from, None for a
        threshold given directly. Percentiles of normal (0-100) are given where the model's calibration holds the
        distribution of normal slice or scan scores, else None. `mask`: the brain/body mask used. Regions:
        `regions.find_regions`, at most MAX_REPORTED_REGIONS (the largest), `regions_total` counts them all."""
        percentile = lambda value, of: None if self.calibration is None else self.calibration.percentile(value, of)
        regions = find_regions(detections, self.anomaly)
        in_mask = int(np.count_nonzero(self.mask.array))
        flagged = int(np.count_nonzero(detections.array))
        return {
            "scan_score": self.scan_score,
            "scan_percentile_of_normal": percentile(self.scan_score, "scan"),
            "slice_scores": [{**s, "percentile_of_normal": percentile(s["score"], "slice")}
                             for s in self.slice_scores],
            "threshold": float(threshold),
            "flag_rate": None if flag_rate is None else float(flag_rate),
            "flagged_voxels": flagged,
            "flagged_fraction_of_mask": flagged / in_mask if in_mask else 0.0,
            "regions_total": len(regions),
            "regions": regions[:MAX_REPORTED_REGIONS],
            "mask": self.slices.space.mask,
            "alignment": dict(self.slices.space.alignment),
            "notice": self.notice,
        }
