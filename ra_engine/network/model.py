"""The Reversed Auto-Encoder network (docs/METHOD.md, "Network"): a residual VAE encoder that also exposes its five
multi-scale embeddings, and a residual decoder. Knows nothing of losses, optimisers or files.

Images are tensors (N, C, H, W) with values in [0, 1]; the decoder ends in a sigmoid.
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
from torch import nn

from ra_engine.network.config import BATCHNORM_MODES, ArchConfig


class ResidualBlock(nn.Module):
    """conv3x3-BN-LeakyReLU-conv3x3-BN, plus the skip (1x1 conv in transition blocks), then LeakyReLU(0.2)."""

    def __init__(self, in_channels: int, out_channels: int, skip_conv: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False) if skip_conv else nn.Identity()
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(y + self.skip(x))


class Encoder(nn.Module):
    """x -> (mu, logvar, embeddings): the embeddings are the outputs of the stem's and each stage's AvgPool
    (64@64, 128@32, 256@16, 512@8, 512@4 in the paper configuration)."""

    def __init__(self, config: ArchConfig):
        super().__init__()
        w = config.widths
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, w[0], 5, padding=2, bias=False),
            nn.BatchNorm2d(w[0]),
            nn.LeakyReLU(0.2, inplace=True),
            nn.AvgPool2d(2),
        )
        # Every stage steps from one listed width to the next and carries a 1x1 skip conv, equal widths included.
        self.stages = nn.ModuleList(
            nn.Sequential(ResidualBlock(w[i], w[i + 1], skip_conv=True), nn.AvgPool2d(2)) for i in range(len(w) - 1)
        )
        self.head_block = ResidualBlock(w[-1], w[-1], skip_conv=False)
        self.fc = nn.Linear(w[-1] * config.bottleneck**2, 2 * config.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        h = self.stem(x)
        embeddings = [h]
        for stage in self.stages:
            h = stage(h)
            embeddings.append(h)
        mu, logvar = self.fc(self.head_block(h).flatten(1)).chunk(2, dim=1)
        return mu, logvar, embeddings


class Decoder(nn.Module):
    """z (N, latent_dim) -> image (N, C, H, W) in [0, 1]."""

    def __init__(self, config: ArchConfig):
        super().__init__()
        w = config.widths[::-1]
        self.bottleneck = config.bottleneck
        self.top_width = w[0]
        self.fc = nn.Sequential(nn.Linear(config.latent_dim, w[0] * config.bottleneck**2), nn.ReLU())
        blocks = [ResidualBlock(w[0], w[0], skip_conv=False), nn.Upsample(scale_factor=2, mode="nearest")]
        for i in range(len(w) - 1):
            blocks += [ResidualBlock(w[i], w[i + 1], skip_conv=True), nn.Upsample(scale_factor=2, mode="nearest")]
        blocks += [ResidualBlock(w[-1], w[-1], skip_conv=False), nn.Conv2d(w[-1], config.in_channels, 5, padding=2)]
        self.main = nn.Sequential(*blocks)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).view(-1, self.top_width, self.bottleneck, self.bottleneck)
        return torch.sigmoid(self.main(h))


class ReversedAutoEncoder(nn.Module):
    """Encoder + decoder of RA (a Soft-IntroVAE). `reconstruct` is the deterministic pseudo-healthy x_ph = D(mu(x))."""

    def __init__(self, config: ArchConfig | None = None):
        super().__init__()
        self.config = config or ArchConfig()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        mu, _, _ = self.encoder(x)
        return self.decoder(mu)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)


Noise = Callable[[torch.Size], torch.Tensor]
"""Draws standard normal noise of a given shape; training passes a seeded source so that runs resume exactly."""


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, noise: Noise | None = None) -> torch.Tensor:
    """z = mu + sigma * eps with eps ~ N(0, I) from `noise` (torch's global generator when None)."""
    eps = noise(mu.shape).to(device=mu.device, dtype=mu.dtype) if noise is not None else torch.randn_like(mu)
    return mu + torch.exp(0.5 * logvar) * eps


def set_batchnorm_mode(model: nn.Module, mode: str) -> None:
    """mode "reference": every BatchNorm in eval mode with running stats untouched (a learned scale and shift, as
    the reference trained); "batch": BatchNorm uses batch statistics in training. Call after `model.train()`."""
    if mode not in BATCHNORM_MODES:
        raise ValueError(f"unknown BatchNorm mode {mode!r}: use one of {', '.join(BATCHNORM_MODES)}")
    if mode == "reference":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def inference_copy(model: ReversedAutoEncoder) -> ReversedAutoEncoder:
    """A copy for inference only: each BatchNorm folded into the convolution before it (exact in eval mode) and
    the weights in channels-last layout. Same reconstructions to float rounding (tested), about 25% faster on a
    CPU; feed it channels-last inputs (`x.contiguous(memory_format=torch.channels_last)`)."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    fused = copy.deepcopy(model).eval()
    for block in fused.modules():
        if isinstance(block, ResidualBlock):
            block.conv1, block.bn1 = fuse_conv_bn_eval(block.conv1, block.bn1), nn.Identity()
            block.conv2, block.bn2 = fuse_conv_bn_eval(block.conv2, block.bn2), nn.Identity()
    stem = fused.encoder.stem
    stem[0], stem[1] = fuse_conv_bn_eval(stem[0], stem[1]), nn.Identity()
    for p in fused.parameters():
        p.requires_grad_(False)
    return fused.to(memory_format=torch.channels_last)
