"""Training augmentation (docs/METHOD.md, "Training"): random affine (rotation, translation, scale; bilinear, filled
with the background value) and an optional horizontal flip; optionally the simulation of other acquisitions (blur
along one axis, bias field, gamma, noise), which changes how a scan looks, not its anatomy. Batched on the training
device, with parameters drawn from a given generator so that a run resumes exactly and several ranks can draw one
global batch's parameters.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from ra_engine.training.config import AcquisitionConfig, AugmentConfig


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


@dataclass(frozen=True)
class AcquisitionParams:
    """Per-image parameters of `simulate_acquisition` for a batch of n images of H x W, drawn by
    `draw_acquisition` (CPU, float64): blur sigma (pixels, 0 = none) and axis (0: along y, 1: along x); bias field
    coefficients (n, 10) of a degree-3 polynomial in (y, x) in [-1, 1] (zero = none); gamma exponent (1 = none);
    noise sigma (0 = none) and the noise itself (n, H, W)."""

    blur_sigma: torch.Tensor
    blur_axis: torch.Tensor
    bias: torch.Tensor
    gamma: torch.Tensor
    noise_sigma: torch.Tensor
    noise: torch.Tensor

    def rows(self, rows: slice) -> AcquisitionParams:
        return AcquisitionParams(*(getattr(self, f.name)[rows] for f in fields(self)))


_BIAS_TERMS = [(i, j) for i in range(4) for j in range(4 - i)]  # y^i x^j, degree <= 3: 10 terms


def draw_acquisition(n: int, size: tuple[int, int], config: AcquisitionConfig,
                     generator: torch.Generator) -> AcquisitionParams:
    """The parameters of n images' simulated acquisition, from `generator` on the CPU (every rank and device draws
    the same numbers): each effect applied with probability config.p, its strength uniform up to the config's."""
    u = torch.rand(n, 8, generator=generator, dtype=torch.float64)
    on = u[:, :4] < config.p
    blur_sigma = torch.where(on[:, 0], u[:, 4] * config.blur, 0.0)
    blur_axis = (u[:, 5] < 0.5).to(torch.int64)
    coefficients = torch.rand(n, len(_BIAS_TERMS), generator=generator, dtype=torch.float64) * 2 - 1
    bias = coefficients * on[:, 1:2] * config.bias / len(_BIAS_TERMS) ** 0.5
    gamma = torch.where(on[:, 2], torch.exp((2 * u[:, 6] - 1) * config.gamma), 1.0)
    noise_sigma = torch.where(on[:, 3], u[:, 7] * config.noise, 0.0)
    noise = torch.randn(n, *size, generator=generator)
    return AcquisitionParams(blur_sigma, blur_axis, bias, gamma, noise_sigma, noise)


def simulate_acquisition(x: torch.Tensor, params: AcquisitionParams) -> torch.Tensor:
    """Applies `draw_acquisition` parameters to images x (N, 1, H, W) in [0, 1] with background 0: blur along one
    axis, bias field, gamma, noise on the foreground; the result is clipped to [0, 1] and keeps the background (a
    pixel that was 0 stays 0 unless blur spreads the foreground into it)."""
    n, _, h, w = x.shape
    device = x.device
    foreground = x > 0
    sigma = params.blur_sigma.to(device, torch.float32)
    if bool((sigma > 0).any()):
        radius = max(1, int(3 * float(sigma.max()) + 0.5))
        offsets = torch.arange(-radius, radius + 1, device=device, dtype=torch.float32)
        kernels = torch.exp(-0.5 * (offsets[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
        kernels = torch.where(sigma[:, None] > 0, kernels, (offsets[None] == 0).float())
        kernels = kernels / kernels.sum(1, keepdim=True)
        along_y = params.blur_axis.to(device) == 0
        for axis_is_y, shape in ((True, (n, 1, -1, 1)), (False, (n, 1, 1, -1))):
            chosen = torch.where((along_y == axis_is_y)[:, None], kernels, (offsets[None] == 0).float())
            padding = (0, 0, radius, radius) if axis_is_y else (radius, radius, 0, 0)
            x = F.conv2d(F.pad(x.reshape(1, n, h, w), padding, mode="reflect"), chosen.view(shape), groups=n)
            x = x.reshape(n, 1, h, w)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, device=device), torch.linspace(-1, 1, w, device=device),
                            indexing="ij")
    basis = torch.stack([yy**i * xx**j for i, j in _BIAS_TERMS])  # (10, H, W)
    field = torch.exp(torch.einsum("nk,khw->nhw", params.bias.to(device, torch.float32), basis))[:, None]
    x = x.clamp(0, 1) * field
    x = x.clamp(0, 1) ** params.gamma.to(device, torch.float32).view(n, 1, 1, 1)
    noise = params.noise.to(device, torch.float32)[:, None] * params.noise_sigma.to(device, torch.float32).view(n, 1, 1, 1)
    x = torch.where(foreground | (x > 0), x + noise, x)
    return x.clamp(0, 1)
