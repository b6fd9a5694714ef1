"""Detection on one scan: model-space slices -> pseudo-healthy reconstruction (D(mu), batched, inference mode) ->
anomaly map (`scoring`) -> results mapped back onto the scan's own grid, geometry kept."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from .errors import Cancelled, DataError
from .image import Image
from .imageio import validate_image
from .modeldir import RAModel
from .preprocess import PresetConfig, SliceSet, preprocess
from .scoring import AnomalyScorer, image_score


@dataclass
class Detection:
    """Results on the input's grid (arrays (z, y, x) or (y, x), the input's geometry).

    pseudo_healthy: the reconstruction in the scan's intensity units; anomaly: A (float32, 0 outside the brain/body
    and the model space); mask: the brain/body mask (uint8). slice_scores: per model slice with foreground, its
    position in the model-space stack and its score (mean A in its mask); scan_score: mean A in the whole mask.
    `slices` and `anomaly_stack` keep the model-space results for calibration and evaluation."""

    pseudo_healthy: Image
    anomaly: Image
    mask: Image
    slice_scores: list[dict]
    scan_score: float
    slices: SliceSet
    anomaly_stack: np.ndarray

    def detections_at(self, threshold: float) -> Image:
        """Label map (uint8, 1 = flagged) of the pixels with A >= threshold inside the mask, on the input grid."""
        flagged = (self.anomaly.array >= threshold) & (self.mask.array > 0)
        return Image(flagged.astype(np.uint8), self.anomaly.geometry, self.anomaly.source)


def detect(model: RAModel, image: Image, scorer: AnomalyScorer, mask: Image | None = None, batch_size: int = 32,
           progress: Callable[[int, int], bool | None] | None = None) -> Detection:
    """Runs the model on every slice of `image` that holds brain/body, in batches of `batch_size`.
    `progress(done, total)` is called after each batch; returning False cancels (raises `Cancelled`)."""
    validate_image(image)
    preset = PresetConfig.from_dict(model.card["preset"])
    slices = preprocess(image, preset, mask)
    used = np.flatnonzero(slices.masks.reshape(len(slices), -1).any(1))
    if used.size == 0:
        raise DataError("no slice of the scan holds brain/body in the model space: check the modality and preset")
    x_ph = np.zeros_like(slices.images)
    anomaly = np.zeros_like(slices.images)
    for start in range(0, used.size, batch_size):
        rows = used[start:start + batch_size]
        x = torch.from_numpy(slices.images[rows]).unsqueeze(1).to(model.device)
        with torch.inference_mode():
            rec = model.network.reconstruct(x)
        maps = scorer.score(x, rec)
        x_ph[rows] = rec[:, 0].float().cpu().numpy()
        anomaly[rows] = maps.anomaly * slices.masks[rows]
        if progress is not None and progress(min(start + batch_size, used.size), used.size) is False:
            raise Cancelled("detection cancelled")
    space, geometry = slices.space, image.geometry
    # A one-slice radiograph comes back as (y, x) even if it was read as (1, y, x): keep the input's shape.
    reshape = lambda a: a.reshape(image.array.shape)
    anomaly_in = reshape(space.to_input_grid(anomaly, "linear", positions=slices.positions))
    ph_in = reshape(space.to_input_intensity(space.to_input_grid(x_ph, "linear", positions=slices.positions)))
    mask_in = reshape(space.to_input_grid(slices.masks.astype(np.uint8), "nearest", positions=slices.positions))
    slice_scores = [{"position": int(slices.positions[i]), "score": image_score(anomaly[i], slices.masks[i])}
                    for i in used]
    return Detection(Image(ph_in, geometry, image.source), Image(anomaly_in, geometry, image.source),
                     Image(mask_in, geometry, image.source), slice_scores,
                     image_score(anomaly[used], slices.masks[used]), slices, anomaly)
