"""`ra eval`'s figures (docs/METHOD.md, "Evaluation"): image, pixel and lesion level, from one model's detections
with one score kind on scans with known labels and lesion masks.

Definitions (all on each scan's own grid, arrays (z, y, x) or (y, x)):
- Image level: a scan's score is the mean of the anomaly map in its brain/body mask (`Detection.scan_score`); AUROC,
  AP (average precision, scikit-learn's definition) and the FPR at the first threshold that reaches 95% / 99% TPR.
- Pixel level, inside the brain/body mask only: a pixel is positive when the lesion mask marks it. AUROC and AP of
  all pixels pooled over the scans, and their mean and sd (ddof 1) over the scans holding both classes; Dice of
  "A >= threshold" at the thresholds calibrated on normal data; the best Dice over all thresholds, an upper bound
  because it chooses the threshold with the test labels.
- Lesion level: a lesion is a connected component of the lesion mask (pixels touching by a face, an edge or a
  corner); it is detected at a threshold when more than 10% of its pixels (all of them, also those outside the
  brain/body mask, which are never flagged) are flagged. Detection rates overall, by size (`SIZE_BINS`) and by
  anomaly type.
- A figure that needs two classes when only one is present is None, with its reason in the section's "undefined".

Scans: a scan is abnormal (label 1) when its label says so or, without a label, when its lesion mask marks a pixel;
an empty mask is a normal scan unless the label says 1. An abnormal scan without a lesion mask or with an empty one
counts at image level only (where its lesion lies is unknown); a normal scan without a mask is all negative. Types
name anomalies: a normal scan's type is ignored, an abnormal scan without one is of type "unspecified".

Thresholds (`evaluate`): from a table calibrated for the chosen score on normal scans given as calibration data;
else the model card's table, which is the full score's; else (the L1 score, or an uncalibrated model) a table
calibrated in-sample on the test set's own normal scans, labelled so in the outputs; else the figures at thresholds
are None. Tables are made as `ra calibrate` makes them (model-space brain/body pixels).

Memory (`Evaluator`): pooled pixel AUROC, AP, curves and best Dice are exact. They need the rank of every healthy
pixel among the lesion pixels only, so the lesion pixels' values are held in memory (4 bytes each, plus 4 for their
lesion's number) and the healthy pixels' values are written to a temporary, already-unlinked file (4 bytes each, in
the output folder) and read back one scan at a time once all lesion pixels are known, to count them between the
distinct lesion values (`PooledRanking`, 16 bytes per distinct lesion value for all scans and again for each type).
Besides that: one scan's detection at a time, a few numbers per scan and per lesion, the views of at most twice
`examples` slices, and for in-sample thresholds a bounded sample of normal pixels (`calibration.PixelSample`).
"""
from __future__ import annotations

import math
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from ra_engine.core.errors import DataError
from ra_engine.core.image import Image

DEFAULT_FLAG_RATES = (0.05, 0.01)
DETECTED_FRACTION = 0.1
"""A lesion is detected when more than this share of its pixels is flagged (the authors' rule)."""
SIZE_BINS = {
    "volume_mm3": ((100.0, "small"), (1000.0, "medium"), (math.inf, "large")),
    "area_mm2": ((100.0, "small"), (1000.0, "medium"), (math.inf, "large")),
}
"""Lesion size classes, by upper edge (exclusive): volumes (mm^3) for 3D scans, areas (mm^2) for 2D images and
one-slice volumes. 100 mm^3 is a sphere of 5.8 mm diameter, 1000 mm^3 one of 12.4 mm; 100 mm^2 a disc of 11.3 mm,
1000 mm^2 one of 35.7 mm. Sizes use the image's spacing (1 per pixel for pictures without geometry)."""
SIZE_NAMES = ("small", "medium", "large")
ONE_CLASS = "undefined: only one class"
UPPER_BOUND = "upper bound (uses test labels)"
UNSPECIFIED = "unspecified"
PICTURE_FORMATS = ("png", "jpeg", "tiff", "bmp")


# ---- metric functions ---------------------------------------------------------------------------------------------


