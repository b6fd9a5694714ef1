"""Detection thresholds calibrated on normal data (SPEC-RA.md): a table of quantiles of the anomaly map A over the
pooled brain/body pixels of normal scans, so that any flag rate (the share of normal pixels that would be flagged)
maps to a threshold; a pixel is flagged when A >= threshold."""
from __future__ import annotations

import numpy as np

from .errors import DataError

# Flag rates from 0.1% to 20% (the range of the Slicer slider and --flag-rate), densely enough to interpolate.
FLAG_RATES = tuple(float(r) for r in np.round(np.geomspace(0.001, 0.2, 41), 6))
DEFAULT_FLAG_RATE = 0.05


def calibration_table(normal_values: np.ndarray) -> dict:
    """normal_values: A at the foreground pixels of held-out normal scans (any shape, flattened). Returns the
    JSON-able table {"flag_rates", "thresholds", "n_pixels", "default_flag_rate"} for the model card."""
    values = np.asarray(normal_values, dtype=np.float64).ravel()
    if values.size < 1000:
        raise DataError(f"only {values.size} normal foreground pixels to calibrate on: give more normal scans")
    thresholds = np.quantile(values, 1.0 - np.asarray(FLAG_RATES))
    return {"flag_rates": list(FLAG_RATES), "thresholds": [float(t) for t in thresholds], "n_pixels": int(values.size),
            "default_flag_rate": DEFAULT_FLAG_RATE}


def threshold_for(table: dict, flag_rate: float | None = None) -> float:
    """The anomaly-map threshold that flags `flag_rate` of normal foreground pixels (the table's default when None),
    interpolated linearly in log flag rate between the table's entries."""
    rate = table["default_flag_rate"] if flag_rate is None else float(flag_rate)
    rates = np.asarray(table["flag_rates"])
    if not rates[0] <= rate <= rates[-1]:
        raise DataError(f"flag rate {rate:g} is outside the calibrated range {rates[0]:g} to {rates[-1]:g}")
    # thresholds fall as the rate grows; np.interp needs increasing x, which log(rate) is.
    return float(np.interp(np.log(rate), np.log(rates), np.asarray(table["thresholds"])))
