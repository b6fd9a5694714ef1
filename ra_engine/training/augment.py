"""Training augmentation (docs/METHOD.md, "Training"): random affine (rotation, translation, scale; bilinear, filled
with the background value) and an optional horizontal flip. Batched on the training device, with parameters drawn
from a given generator so that a run resumes exactly and several ranks can draw one global batch's parameters.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ra_engine.training.config import AugmentConfig


def draw_params(n: int, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """(n, 5) float64 parameters per image: angle (rad), tx and ty (fractions of the image size), scale, flip (0/1).
    Drawn on the CPU so that every device and rank draws the same numbers."""
    u = torch.rand(n, 5, generator=generator, dtype=torch.float64)
    angle = (2 * u[:, 0] - 1) * math.radians(config.rotation_deg)
    tx = (2 * u[:, 1] - 1) * config.translation
    ty = (2 * u[:, 2] - 1) * config.translation
    scale = config.scale[0] + u[:, 3] * (config.scale[1] - config.scale[0])
    flip = (u[:, 4] < 0.5).double() if config.flip else torch.zeros(n, dtype=torch.float64)
    return torch.stack([angle, tx, ty, scale, flip], dim=1)


def augment(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Applies `draw_params` parameters to images x (N, C, H, W): rotate by angle, scale, translate by (tx, ty) times
    the image size, then flip left-right where flip = 1. Pixels from outside are filled with each image's minimum."""
    n = x.shape[0]
    p = params.to(device=x.device, dtype=torch.float32)
    angle, tx, ty, scale, flip = p.unbind(1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # affine_grid maps output coordinates (in [-1, 1]) to input coordinates: the inverse of the forward transform.
    theta = torch.zeros(n, 2, 3, device=x.device)
    theta[:, 0, 0], theta[:, 0, 1] = cos, sin
    theta[:, 1, 0], theta[:, 1, 1] = -sin, cos
    shift = torch.stack([tx, ty], dim=1) * 2.0  # a translation of t * size is 2t in grid units
    theta[:, :, 2] = -(theta[:, :, :2] @ shift.unsqueeze(-1)).squeeze(-1)
    sign = 1.0 - 2.0 * flip  # flipping the output's x axis
    theta[:, :, 0] = theta[:, :, 0] * sign.unsqueeze(1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    background = x.flatten(1).amin(1).view(n, 1, 1, 1)
    return F.grid_sample(x - background, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + background