def only_one_class(n_positive: int, n_negative: int, positive: str = "abnormal", negative: str = "normal") -> str | None:
    """None when both classes are present, else the reason a two-class figure is undefined."""
    if n_positive > 0 and n_negative > 0:
        return None
    return f"{ONE_CLASS} ({n_positive} {positive}, {n_negative} {negative})"


def fpr_at_tpr(fpr: np.ndarray, tpr: np.ndarray, level: float) -> float:
    """The false positive rate at the first threshold (from the top) whose true positive rate reaches `level`;
    fpr, tpr: a ROC curve in increasing order (scikit-learn's `roc_curve`, drop_intermediate=False)."""
    return float(np.asarray(fpr)[int(np.argmax(np.asarray(tpr) >= level - 1e-12))])


def image_level(scores: Sequence[float], labels: Sequence[int]) -> dict:
    """AUROC, AP and FPR at 95% and 99% TPR of scan scores (higher = more abnormal) against labels (1 abnormal),
    with the class counts; the figures are None, with a reason in "undefined", when one class is missing."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=int)
    n_abnormal = int(np.count_nonzero(labels == 1))
    result = {"n_abnormal": n_abnormal, "n_normal": int(labels.size - n_abnormal),
              "auroc": None, "ap": None, "fpr_at_95_tpr": None, "fpr_at_99_tpr": None}
    reason = only_one_class(n_abnormal, labels.size - n_abnormal)
    if reason:
        result["undefined"] = {key: reason for key in ("auroc", "ap", "fpr_at_95_tpr", "fpr_at_99_tpr")}
        return result
    fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
    result.update(auroc=float(roc_auc_score(labels, scores)), ap=float(average_precision_score(labels, scores)),
                  fpr_at_95_tpr=fpr_at_tpr(fpr, tpr, 0.95), fpr_at_99_tpr=fpr_at_tpr(fpr, tpr, 0.99))
    return result


def image_curves(scores: Sequence[float], labels: Sequence[int]) -> dict | None:
    """{"roc": (fpr, tpr), "pr": (recall, precision)} of scan scores from the highest threshold down (so both rates
    and the recall increase), None with one class only."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    labels = np.asarray(labels, dtype=int)
    if only_one_class(int(labels.sum()), int(labels.size - labels.sum())):
        return None
    fpr, tpr, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    return {"roc": (fpr, tpr), "pr": (recall[::-1], precision[::-1])}


def dice_from_counts(tp: int, fp: int, fn: int) -> float | None:
    """2 TP / (2 TP + FP + FN); None when nothing is flagged and nothing is true (0 / 0)."""
    denominator = 2 * tp + fp + fn
    return None if denominator == 0 else 2.0 * tp / denominator


def dice(flagged: np.ndarray, truth: np.ndarray) -> float | None:
    """Dice of two boolean masks of the same shape (None when both are empty)."""
    flagged, truth = np.asarray(flagged, dtype=bool), np.asarray(truth, dtype=bool)
    tp = int(np.count_nonzero(flagged & truth))
    return dice_from_counts(tp, int(np.count_nonzero(flagged)) - tp, int(np.count_nonzero(truth)) - tp)


def mean_sd(values: Sequence[float]) -> tuple[float | None, float | None, int]:
    """(mean, sample sd with ddof 1, n) of the values that are not None; None where undefined (sd needs 2)."""
    values = np.asarray([v for v in values if v is not None], dtype=np.float64)
    if values.size == 0:
        return None, None, 0
    return float(values.mean()), (float(values.std(ddof=1)) if values.size > 1 else None), int(values.size)


def lesion_components(truth: np.ndarray) -> tuple[np.ndarray, int]:
    """The lesions of a lesion mask (non-zero = lesion): a label array (0 background, 1..n) and n; pixels that touch
    by a face, an edge or a corner belong to the same lesion (as `regions.find_regions` groups detections)."""
    from scipy import ndimage

    truth = np.asarray(truth) != 0
    labels, n = ndimage.label(truth, structure=np.ones((3,) * truth.ndim, bool))
    return labels, int(n)


