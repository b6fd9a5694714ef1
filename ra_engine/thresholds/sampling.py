"""A bounded uniform sample of the pooled normal foreground pixels, from which the calibration table is made."""
from __future__ import annotations

import numpy as np

from ra_engine.core.resources import SEED

# At most this many pixel values are kept for the quantile table (see `PixelSample` for the accuracy it gives).
MAX_PIXELS = 2_000_000


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
