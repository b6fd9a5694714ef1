"""Detection thresholds and score percentiles calibrated on normal data (SPEC-RA.md, "Inference and anomaly score").

The model card's `calibration` section holds:
  - a table of quantiles of the anomaly map A over the pooled brain/body pixels of held-out normal scans, so that any
    flag rate (the share of normal foreground pixels that would be flagged, 0.1% to 20%) maps to a threshold; a pixel
    is flagged when A >= threshold;
  - the distribution of per-slice scores and, from `MIN_SCANS_FOR_SCAN_SCORES` normal scans on, of whole-scan
    scores, so that a new scan's scores are reported as percentiles of normal.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import math
import warnings
from pathlib import Path

import numpy as np

from .errors import DataError

# Flag rates from 0.1% to 20% (the range of the Slicer slider and --flag-rate), densely enough to interpolate.
FLAG_RATES = tuple(float(r) for r in np.round(np.geomspace(0.001, 0.2, 41), 6))
DEFAULT_FLAG_RATE = 0.05
# Whole-scan percentiles need enough normal scans to mean something; with fewer, only slice percentiles are given.
MIN_SCANS_FOR_SCAN_SCORES = 20
# At most this many pixel values are kept for the quantile table (see `PixelSample` for the accuracy it gives).
MAX_PIXELS = 2_000_000
# Score distributions keep at most this many quantiles (every score when there are no more).
MAX_QUANTILES = 1001
SEED = 2109


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


def calibration_table(normal_values: np.ndarray, default_flag_rate: float = DEFAULT_FLAG_RATE) -> dict:
    """normal_values: A at the foreground pixels of held-out normal scans (any shape, flattened), all of them or a
    uniform sample. Returns the JSON-able table {"flag_rates", "thresholds", "n_pixels", "default_flag_rate"} for
    the model card; thresholds[i] flags flag_rates[i] of the values (they fall as the rate grows)."""
    values = np.asarray(normal_values, dtype=np.float64).ravel()
    if values.size < 1000:
        raise DataError(f"only {values.size} normal foreground pixels to calibrate on: give more normal scans")
    if not np.all(np.isfinite(values)):
        raise DataError("the anomaly maps of the normal scans hold non-finite values: the model or a scan is broken")
    thresholds = np.quantile(values, 1.0 - np.asarray(FLAG_RATES))
    return {"flag_rates": list(FLAG_RATES), "thresholds": [float(t) for t in thresholds], "n_pixels": int(values.size),
            "default_flag_rate": validate_flag_rate(default_flag_rate)}


def threshold_for(table: dict, flag_rate: float | None = None) -> float:
    """The anomaly-map threshold that flags `flag_rate` of normal foreground pixels (the table's default when None),
    interpolated linearly in log flag rate between the table's entries."""
    rates = np.asarray(table["flag_rates"])
    rate = validate_flag_rate(table["default_flag_rate"] if flag_rate is None else flag_rate, rates)
    # thresholds fall as the rate grows; np.interp needs increasing x, which log(rate) is.
    return float(np.interp(np.log(rate), np.log(rates), np.asarray(table["thresholds"])))


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


class PixelSample:
    """A uniform random sample, without replacement, of at most `capacity` values from a stream of arrays.

    Each value gets a random key (fixed seed, so a calibration is reproducible) and the `capacity` values with the
    smallest keys are kept ("bottom-k" sampling): every pooled pixel has the same chance to be kept, whatever scan
    it came from and however large that scan is, and memory stays at `capacity` values whatever the number of scans.
    A uniform sample keeps the flag rates exact in expectation; with K kept values, the share of normal pixels that a
    threshold at flag rate p flags has a relative standard error of sqrt((1 - p) / (p K)): 2.2% at p = 0.1% and
    0.2% at p = 20% for K = 2,000,000. When the data hold no more than `capacity` values, all are kept (exact)."""

    def __init__(self, capacity: int = MAX_PIXELS, seed: int = SEED):
        self.capacity = int(capacity)
        self.seen = 0
        self._rng = np.random.default_rng(seed)
        self._values = np.empty(0, np.float32)
        self._keys = np.empty(0, np.float64)

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values, dtype=np.float32).ravel()
        self.seen += values.size
        self._values = np.concatenate([self._values, values])
        self._keys = np.concatenate([self._keys, self._rng.random(values.size)])
        if self._values.size > self.capacity:
            keep = np.argpartition(self._keys, self.capacity - 1)[:self.capacity]
            self._values, self._keys = self._values[keep], self._keys[keep]

    @property
    def values(self) -> np.ndarray:
        return self._values