def pixel_size(shape: tuple[int, ...], spacing: Sequence[float] | None) -> tuple[str, float]:
    """("volume_mm3", mm^3 per voxel) for volumes, ("area_mm2", mm^2 per pixel) for 2D images and one-slice volumes;
    spacing listed (x, y, z) as in `Geometry` (None: 1 per pixel)."""
    planar = len(shape) == 2 or shape[0] == 1
    spacing = np.ones(len(shape)) if spacing is None else np.asarray(spacing, dtype=np.float64)
    return ("area_mm2", float(np.prod(spacing[:2]))) if planar else ("volume_mm3", float(np.prod(spacing)))


def size_bin(size: float, unit: str) -> str:
    """The `SIZE_BINS` class ("small", "medium", "large") of a lesion of `size` in `unit`."""
    return next(name for edge, name in SIZE_BINS[unit] if size < edge)


def is_detected(flagged: int, voxels: int, fraction: float = DETECTED_FRACTION) -> bool:
    """A lesion of `voxels` pixels with `flagged` of them flagged is detected when flagged > fraction * voxels."""
    return flagged > fraction * voxels


def detection_rate(detected: Sequence[bool]) -> dict:
    """{"lesions", "detected", "rate"}; rate None with "undefined" when there is no lesion."""
    detected = np.asarray(detected, dtype=bool)
    result = {"lesions": int(detected.size), "detected": int(detected.sum()),
              "rate": float(detected.mean()) if detected.size else None}
    if not detected.size:
        result["undefined"] = "undefined: no lesions"
    return result


class PooledRanking:
    """Exact pooled AUROC, AP, ROC and PR curves and best Dice of pixel scores, holding only the positives.

    `positives`: the scores of all positive pixels (float32 after conversion, as the maps are). Negatives are then
    streamed in with `add_negatives` (any number of chunks) and only counted: per distinct positive value u_j, how
    many negatives equal it and how many lie between it and the next lower one. Every figure here depends on the
    negatives only through these counts, so the results equal scikit-learn's on all pixels at once (ties count half
    in AUROC; AP is the step sum over the distinct thresholds)."""

    def __init__(self, positives: np.ndarray):
        self.values, counts = np.unique(np.asarray(positives, dtype=np.float32).ravel(), return_counts=True)
        self.positive_counts = counts.astype(np.int64)
        self.n_positive = int(counts.sum())
        self.n_negative = 0
        self._equal = np.zeros(self.values.size, np.int64)
        self._between = np.zeros(self.values.size + 1, np.int64)  # [j]: in (u_{j-1}, u_j); [m]: above all

    def add_negatives(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32).ravel()
        self.n_negative += values.size
        m = self.values.size
        if values.size == 0 or m == 0:
            return
        index = np.searchsorted(self.values, values, "left")
        equal = np.zeros(values.size, bool)
        inside = index < m
        equal[inside] = self.values[index[inside]] == values[inside]
        self._equal += np.bincount(index[equal], minlength=m)
        self._between += np.bincount(index[~equal], minlength=m + 1)

    def _counts(self) -> tuple[np.ndarray, np.ndarray]:
        """(TP, FP) of "score >= u_j" for each distinct positive value u_j, ascending."""
        reverse_cumsum = lambda a: np.cumsum(a[::-1])[::-1]
        return reverse_cumsum(self.positive_counts), reverse_cumsum(self._equal) + reverse_cumsum(self._between)[1:]

    @property
    def undefined(self) -> str | None:
        return only_one_class(self.n_positive, self.n_negative, "lesion pixels", "healthy pixels")

    def auroc(self) -> float | None:
        if self.undefined:
            return None
        _, fp = self._counts()
        below = self.n_negative - fp + 0.5 * self._equal  # negatives under each positive value, ties half
        return float(np.dot(self.positive_counts, below) / (float(self.n_positive) * self.n_negative))

    def average_precision(self) -> float | None:
        if self.undefined:
            return None
        tp, fp = self._counts()
        return float(np.sum(self.positive_counts / self.n_positive * (tp / (tp + fp))))

    def best_dice(self) -> tuple[float | None, float | None]:
        """(the highest Dice of "score >= t" over all t, the lowest t that gives it); (None, None) without positives.
        The best threshold always lies at a positive value: between two, lowering t adds only negatives."""
        if self.n_positive == 0:
            return None, None
        tp, fp = self._counts()
        scores = 2.0 * tp / (tp + fp + self.n_positive)
        best = int(np.argmax(scores))
        return float(scores[best]), float(self.values[best])

    def curves(self, max_points: int = 2000) -> dict | None:
        """{"roc": (fpr, tpr), "pr": (recall, precision)} for plotting, from the highest threshold down (the rates
        and the recall increase), at most `max_points` each (evenly spaced along the curve); None with one class
        only. The PR points are those where the recall grows, each with its precision."""
        if self.undefined:
            return None
        tp, fp = self._counts()
        tp, fp, equal = tp[::-1], fp[::-1], self._equal[::-1]
        tp_before = np.r_[0, tp[:-1]]
        # Before each positive value the negatives just above it come in (a horizontal step), then it and its ties.
        fps = np.r_[0, np.ravel(np.column_stack([fp - equal, fp])), self.n_negative]
        tps = np.r_[0, np.ravel(np.column_stack([tp_before, tp])), self.n_positive]
        keep = lambda n: np.unique(np.linspace(0, n - 1, min(n, max_points)).round().astype(int))
        roc = keep(fps.size)
        pr = keep(tp.size)
        return {"roc": (fps[roc] / self.n_negative, tps[roc] / self.n_positive),
                "pr": (tp[pr] / self.n_positive, tp[pr] / (tp[pr] + fp[pr]))}


