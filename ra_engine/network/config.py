"""The configuration of the RA network (docs/METHOD.md, "Network"); torch-free, so that model cards and the
command line read it without PyTorch."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

PAPER_WIDTHS = (64, 128, 256, 512, 512)
# How BatchNorm trains: "reference", every BatchNorm in eval mode with its running statistics untouched (a learned
# scale and shift, as the published results were trained); "batch", batch statistics.
BATCHNORM_MODES = ("reference", "batch")


@dataclass(frozen=True)
class ArchConfig:
    """Constructor arguments of `ReversedAutoEncoder`; the defaults are the paper configuration."""

    in_channels: int = 1
    image_size: int = 128
    latent_dim: int = 128
    widths: tuple[int, ...] = field(default=PAPER_WIDTHS)

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if self.image_size % (2 ** len(self.widths)):
            raise ValueError(
                f"image_size {self.image_size} is not divisible by 2^{len(self.widths)}: the encoder halves the size "
                f"once per width; choose an image size that is a multiple of {2 ** len(self.widths)} or other widths"
            )

    @property
    def bottleneck(self) -> int:
        return self.image_size // 2 ** len(self.widths)

    def to_dict(self) -> dict:
        return {**asdict(self), "widths": list(self.widths)}

    @classmethod
    def from_dict(cls, d: dict) -> "ArchConfig":
        return cls(**{k: d[k] for k in ("in_channels", "image_size", "latent_dim", "widths") if k in d})
