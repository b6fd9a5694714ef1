"""Detection thresholds and score percentiles calibrated on normal data (docs/METHOD.md, "Thresholds").

A model's calibration (`Calibration`, the model card's `calibration` section) holds:
  - a table of quantiles of the anomaly map A over the pooled brain/body pixels of held-out normal scans, so that any
    flag rate (the share of normal foreground pixels that would be flagged, 0.1% to 20%) maps to a threshold; a pixel
    is flagged when A >= threshold;
  - the distribution of per-slice scores and, from `MIN_SCANS_FOR_SCAN_SCORES` normal scans on, of whole-scan
    scores, so that a new scan's scores are reported as percentiles of normal.
Torch-free: the Slicer panel moves its threshold with it before PyTorch is installed.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

import numpy as np

from ra_engine.core.errors import DataError, ModelError

# Flag rates from 0.1% to 20% (the range of the Slicer slider and --flag-rate), densely enough to interpolate.
FLAG_RATES = tuple(float(r) for r in np.round(np.geomspace(0.001, 0.2, 41), 6))
DEFAULT_FLAG_RATE = 0.05
# Whole-scan percentiles need enough normal scans to mean something; with fewer, only slice percentiles are given.
MIN_SCANS_FOR_SCAN_SCORES = 20
# Score distributions keep at most this many quantiles (every score when there are no more).
MAX_QUANTILES = 1001
NO_CALIBRATION = ("has no calibration (no table of anomaly values on normal scans, which turns a flag rate into a "
                  "threshold): run `ra calibrate` with this model on held-out normal scans, or give a threshold "
                  "explicitly")


@dataclass
class Calibration:
    """A model's calibration on normal scans (the model card's `calibration` section).

    flag_rates, thresholds: the table; thresholds[i] flags flag_rates[i] of the normal foreground pixels (they fall
    as the rate grows). n_pixels: the pixel values the table was made from; default_flag_rate: the rate used when
    none is given. The rest describes how it was made (`calibration.calibrate`): the foreground pixels seen and how
    they were sampled, the distributions of normal slice and scan scores (`score_distribution`; scan scores only
    from MIN_SCANS_FOR_SCAN_SCORES scans on), the scorer, the scans used and skipped, the command and the date."""

    flag_rates: list[float]
    thresholds: list[float]
    n_pixels: int
    default_flag_rate: float = DEFAULT_FLAG_RATE
    n_foreground_pixels: int | None = None
    pixel_sampling: dict | None = None
    slice_scores: dict | None = None
    scan_scores: dict | None = None
    min_scans_for_scan_scores: int = MIN_SCANS_FOR_SCAN_SCORES
    scorer: dict | None = None
    scans: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    command: list[str] | None = None
    created: str | None = None

    def threshold(self, flag_rate: float | None = None) -> float:
        """The threshold on A that flags `flag_rate` of normal foreground pixels (the default rate when None),
        interpolated linearly in log flag rate between the table's entries."""
        rates = np.asarray(self.flag_rates)
        rate = validate_flag_rate(self.default_flag_rate if flag_rate is None else flag_rate, rates)
        # thresholds fall as the rate grows; np.interp needs increasing x, which log(rate) is.
        return float(np.interp(np.log(rate), np.log(rates), np.asarray(self.thresholds)))

    def percentile(self, value: float, of: str) -> float | None:
        """The percentile of normal (0-100) of a "slice" or "scan" score; None when the calibration holds no
        distribution of that kind."""
        distribution = {"slice": self.slice_scores, "scan": self.scan_scores}[of]
        if not (distribution or {}).get("quantiles"):
            return None
        return percentile_of_normal(value, distribution)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def calibration_table(normal_values: np.ndarray, default_flag_rate: float = DEFAULT_FLAG_RATE) -> Calibration:
    """normal_values: A at the foreground pixels of held-out normal scans (any shape, flattened), all of them or a
    uniform sample. Returns the calibration's table (flag rates, thresholds, n_pixels, default flag rate)."""
    values = np.asarray(normal_values, dtype=np.float64).ravel()
    if values.size < 1000:
        raise DataError(f"only {values.size} normal foreground pixels to calibrate on: give more normal scans")
    if not np.all(np.isfinite(values)):
        raise DataError("the anomaly maps of the normal scans hold non-finite values: the model or a scan is broken")
    thresholds = np.quantile(values, 1.0 - np.asarray(FLAG_RATES))
    return Calibration(list(FLAG_RATES), [float(t) for t in thresholds], int(values.size),
                       validate_flag_rate(default_flag_rate))


