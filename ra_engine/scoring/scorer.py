"""The RA anomaly score of 2D slices (docs/METHOD.md, "Inference and anomaly score"), batched.

For an image x and its pseudo-healthy reconstruction x_ph, both clamped to [0, 1]:
  S1 = blur(LPIPS(x, x_ph)),  S2 = blur(LPIPS(CLAHE(x), CLAHE(x_ph))),  A = |CLAHE(x_ph) - CLAHE(x)| * S1 * S2,
with spatial LPIPS (grey replicated to 3 channels, [0, 1] mapped to [-1, 1]), skimage's CLAHE with its defaults, and
a Gaussian blur of sigma 2 pixels with reflecting borders. LPIPS runs on the whole batch at once (both pairs in one
pass); CLAHE runs batched on the scorer's device (`clahe.clahe_torch`, equal to skimage's on the CPU).

Score kinds (`SCORE_KINDS`): "full" is A above (the default, the method); "l1" is the plain reconstruction error
|x - x_ph| of the clamped images, without CLAHE, LPIPS or blur, for the ablation "L1 only vs the full score". Both
are masked, mapped back and thresholded the same way by detection.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ra_engine.core.errors import DataError
from ra_engine.core.resources import LPIPS_BACKBONE
from ra_engine.scoring.clahe import clahe_torch
from ra_engine.scoring.kinds import IMAGE_SCORES, SCORE_KINDS
from ra_engine.scoring.lpips_weights import load_lpips

@dataclass(frozen=True)
class ScoreMaps:
    """Maps of a batch of slices, each numpy float32 (N, H, W), axes (slice, y, x) of the model's image grid.

    anomaly: the anomaly map (>= 0) of the scorer's kind (A for "full"); s1, s2: the blurred LPIPS maps of the
    images and of their CLAHE versions; clahe_x, clahe_ph: CLAHE of the input and of its reconstruction, in [0, 1].
    The "l1" kind computes none of these four (None)."""
    anomaly: np.ndarray
    s1: np.ndarray | None
    s2: np.ndarray | None
    clahe_x: np.ndarray | None
    clahe_ph: np.ndarray | None


def gaussian_kernel1d(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """The normalised 1D Gaussian that scipy.ndimage.gaussian_filter (and skimage.filters.gaussian) use: radius
    int(truncate * sigma + 0.5), float64."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    phi = np.exp(-0.5 * x**2 / sigma**2)
    return phi / phi.sum()


def _reflect_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Source indices of a line of length n padded by radius on both sides, half-sample symmetric (scipy's
    "reflect": d c b a | a b c d | d c b a), valid for any radius."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i >= n, 2 * n - 1 - i, i)


