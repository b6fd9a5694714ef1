"""Evaluation of a model on a test set of scans with known labels and lesion masks (`ra eval`): one detection per
scan, the figures of `evaluation.metrics`, and the views of a few scans for the examples figure. The definitions
are in `evaluation.metrics`."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from ra_engine.calibration.calibrate import NormalPool, pool_normals
from ra_engine.core.errors import DataError
from ra_engine.core.image import Image
from ra_engine.detection.overlay import axial_axis
from ra_engine.detection.pipeline import scorer_for
from ra_engine.detection.scans import ScanDetections
from ra_engine.evaluation.metrics import (
    DEFAULT_FLAG_RATES,
    EvaluationResult,
    Evaluator,
    lesion_components,
    lesion_mask_on_grid,
    scan_label,
)
from ra_engine.io.images import read_image
from ra_engine.io.sources import list_sources
from ra_engine.scoring.kinds import SCORE_KINDS
from ra_engine.thresholds.table import Calibration, validate_flag_rate

THRESHOLD_SOURCES = {
    "calibration data": "a table calibrated for this score on the normal scans given with --calibration-data",
    "model card": "the model card's calibration table (normal scans held out from training)",
    "test-set normal scans": "in-sample: a table calibrated on the evaluated set's own normal scans (label 0), "
                             "because neither the card (which holds the full score's table) nor calibration data "
                             "gave one for this score; normal scans are then flagged at the flag rates by "
                             "construction (up to the resampling onto their own grids)",
}


@dataclass
class Example:
    """One scan's views for the examples figure, all (y, x) slices of its own grid: the input, the pseudo-healthy
    reconstruction, the anomaly map, the brain/body mask and the lesion mask (None when unknown); `index`: the slice
    (along the axial axis of a volume; None for a 2D image)."""
    name: str
    label: int
    type: str | None
    score: float
    index: int | None
    image: np.ndarray
    pseudo_healthy: np.ndarray
    anomaly: np.ndarray
    mask: np.ndarray
    truth: np.ndarray | None


def _example(name: str, label: int, type_: str | None, found, image: Image, truth: np.ndarray | None) -> Example:
    """The views of one scan at the middle slice of its largest lesion (else of its brain/body mask)."""
    arrays = [image.array, found.pseudo_healthy.array, found.anomaly.array, found.mask.array, truth]
    index = None
    if image.array.ndim == 3 and image.array.shape[0] > 1:
        axis = axial_axis(image)
        lesions, n = lesion_components(truth) if truth is not None else (None, 0)
        if n:
            largest = 1 + int(np.argmax(np.bincount(lesions.ravel(), minlength=n + 1)[1:]))
            where = np.flatnonzero(np.any(np.moveaxis(lesions == largest, axis, 0), axis=(1, 2)))
        else:
            where = np.flatnonzero(np.any(np.moveaxis(found.mask.array != 0, axis, 0), axis=(1, 2)))
        index = int(where[len(where) // 2])
        arrays = [None if a is None else np.take(a, index, axis=axis) for a in arrays]
    else:
        arrays = [None if a is None else np.asarray(a).reshape(a.shape[-2:]) for a in arrays]
    image2d, ph, anomaly, mask, truth2d = arrays
    return Example(name, label, type_, found.scan_score, index, image2d.astype(np.float32), ph.astype(np.float32),
                   anomaly.astype(np.float32), mask != 0, None if truth2d is None else truth2d != 0)


def normal_table(model, sources, scorer, *, batch_size: int = 8, progress=None) -> Calibration:
    """A calibration table (`thresholds.table.calibration_table`) for `scorer`'s score on the normal scans `sources`
    (any form `io.sources.list_sources` reads; their `mask` is the brain/body mask), made as `ra calibrate` makes it
    (`calibration.calibrate.pool_normals`). Nothing is written."""
    n = len(list_sources(sources))
    pool, run, used = pool_normals(model, sources, scorer, batch_size=batch_size, progress=progress,
                                   start=f"calibrating the {scorer.kind} score on {n} normal scan(s)",
                                   cancelled="evaluation cancelled")
    return replace(pool.table(), n_foreground_pixels=pool.pixels.seen, scans=[{"count": len(used)}],
                   skipped=[{"path": str(s.image), "reason": s.error} for s in run.skipped])


def evaluate(model, data, *, kind: str = "full", flag_rates: Sequence[float] = DEFAULT_FLAG_RATES,
             calibration_data=None, batch_size: int = 8, examples: int = 0, progress=None,
             folder: str | Path | None = None) -> tuple[EvaluationResult, list[Example]]:
    """Evaluates `model` (an `RAModel`) on the test set `data`: a CSV with columns image, mask (lesion mask on the
    image's grid, optional), label (0/1, optional), type (optional), or anything `sources.list_sources` reads (then
    `<name>_mask` files are lesion masks).

    Detection runs once per scan with one scorer of `kind`, with the preset's own brain/body mask (the reference
    brain, the whole radiograph). Thresholds for the figures at `flag_rates` come from, in this order: a table
    calibrated on `calibration_data` (normal scans) for this score; the model card's table (full score only); the
    evaluated normal scans themselves (in-sample, labelled so); else those figures are None. Scans that cannot be
    used (DataError: unreadable, mask on another space, label contradicting the mask, failed alignment) are skipped
    with a warning and listed. `examples`: keep the views of up to that many scans (those with lesions first) for
    the examples figure. progress: a `Progress` (one "step" per scan; cancelling raises `Cancelled`).
    `folder`: where the temporary file of healthy pixel values goes (created if missing; see the module docstring).
    Returns the figures (with "thresholds", "score", "data" sections added) and the examples."""
    flag_rates = [validate_flag_rate(rate) for rate in flag_rates]
    sources = list_sources(data)
    problems = [f"{s.image}: neither a lesion mask nor a label" for s in sources if s.mask is None and s.label is None]
    problems += [f"{s.image}: label {s.label} (use 0 normal, 1 abnormal)" for s in sources
                 if s.label not in (None, 0, 1)]
    if problems:
        raise DataError(f"{len(problems)} test scan(s) cannot be evaluated; fix them and run again:\n  " +
                        "\n  ".join(problems))
    scorer = scorer_for(model, kind)
    table, table_source = None, None
    if calibration_data is not None:
        table, table_source = normal_table(model, calibration_data, scorer, batch_size=batch_size,
                                           progress=progress), "calibration data"
    elif kind == "full" and model.card.calibration is not None:
        table, table_source = model.card.calibration, "model card"

    normals = NormalPool()
    kept: list[Example] = []
    others: list[Example] = []
    if folder is not None:
        Path(folder).mkdir(parents=True, exist_ok=True)
    run = ScanDetections(model, sources, scorer, batch_size=batch_size, progress=progress, brain_masks=False,
                         start=f"evaluating on {len(sources)} scan(s)", cancelled="evaluation cancelled")
    with Evaluator(folder) as evaluator:
        for scan in run:
            source, image, found = scan.source, scan.image, scan.found
            try:
                truth = (lesion_mask_on_grid(read_image(source.mask, validate=False), image)
                         if source.mask else None)
                label = scan_label(source.label, truth, str(source.image))
            except DataError as exc:
                run.skip(source, exc)
                continue
            evaluator.add(str(source.image), found.anomaly.array, found.mask.array, truth, label, source.type,
                          found.scan_score, image.geometry.spacing)
            if label == 0 and table is None:
                normals.add(found)
            lesion = truth is not None and bool(truth.any())
            chosen = kept if lesion else others
            if len(chosen) < examples:
                chosen.append(_example(str(source.image), label, source.type, found, image, truth))
            del scan, found, image, truth
        skipped = [{"image": str(s.image), "reason": s.error} for s in run.skipped]
        if not evaluator.scans:
            raise DataError(f"none of the {len(sources)} test scan(s) could be evaluated: " +
                            "; ".join(f"{s['image']}: {s['reason']}" for s in skipped))
        no_thresholds = "undefined: no thresholds"
        if table is None:
            if normals.pixels.seen >= 1000:
                table, table_source = normals.table(), "test-set normal scans"
            else:
                no_thresholds = (f"undefined: no thresholds for the {kind} score (the model card's table is for the "
                                 "full score" + ("" if kind != "full" else ", and this model has none") +
                                 "): give --calibration-data NORMALS, or include normal scans in the test set")
        thresholds = ([(rate, table.threshold(rate)) for rate in flag_rates] if table is not None else None)
        result = evaluator.metrics(thresholds, no_thresholds)
    result.metrics = {
        "score": {"kind": kind, "definition": SCORE_KINDS[kind]},
        "thresholds": {"source": table_source, "meaning": THRESHOLD_SOURCES.get(table_source),
                       "flag_rates": flag_rates,
                       "values": None if thresholds is None else [t for _, t in thresholds],
                       **({"undefined": no_thresholds} if thresholds is None else {})},
        "data": {"source": str(data), "rows": len(sources), "evaluated": len(sources) - len(skipped),
                 "skipped": skipped},
        **result.metrics,
    }
    return result, (kept + others)[:examples]