def scan_fingerprint(path: Path) -> dict:
    """What identifies a calibration scan: its path, size in bytes and sha256; for a folder (a DICOM series) the
    sha256 is of the sorted list of its files' relative names and sha256s."""
    from .card import sha256_of

    path = Path(path).absolute()
    if path.is_file():
        return {"path": str(path), "bytes": path.stat().st_size, "sha256": sha256_of(path)}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    listing = "".join(f"{p.relative_to(path).as_posix()}\t{sha256_of(p)}\n" for p in files)
    return {"path": str(path), "bytes": sum(p.stat().st_size for p in files),
            "sha256": hashlib.sha256(listing.encode("utf-8")).hexdigest()}


def calibrate_model(model_dir: str | Path, sources, scorer=None, device: str = "cpu", progress=None,
                    batch_size: int = 8, flag_rate: float = DEFAULT_FLAG_RATE, command: list[str] | None = None,
                    max_pixels: int = MAX_PIXELS) -> dict:
    """Calibrates the model in `model_dir` on the normal scans `sources` (a folder, glob, CSV or list, as for
    training; give scans held out from training) and writes the result into its card's `calibration` section.

    Runs `detect` on each scan and pools A over its foreground (brain/body) pixels in a bounded uniform sample
    (`PixelSample`: whole maps are never kept, so memory does not grow with the number of scans), then stores the
    flag-rate table (`calibration_table`, `flag_rate` as its default), the distribution of per-slice scores, the
    distribution of whole-scan scores (from MIN_SCANS_FOR_SCAN_SCORES scans on; None below), and the scans used
    (path, size, sha256). Scans that cannot be used (DataError) are skipped with a warning and listed.
    scorer: an `AnomalyScorer` (None: the one the card names, `detect.scorer_for`). progress: a `Progress`; one "step"
    event per scan; cancelling it stops the job (raises `Cancelled`) and leaves the card as it was.
    The card is rewritten atomically; the weights and their sha256 are not touched. Returns the section."""
    from .detect import detect, scorer_for
    from .devices import resolve_device
    from .errors import Cancelled
    from .imageio import read_image
    from .card import read_card, write_card
    from .modeldir import load_model
    from .progress import Progress
    from .sources import list_sources

    flag_rate = validate_flag_rate(flag_rate)
    progress = progress or Progress()
    sources = list_sources(sources)
    model = load_model(model_dir, device=resolve_device(device))
    scorer = scorer or scorer_for(model)
    pixels, slice_scores, scan_scores, scans, skipped = PixelSample(max_pixels), [], [], [], []
    still_wanted = lambda done, total: not progress.cancelled
    progress.emit("start", step=0, total_steps=len(sources),
                  message=f"calibrating on {len(sources)} normal scan(s)")
    for i, source in enumerate(sources):
        try:
            image = read_image(source.image)
            mask = read_image(source.mask, validate=False) if source.mask else None
            found = detect(model, image, scorer, mask, batch_size=batch_size, progress=still_wanted)
        except DataError as exc:
            warnings.warn(f"skipping {source.image}: {exc}", stacklevel=2)
            skipped.append({"path": str(source.image), "reason": str(exc)})
        else:
            pixels.add(found.anomaly_stack[found.slices.masks])
            slice_scores += [s["score"] for s in found.slice_scores]
            scan_scores.append(found.scan_score)
            scans.append({**scan_fingerprint(source.image), "mask": str(source.mask) if source.mask else None,
                          "slices": len(found.slice_scores), "scan_score": found.scan_score})
            del found  # before the next scan's detection: one scan's maps in memory at a time
        if not progress.emit("step", step=i + 1, total_steps=len(sources), message=Path(source.image).name):
            raise Cancelled("calibration cancelled: the model card was not changed")
    if not scans:
        raise DataError(f"none of the {len(sources)} scan(s) could be used for calibration: " +
                        "; ".join(f"{s['path']}: {s['reason']}" for s in skipped))
    section = {
        **calibration_table(pixels.values, flag_rate),
        "n_foreground_pixels": pixels.seen,
        "pixel_sampling": {"method": "uniform random sample of the pooled foreground pixels (bottom-k random keys)",
                           "max_pixels": pixels.capacity, "seed": SEED},
        "slice_scores": score_distribution(slice_scores),
        "scan_scores": score_distribution(scan_scores) if len(scan_scores) >= MIN_SCANS_FOR_SCAN_SCORES else None,
        "min_scans_for_scan_scores": MIN_SCANS_FOR_SCAN_SCORES,
        "scorer": {"lpips": getattr(scorer.lpips, "pnet_type", None), "sigma": scorer.sigma},
        "scans": scans,
        "skipped": skipped,
        "command": list(command) if command else None,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    card = read_card(model_dir)
    card["calibration"] = section
    write_card(model_dir, card)
    progress.emit("done", step=len(sources), total_steps=len(sources),
                  message=f"calibrated on {len(scans)} scan(s), {pixels.seen} foreground pixels")
    return section