def gaussian_blur(maps: torch.Tensor, sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """Gaussian blur of (N, C, H, W) maps over (H, W), each channel separately, with reflecting borders; equals
    `skimage.filters.gaussian(map, sigma, mode="reflect", preserve_range=True)` (scipy's kernel and borders)."""
    if sigma <= 0:
        return maps
    kernel = torch.as_tensor(gaussian_kernel1d(sigma, truncate), dtype=maps.dtype, device=maps.device)
    radius = (len(kernel) - 1) // 2
    n, c, h, w = maps.shape
    out = maps.reshape(n * c, 1, h, w)
    out = out.index_select(3, _reflect_index(w, radius, maps.device))
    out = F.conv2d(out, kernel.view(1, 1, 1, -1))
    out = out.index_select(2, _reflect_index(h, radius, maps.device))
    out = F.conv2d(out, kernel.view(1, 1, -1, 1))
    return out.reshape(n, c, h, w)


class AnomalyScorer:
    """Scores batches of slices against their reconstructions with an `lpips.LPIPS` network built with
    spatial=True (see `ra_engine.lpips_weights.load_lpips`). sigma: blur in pixels of the model's grid.
    kind: one of `SCORE_KINDS`; "l1" needs no LPIPS network (None) and then runs on `device`."""

    def __init__(self, lpips_model: torch.nn.Module | None, sigma: float = 2.0, kind: str = "full",
                 device: str | torch.device = "cpu"):
        if kind not in SCORE_KINDS:
            raise DataError(f"unknown score kind {kind!r}: choose one of {', '.join(SCORE_KINDS)}")
        if kind == "full" and not getattr(lpips_model, "spatial", False):
            raise ValueError("the anomaly score needs spatial LPIPS maps: build the network with spatial=True")
        self.lpips = None if lpips_model is None else lpips_model.eval()
        self.sigma = float(sigma)
        self.kind = kind
        self._device = torch.device(device)

    @property
    def device(self) -> torch.device:
        return self._device if self.lpips is None else next(self.lpips.parameters()).device

    def _lpips(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Spatial LPIPS of grey (N, 1, H, W) images in [0, 1]: (N, 1, H, W)."""
        return self.lpips(a.expand(-1, 3, -1, -1), b.expand(-1, 3, -1, -1), normalize=True)

    def score(self, x: torch.Tensor, x_ph: torch.Tensor) -> ScoreMaps:
        """x, x_ph: (N, 1, H, W) images and their pseudo-healthy reconstructions, intensities in [0, 1] (clamped
        here), on any device. Returns the maps of docs/METHOD.md (of the scorer's kind) as numpy float32 (N, H, W)."""
        if x.ndim != 4 or x.shape[1] != 1 or x.shape != x_ph.shape:
            raise DataError(f"the scorer takes two (N, 1, H, W) batches of the same shape; got {tuple(x.shape)} "
                            f"and {tuple(x_ph.shape)}")
        n = x.shape[0]
        with torch.inference_mode():
            x = x.detach().to(self.device, torch.float32).clamp(0, 1)
            x_ph = x_ph.detach().to(self.device, torch.float32).clamp(0, 1)
            if self.kind == "l1":
                anomaly = (x - x_ph).abs()[:, 0].cpu().numpy()
                return ScoreMaps(anomaly=anomaly, s1=None, s2=None, clahe_x=None, clahe_ph=None)
            # CLAHE of both batches in one call, on the scorer's device (equal to skimage's, see clahe.py).
            c_x, c_ph = clahe_torch(torch.cat([x, x_ph])[:, 0])[:, None].split(n)
            # One LPIPS pass for both pairs: (x, x_ph) gives S1, (CLAHE(x), CLAHE(x_ph)) gives S2.
            maps = gaussian_blur(self._lpips(torch.cat([x, c_x]), torch.cat([x_ph, c_ph])), self.sigma)
            s1, s2 = maps[:n, 0], maps[n:, 0]
            anomaly = (c_ph - c_x)[:, 0].abs() * s1 * s2
            as_numpy = lambda t: t.cpu().numpy()
            return ScoreMaps(anomaly=as_numpy(anomaly), s1=as_numpy(s1), s2=as_numpy(s2),
                             clahe_x=as_numpy(c_x[:, 0]), clahe_ph=as_numpy(c_ph[:, 0]))


def image_score(anomaly: np.ndarray, mask: np.ndarray | None = None) -> float:
    """The image-level anomaly score: the mean of the anomaly map inside the body/brain mask (the whole map without
    one). anomaly: any shape, e.g. (H, W) for a slice or (N, H, W) for a scan; mask: boolean, same shape."""
    anomaly = np.asarray(anomaly)
    if mask is None:
        return float(anomaly.mean(dtype=np.float64))
    mask = np.asarray(mask, dtype=bool)
    if mask.shape != anomaly.shape:
        raise DataError(f"the mask's shape {mask.shape} differs from the anomaly map's {anomaly.shape}")
    if not mask.any():
        raise DataError("the mask is empty: there is no body/brain to score")
    return float(anomaly[mask].mean(dtype=np.float64))


def score_map(kind: str, anomaly: np.ndarray, images: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """The map whose mean inside the mask is the image score `kind` (one of `IMAGE_SCORES`): A itself, or the
    model-space reconstruction error |x - x_ph| or (x - x_ph)^2; arrays of one shape, e.g. (N, H, W)."""
    if kind == "mean_a":
        return anomaly
    if kind == "l1":
        return np.abs(images - reconstructions)
    if kind == "mse":
        return np.square(images - reconstructions)
    raise DataError(f"unknown image score {kind!r}: choose one of {', '.join(IMAGE_SCORES)}")


def build_scorer(backbone: str = LPIPS_BACKBONE, kind: str = "full", device: str | torch.device = "cpu"
                 ) -> AnomalyScorer:
    """The scorer of `kind` (one of `SCORE_KINDS`) on `device`: the full score with the LPIPS `backbone` (weights
    found offline, `lpips_weights.load_lpips`), or the L1 score, which needs no LPIPS network."""
    if kind not in SCORE_KINDS:
        raise DataError(f"unknown score kind {kind!r}: choose one of {', '.join(SCORE_KINDS)}")
    if kind == "l1":
        return AnomalyScorer(None, kind=kind, device=device)
    return AnomalyScorer(load_lpips(backbone, device=device))
