"""What a training run is configured by (docs/METHOD.md, "Training"): the schedule and method (`TrainConfig`), the
loss weights (`LossWeights`) and the augmentation (`AugmentConfig`). The defaults are the paper's; the `ra train`
options take their defaults and choices from here. Torch-free, so that cards and the command line read it without
PyTorch."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ra_engine.core.resources import SEED
from ra_engine.network.config import BATCHNORM_MODES

# What `method` trains, in one line each (written into the model card).
METHODS = {
    "ra": "Reversed Auto-Encoder: Soft-IntroVAE's encoder and decoder steps plus the reversed embedding loss",
    "sivae": "Soft-IntroVAE baseline: RA's encoder and decoder steps without the reversed embedding loss (weight 0)",
    "vae": "plain VAE baseline: one step per iteration on s*(beta_rec*SSE(x, D(z)) + beta_kl*KL) over both halves",
    "ae": "plain auto-encoder baseline: one step per iteration on s*beta_rec*SSE(x, D(mu)); no sampling, no KL",
}
INTROSPECTIVE = ("ra", "sivae")  # the methods trained by RA's two-step iteration

# Which weights the model directory gets (`TrainConfig.select`): those of the epoch with the lowest validation
# reconstruction error of D(mu) (the paper's early stopping), or the last iteration's.
SELECTIONS = ("best", "last")

# Options that may differ when resuming: they change when or how a run stops, not what any step computes.
RESUMABLE_CHANGES = ("epochs", "patience", "max_steps", "checkpoint_every", "select")


@dataclass(frozen=True)
class LossWeights:
    """The paper's weights (docs/METHOD.md); `embedding` weighs the reversed embedding loss in the encoder step."""

    beta_rec: float = 0.5
    beta_kl: float = 1.0
    beta_neg: float = 128.0
    gamma_r: float = 1e-8
    exp_elbo: float = 0.25
    embedding: float = 0.005

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class AcquisitionConfig:
    """Augmentation that simulates other acquisitions without changing anatomy (docs/METHOD.md, "Training"): each
    effect is applied to an image with probability `p`. blur: a Gaussian blur along one image axis (y or x, chosen
    at random) with sigma up to `blur` pixels (thick slices of a scan in another plane, lower in-plane resolution);
    bias: a smooth multiplicative field exp(f), f a random polynomial of degree 3 over the image scaled to at most
    `bias` (coil sensitivity, the heel effect); gamma: intensities raised to exp(u), |u| <= `gamma` (contrast,
    windowing); noise: Gaussian noise of sigma up to `noise` on the foreground (x > 0), then clipped to [0, 1]."""

    p: float = 0.5
    blur: float = 1.5
    bias: float = 0.3
    gamma: float = 0.35
    noise: float = 0.03

    def __post_init__(self):
        if not 0 <= self.p <= 1 or min(self.blur, self.bias, self.gamma, self.noise) < 0:
            raise ValueError(f"acquisition augmentation needs 0 <= p <= 1 and non-negative strengths: {self}")


@dataclass(frozen=True)
class AugmentConfig:
    """The training augmentation: a random affine (rotation up to `rotation_deg` degrees, translation up to
    `translation` of the image size, scale in `scale`) and, with `flip`, a left-right flip with probability 0.5 (the
    paper's); `acquisition`: the simulation of other acquisitions (`AcquisitionConfig`; None, the paper's: none)."""

    rotation_deg: float = 10.0
    translation: float = 0.1
    scale: tuple[float, float] = (0.9, 1.1)
    flip: bool = True
    acquisition: AcquisitionConfig | None = None

    def to_dict(self) -> dict:
        return {**asdict(self), "scale": list(self.scale)}

    @classmethod
    def from_dict(cls, d: dict) -> AugmentConfig:
        acquisition = d.get("acquisition")
        return cls(**{**d, "scale": tuple(d.get("scale", cls.scale)),
                      "acquisition": None if acquisition is None else AcquisitionConfig(**acquisition)})


@dataclass(frozen=True)
class TrainConfig:
    """Training options; the defaults are the paper's schedule. `batch_size` is the global batch (all ranks).
    `method` is one of `METHODS`; "sivae" sets `weights.embedding` to 0, so the recorded weights are those used.
    `select` is one of `SELECTIONS`: which checkpoint the model directory is made from (it does not change training).
    `batchnorm` is one of `network.config.BATCHNORM_MODES`. `amp`: bfloat16 autocast (CUDA, and CPUs)."""

    method: str = "ra"
    epochs: int = 1500
    batch_size: int = 8
    lr: float = 5e-5
    seed: int = SEED
    patience: int = 500
    batchnorm: str = "reference"
    sync_batchnorm: bool = False
    amp: bool = False
    max_steps: int | None = None
    checkpoint_every: int = 500
    select: str = "best"
    weights: LossWeights = field(default_factory=LossWeights)
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown training method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.select not in SELECTIONS:
            raise ValueError(f"unknown weight selection {self.select!r}: use one of {', '.join(SELECTIONS)}")
        if self.batchnorm not in BATCHNORM_MODES:
            raise ValueError(f"unknown BatchNorm mode {self.batchnorm!r}: use one of {', '.join(BATCHNORM_MODES)}")
        if self.method == "sivae":
            object.__setattr__(self, "weights", replace(self.weights, embedding=0.0))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["weights"] = self.weights.to_dict()
        d["augment"] = self.augment.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        d["weights"] = LossWeights(**d.get("weights", {}))
        d["augment"] = AugmentConfig.from_dict(d.get("augment", {}))
        return cls(**d)