def resolve_threshold(calibration: Calibration | None, flag_rate: float | None = None,
                      threshold: float | None = None, *, model: str = "", option: str = ""
                      ) -> tuple[float, float | None]:
    """The threshold on A to flag with, and the normal flag rate it flags (None for a threshold given directly):
    `threshold` itself, else the calibration's threshold at `flag_rate` (its default rate when None). ModelError,
    naming the `model` and the `option` that gives a threshold, when neither a threshold is given nor the model is
    calibrated."""
    if threshold is not None and flag_rate is not None:
        raise ValueError("give a threshold or a flag rate, not both")
    if threshold is not None:
        if not threshold >= 0:
            raise DataError(f"the threshold on the anomaly map must be 0 or more, got {threshold}")
        return float(threshold), None
    if calibration is None:
        raise ModelError(f"the model {model + ' ' if model else ''}{NO_CALIBRATION}{f' ({option})' if option else ''}")
    rate = calibration.default_flag_rate if flag_rate is None else validate_flag_rate(flag_rate)
    return calibration.threshold(rate), float(rate)


def validate_flag_rate(rate: float, flag_rates=FLAG_RATES) -> float:
    """`rate` as a float if it lies in the calibrated range (0.001 to 0.2 by default); else DataError."""
    low, high = float(flag_rates[0]), float(flag_rates[-1])
    try:
        rate = float(rate)
    except (TypeError, ValueError):
        raise DataError(f"flag rate {rate!r} is not a number: give the share of normal foreground pixels to flag, "
                        f"e.g. 0.05 (or 5%)") from None
    if not low <= rate <= high:  # also refuses NaN
        hint = f" (did you mean {rate / 100:g}, i.e. {rate:g}%?)" if rate > 1 and low <= rate / 100 <= high else ""
        raise DataError(f"flag rate {rate:g} is outside the calibrated range {low:g} to {high:g} ({low:.1%} to "
                        f"{high:.0%}): it is the share of normal foreground pixels to flag, e.g. 0.05 for 5%{hint}")
    return rate


def score_distribution(scores) -> dict:
    """The distribution of normal scores in one bounded form: {"n": number of scores, "quantiles": q} where q[k] is
    the quantile at probability k / (len(q) - 1); with at most MAX_QUANTILES scores, q is every score, sorted."""
    values = np.sort(np.asarray(scores, dtype=np.float64).ravel())
    if values.size == 0:
        raise DataError("no normal scores to build a distribution from")
    if values.size > MAX_QUANTILES:
        values = np.quantile(values, np.linspace(0.0, 1.0, MAX_QUANTILES))
    return {"n": int(np.asarray(scores).size), "quantiles": [float(v) for v in values]}


def percentile_of_normal(value: float, distribution: dict) -> float:
    """The percentile (0 to 100) of `value` among normal scores: the share of normal scores below it, interpolated
    between quantiles; a value tied with normal scores gets the middle of their range. 0 below every normal
    score, 100 above every one. distribution: as `score_distribution` makes it (the card's `slice_scores`,
    `scan_scores`)."""
    if not distribution or not distribution.get("quantiles"):
        raise DataError("the model has no distribution of normal scores for this: calibrate it with `ra calibrate`")
    q = np.asarray(distribution["quantiles"], dtype=np.float64)
    value = float(value)
    if math.isnan(value):
        raise DataError("cannot give the percentile of a NaN score")
    below, at_or_below = int(np.searchsorted(q, value, "left")), int(np.searchsorted(q, value, "right"))
    last = q.size - 1
    if at_or_below == 0:
        return 0.0
    if below == q.size:
        return 100.0
    if below < at_or_below:  # ties: the middle of the tied quantiles' probabilities
        position = (below + at_or_below - 1) / 2
    else:  # q[below - 1] < value < q[below]
        position = below - 1 + (value - q[below - 1]) / (q[below] - q[below - 1])
    return float(100.0 * position / last) if last else 50.0