# ---- lesion masks -------------------------------------------------------------------------------------------------


def _extent(image: Image) -> tuple[np.ndarray, np.ndarray]:
    """The LPS bounding box (low, high corners, mm) of the space the image's pixels cover (their outer edges)."""
    size = image.array.shape[::-1]
    d = image.geometry.dimension
    direction = np.asarray(image.geometry.direction, dtype=np.float64).reshape(d, d)
    corners = np.stack(np.meshgrid(*[[-0.5, s - 0.5] for s in size], indexing="ij"), -1).reshape(-1, d)
    points = np.asarray(image.geometry.origin) + (corners * np.asarray(image.geometry.spacing)) @ direction.T
    return points.min(0), points.max(0)


def _same_geometry(a: Image, b: Image) -> bool:
    tolerance = 1e-3 * min(min(a.geometry.spacing), min(b.geometry.spacing))
    return all(np.allclose(getattr(a.geometry, key), getattr(b.geometry, key), rtol=0, atol=tolerance)
               for key in ("spacing", "origin", "direction"))


def lesion_mask_on_grid(mask: Image, image: Image) -> np.ndarray:
    """The lesion mask (non-zero = lesion) as a boolean array on the image's grid (the image's array shape).

    A mask of the image's shape is taken pixel for pixel (with a warning when both files carry a geometry and the
    geometries differ). A mask on another grid that covers the same physical space (bounding boxes equal to within
    one pixel of the coarser grid) is resampled onto the image's grid by nearest neighbour, with a warning. Any
    other mask raises DataError."""
    name, image_name = mask.source or "the lesion mask", image.source or "the image"
    if mask.array.size == image.array.size and mask.array.squeeze().shape == image.array.squeeze().shape:
        has_geometry = lambda i: i.metadata.get("format") not in PICTURE_FORMATS
        if (mask.array.ndim == image.array.ndim and has_geometry(mask) and has_geometry(image)
                and not _same_geometry(mask, image)):
            warnings.warn(f"{name} has the shape of {image_name} but another geometry (spacing {mask.geometry.spacing}"
                          f" vs {image.geometry.spacing}, origin {mask.geometry.origin} vs {image.geometry.origin}): "
                          f"taken pixel for pixel", stacklevel=2)
        return (mask.array != 0).reshape(image.array.shape)
    if mask.array.ndim != image.array.ndim:
        raise DataError(f"{name} is {mask.array.ndim}D {mask.array.shape} but {image_name} is {image.array.ndim}D "
                        f"{image.array.shape}: give the lesion mask on the image's grid")
    (mask_low, mask_high), (image_low, image_high) = _extent(mask), _extent(image)
    tolerance = max(max(mask.geometry.spacing), max(image.geometry.spacing))
    if not (np.all(np.abs(mask_low - image_low) <= tolerance) and np.all(np.abs(mask_high - image_high) <= tolerance)):
        box = lambda low, high: " to ".join(f"({', '.join(f'{v:.1f}' for v in corner)})" for corner in (low, high))
        raise DataError(f"{name} (shape {mask.array.shape}, spacing {mask.geometry.spacing}) does not cover the same "
                        f"physical space as {image_name} (shape {image.array.shape}, spacing "
                        f"{image.geometry.spacing}): the mask spans {box(mask_low, mask_high)} mm and the image "
                        f"{box(image_low, image_high)} mm (LPS). Give the lesion mask on the image's grid, or one "
                        f"covering the same space")
    import SimpleITK as sitk

    warnings.warn(f"{name} (shape {mask.array.shape}) is on another grid than {image_name} (shape "
                  f"{image.array.shape}) covering the same space: resampled onto the image's grid (nearest neighbour)",
                  stacklevel=2)
    moving = Image((mask.array != 0).astype(np.uint8), mask.geometry).to_sitk()
    reference = image.geometry.apply_to(sitk.Image([int(v) for v in image.array.shape[::-1]], sitk.sitkUInt8))
    resampled = sitk.Resample(moving, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return sitk.GetArrayFromImage(resampled) != 0


def scan_label(label: int | None, truth: np.ndarray | None, name: str = "the scan") -> int:
    """The scan's label (1 abnormal, 0 normal): the given one, else 1 when its lesion mask marks a pixel. DataError
    when there is neither, or when a scan labelled normal has lesions."""
    lesion_pixels = 0 if truth is None else int(np.count_nonzero(truth))
    if label is None:
        if truth is None:
            raise DataError(f"{name} has neither a lesion mask nor a label: give one (label 0 normal, 1 abnormal)")
        return int(lesion_pixels > 0)
    if label not in (0, 1):
        raise DataError(f"{name} has the label {label!r}: use 0 (normal) or 1 (abnormal)")
    if label == 0 and lesion_pixels:
        raise DataError(f"{name} is labelled 0 (normal) but its lesion mask marks {lesion_pixels} pixels: fix the "
                        f"label or the mask")
    return label


# ---- accumulating scans -------------------------------------------------------------------------------------------


@dataclass
class _Scan:
    name: str
    label: int
    type: str | None
    score: float
    pixel: bool  # lesion pixels known (pixel and lesion level)
    mask_pixels: int
    negatives: tuple[int, int] = (0, 0)  # (offset, count) in the negatives file
    positives: tuple[int, int] = (0, 0)  # (offset, count) in the positive arrays
    lesions: int = 0
    auroc: float | None = None
    ap: float | None = None


@dataclass
class _Lesion:
    scan: int
    voxels: int
    in_mask: int
    size: float
    unit: str
    size_class: str
    type: str


@dataclass
class EvaluationResult:
    """`metrics`: the JSON-able figures (see `Evaluator.metrics`); `curves`: {"pixel": ..., "image": ...} as
    `PooledRanking.curves` / `image_curves` give them (None with one class), for the plots."""
    metrics: dict
    curves: dict = field(default_factory=dict)


class Evaluator:
    """Collects what the figures need from one scan at a time (`add`), then computes them (`metrics`).

    `folder`: where the temporary file of healthy pixels' values goes (unlinked at once, so it never outlives the
    process; 4 bytes per healthy pixel inside the brain/body masks). Use as a context manager, or call `close`."""

    def __init__(self, folder: str | Path | None = None):
        self._negatives = tempfile.TemporaryFile(prefix=".ra-eval-", dir=folder)
        self._written = 0
        self._positive_values: list[np.ndarray] = []
        self._positive_lesions: list[np.ndarray] = []
        self._n_positive = 0
        self.scans: list[_Scan] = []
        self.lesions: list[_Lesion] = []

    def __enter__(self) -> Evaluator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._negatives.close()

    def add(self, name: str, anomaly: np.ndarray, mask: np.ndarray, truth: np.ndarray | None, label: int,
            type: str | None = None, score: float | None = None, spacing: Sequence[float] | None = None) -> None:
        """One scan: `anomaly` (float, >= 0) and `mask` (brain/body, non-zero inside) on its grid, (z, y, x) or
        (y, x); `truth`: its lesion mask on the same grid (non-zero = lesion) or None when unknown; `label`: 1
        abnormal, 0 normal (`scan_label`); `type`: anomaly type; `score`: its image-level score (default: mean of
        the map in the mask); spacing: (x, y, z) in mm, for lesion sizes."""
        from sklearn.metrics import average_precision_score, roc_auc_score

        anomaly = np.asarray(anomaly, dtype=np.float32)
        inside = np.asarray(mask) != 0
        if inside.shape != anomaly.shape or (truth is not None and np.shape(truth) != anomaly.shape):
            raise DataError(f"{name}: the anomaly map {anomaly.shape}, brain/body mask {inside.shape} and lesion mask "
                            f"{None if truth is None else np.shape(truth)} must share one grid")
        if not inside.any():
            raise DataError(f"{name}: the brain/body mask is empty")
        label = scan_label(label, truth, name)
        values = anomaly[inside]
        record = _Scan(name, label, type if label == 1 else None,
                       float(values.mean(dtype=np.float64)) if score is None else float(score),
                       pixel=label == 0 or (truth is not None and bool(np.any(truth))), mask_pixels=int(values.size))
        if record.pixel:
            lesion_labels, n = (lesion_components(truth) if truth is not None
                                else (np.zeros(anomaly.shape, np.int32), 0))
            in_mask_labels = lesion_labels[inside]
            positive = in_mask_labels > 0
            negatives = values[~positive]
            self._negatives.write(negatives.astype("<f4", copy=False).tobytes())
            record.negatives = (self._written, int(negatives.size))
            self._written += negatives.size
            record.positives = (self._n_positive, int(np.count_nonzero(positive)))
            self._n_positive += record.positives[1]
            self._positive_values.append(values[positive])
            self._positive_lesions.append((in_mask_labels[positive] - 1 + len(self.lesions)).astype(np.int32))
            if n:
                unit, per_pixel = pixel_size(anomaly.shape, spacing)
                voxels = np.bincount(lesion_labels.ravel(), minlength=n + 1)[1:]
                in_mask = np.bincount(in_mask_labels, minlength=n + 1)[1:]
                for k in range(n):
                    size = float(voxels[k]) * per_pixel
                    self.lesions.append(_Lesion(len(self.scans), int(voxels[k]), int(in_mask[k]), size, unit,
                                                size_bin(size, unit), type or UNSPECIFIED))
            record.lesions = n
            if record.positives[1] and negatives.size:
                labels = positive.astype(np.int8)
                record.auroc = float(roc_auc_score(labels, values))
                record.ap = float(average_precision_score(labels, values))
        self.scans.append(record)

    def _read_negatives(self, scan: _Scan) -> np.ndarray:
        offset, count = scan.negatives
        self._negatives.seek(4 * offset)
        return np.fromfile(self._negatives, dtype="<f4", count=count)

    def metrics(self, thresholds: Sequence[tuple[float, float]] | None,
                no_thresholds: str = "undefined: no thresholds") -> EvaluationResult:
        """All figures. thresholds: (flag rate, threshold on the map) pairs for the figures at calibrated thresholds;
        None: those figures are None with the reason `no_thresholds`."""
        self._negatives.flush()
        if not self.scans:
            raise DataError("no scan was evaluated")
        positive_values = (np.concatenate(self._positive_values) if self._positive_values
                           else np.empty(0, np.float32))
        positive_lesions = (np.concatenate(self._positive_lesions) if self._positive_lesions
                            else np.empty(0, np.int32))
        pixel_scans = [i for i, s in enumerate(self.scans) if s.pixel]
        types = self._types()
        positives_of = lambda s: positive_values[s.positives[0]:s.positives[0] + s.positives[1]]
        # Pooled pixel figures of all pixel scans (group None) and of each type's abnormal pixel scans.
        groups_of = lambda s: [None] + ([s.type or UNSPECIFIED] if s.label == 1 else [])
        groups: dict[str | None, list[int]] = {g: [] for g in (None, *types)}
        for i in pixel_scans:
            for group in groups_of(self.scans[i]):
                groups[group].append(i)
        rankings = {g: PooledRanking(np.concatenate([positives_of(self.scans[i]) for i in members])
                                     if members else np.empty(0, np.float32)) for g, members in groups.items()}
        thresholds = list(thresholds or [])
        # per threshold and pixel scan: (TP, FP, P, N)
        counts = np.zeros((len(thresholds), len(self.scans), 4), np.int64)
        for i in pixel_scans:
            scan = self.scans[i]
            negatives, positives = self._read_negatives(scan), positives_of(scan)
            for group in groups_of(scan):
                rankings[group].add_negatives(negatives)
            for k, (_, threshold) in enumerate(thresholds):
                counts[k, i] = (np.count_nonzero(positives >= threshold), np.count_nonzero(negatives >= threshold),
                                positives.size, negatives.size)
        lesion_flagged = [np.bincount(positive_lesions, weights=(positive_values >= t),
                                      minlength=len(self.lesions)).astype(np.int64) for _, t in thresholds]

        metrics = {
            "counts": self._counts(),
            "image_level": image_level([s.score for s in self.scans], [s.label for s in self.scans]),
            "pixel_level": self._pixel_level(rankings[None], thresholds, counts, pixel_scans, no_thresholds),
            "lesion_level": self._lesion_level(thresholds, lesion_flagged, no_thresholds),
            "per_type": self._per_type(types, rankings, thresholds, lesion_flagged),
            "scans": [self._scan_row(i, thresholds, counts) for i in range(len(self.scans))],
        }
        curves = {"pixel": rankings[None].curves(),
                  "image": image_curves([s.score for s in self.scans], [s.label for s in self.scans])}
        return EvaluationResult(metrics, curves)

    def _types(self) -> list[str]:
        found = {s.type or UNSPECIFIED for s in self.scans if s.label == 1}
        return sorted(found - {UNSPECIFIED}) + ([UNSPECIFIED] if UNSPECIFIED in found else [])

    def _counts(self) -> dict:
        pixel = [s for s in self.scans if s.pixel]
        return {"scans": len(self.scans), "normal": sum(s.label == 0 for s in self.scans),
                "abnormal": sum(s.label == 1 for s in self.scans),
                "with_known_lesion_pixels": len(pixel),
                "abnormal_without_lesion_mask": sum(s.label == 1 and not s.pixel for s in self.scans),
                "lesions": len(self.lesions),
                "pixels_in_mask": sum(s.mask_pixels for s in pixel),
                "lesion_pixels": sum(s.positives[1] for s in pixel),
                "healthy_pixels": sum(s.negatives[1] for s in pixel)}

    def _pixel_level(self, ranking: PooledRanking, thresholds, counts, pixel_scans, no_thresholds) -> dict:
        both = [self.scans[i] for i in pixel_scans if self.scans[i].auroc is not None]
        auroc_mean, auroc_sd, n = mean_sd([s.auroc for s in both])
        ap_mean, ap_sd, _ = mean_sd([s.ap for s in both])
        best, best_threshold = ranking.best_dice()
        result = {
            "auroc": ranking.auroc(), "ap": ranking.average_precision(),
            "per_scan": {"scans_with_both_classes": n, "auroc_mean": auroc_mean, "auroc_sd": auroc_sd,
                         "ap_mean": ap_mean, "ap_sd": ap_sd},
            "best_dice": {"dice": best, "threshold": best_threshold, "note": UPPER_BOUND},
            "at_flag_rate": [],
            "computation": "exact: all pixels inside the brain/body masks of the scans with known lesion pixels",
        }
        undefined = {}
        if ranking.undefined:
            undefined.update(auroc=ranking.undefined, ap=ranking.undefined)
        if n == 0:
            undefined["per_scan"] = "undefined: no scan holds both lesion and healthy pixels"
        if best is None:
            undefined["best_dice"] = "undefined: no lesion pixels"
        if not thresholds:
            undefined["at_flag_rate"] = no_thresholds
        normal = np.array([self.scans[i].label == 0 for i in range(len(self.scans))])
        with_lesion = np.array([s.positives[1] > 0 for s in self.scans])
        for k, (rate, threshold) in enumerate(thresholds):
            tp, fp, p, n_neg = counts[k].sum(0)
            scan_dice = [dice_from_counts(int(c[0]), int(c[1]), int(c[2] - c[0])) for c in counts[k][with_lesion]]
            mean, sd, n_dice = mean_sd(scan_dice)
            normal_fp, normal_n = counts[k][normal, 1].sum(), counts[k][normal, 3].sum()
            result["at_flag_rate"].append({
                "flag_rate": rate, "threshold": threshold,
                "dice": dice_from_counts(int(tp), int(fp), int(p - tp)),
                "dice_per_scan_mean": mean, "dice_per_scan_sd": sd, "scans_with_lesion_pixels": n_dice,
                "sensitivity": float(tp / p) if p else None,
                "healthy_flagged_fraction": float(fp / n_neg) if n_neg else None,
                "normal_scans_flagged_fraction": float(normal_fp / normal_n) if normal_n else None,
            })
        if undefined:
            result["undefined"] = undefined
        return result

    def _lesion_level(self, thresholds, lesion_flagged, no_thresholds) -> dict:
        units = sorted({lesion.unit for lesion in self.lesions})
        result = {
            "definition": f"a connected component of the lesion mask (26/8-connected), detected when more than "
                          f"{DETECTED_FRACTION:.0%} of its pixels are flagged",
            "size_bins": {unit: [{"class": name, "below": None if math.isinf(edge) else edge}
                                 for edge, name in SIZE_BINS[unit]] for unit in (units or list(SIZE_BINS))},
            "lesions": len(self.lesions),
            "outside_mask": sum(lesion.in_mask == 0 for lesion in self.lesions),
            "by_size": {name: sum(lesion.size_class == name for lesion in self.lesions) for name in SIZE_NAMES},
            "at_flag_rate": [],
        }
        if not thresholds:
            result["undefined"] = {"at_flag_rate": no_thresholds}
        for (rate, threshold), flagged in zip(thresholds, lesion_flagged):
            detected = np.array([is_detected(int(f), lesion.voxels) for f, lesion in zip(flagged, self.lesions)],
                                dtype=bool)
            select = lambda keep: detected[[i for i, lesion in enumerate(self.lesions) if keep(lesion)]]
            result["at_flag_rate"].append({
                "flag_rate": rate, "threshold": threshold, **detection_rate(detected),
                "by_size": {name: detection_rate(select(lambda l, n=name: l.size_class == n)) for name in SIZE_NAMES},
                "by_type": {t: detection_rate(select(lambda l, t=t: l.type == t)) for t in self._types()},
            })
        return result

    def _per_type(self, types, rankings, thresholds, lesion_flagged) -> dict:
        normal_scores = [s.score for s in self.scans if s.label == 0]
        result = {}
        for t in types:
            scans = [s for s in self.scans if s.label == 1 and (s.type or UNSPECIFIED) == t]
            image = image_level([s.score for s in scans] + normal_scores, [1] * len(scans) + [0] * len(normal_scores))
            ranking = rankings[t]
            lesions = [i for i, lesion in enumerate(self.lesions) if lesion.type == t]
            entry = {"scans": len(scans), "lesions": len(lesions),
                     "image_auroc_vs_normal": image["auroc"], "image_ap_vs_normal": image["ap"],
                     "pixel_auroc": ranking.auroc(), "pixel_ap": ranking.average_precision(),
                     "detection_rate": [{"flag_rate": rate, **detection_rate(
                         [is_detected(int(flagged[i]), self.lesions[i].voxels) for i in lesions])}
                         for (rate, _), flagged in zip(thresholds, lesion_flagged)]}
            undefined = {}
            if image.get("undefined"):
                undefined.update(image_auroc_vs_normal=image["undefined"]["auroc"],
                                 image_ap_vs_normal=image["undefined"]["ap"])
            if ranking.undefined:
                undefined.update(pixel_auroc=ranking.undefined, pixel_ap=ranking.undefined)
            if undefined:
                entry["undefined"] = undefined
            result[t] = entry
        return result

    def _scan_row(self, i: int, thresholds, counts) -> dict:
        scan = self.scans[i]
        row = {"image": scan.name, "label": scan.label, "type": scan.type, "score": scan.score,
               "pixel_level": scan.pixel, "lesions": scan.lesions, "lesion_pixels": scan.positives[1],
               "auroc": scan.auroc, "ap": scan.ap}
        if scan.pixel:
            row["dice"] = [dice_from_counts(int(c[0]), int(c[1]), int(c[2] - c[0])) for c in counts[:, i]]
        return row


# ---- evaluating a model on a test set -----------------------------------------------------------------------------


