"""Training of RA on normal slices: the two-step iteration, validation, checkpoints, exact resume, early stopping
and data-parallel training under `torchrun` (docs/METHOD.md, "Training").

Every random draw of an iteration (augmentation, z_p, the eps of each reparameterisation) comes from a generator
seeded with (seed, global step), and each rank draws the whole global batch's numbers and keeps its own share. So
a run resumed from any step, or split over N processes, draws exactly what one uninterrupted process would.

`TrainConfig.method` chooses what is trained: RA, or one of the baselines of the benchmark on the same network,
data, image size and iterations (`METHODS`). Validation, checkpoints, resume and detection (x_ph = D(mu)) are the
same for all.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ra_engine.core.errors import DataError, RAError
from ra_engine.core.progress import Progress
from ra_engine.network.config import ArchConfig
from ra_engine.network.model import ReversedAutoEncoder, set_batchnorm_mode
from ra_engine.runtime.distributed import ProcessGroup
from ra_engine.training.augment import augment, draw_acquisition, draw_params, simulate_acquisition
from ra_engine.training.checkpoint import (
    CHECKPOINT_FORMAT,
    load_checkpoint,
    save_checkpoint,
)
from ra_engine.training.config import (
    INTROSPECTIVE,
    RESUMABLE_CHANGES,
    LossWeights,
    TrainConfig,
)
from ra_engine.training.losses import (
    ae_step_loss,
    decoder_step_loss,
    encoder_step_loss,
    sse_per_sample,
    vae_step_loss,
)

log = logging.getLogger("ra_engine.train")


@dataclass
class TrainState:
    """Where a run stands; saved in every checkpoint. `seconds`: the wall time its iterations took so far, over all
    resumes (not part of what a run computes: states compare equal without it)."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    best_val: float = math.inf
    best_epoch: int = -1
    history: list = field(default_factory=list)
    seconds: float = field(default=0.0, compare=False)


@dataclass
class TrainResult:
    state: TrainState
    stopped_by: str  # "epochs", "early_stopping", "max_steps" or "cancelled"
    best_checkpoint: Path | None
    latest_checkpoint: Path


def step_generator(seed: int, step: int) -> torch.Generator:
    """The CPU generator of one iteration: a pure function of the seed and the global step."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def sharded_noise(generator: torch.Generator, shard: ProcessGroup):
    """Noise source for `reparameterize`: draws the global batch's eps and returns this rank's rows."""

    def draw(shape: torch.Size) -> torch.Tensor:
        full = torch.randn((shape[0] * shard.world, *shape[1:]), generator=generator)
        return full[shard.rows(shape[0])]

    return draw


def set_requires_grad(module: nn.Module, flag: bool) -> None:
    for p in module.parameters():
        p.requires_grad_(flag)


def train_iteration(model: ReversedAutoEncoder, opt_e: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                    x: torch.Tensor, z_p: torch.Tensor, weights: LossWeights, noise, amp: bool = False,
                    encoder_fwd: nn.Module | None = None, decoder_fwd: nn.Module | None = None) -> dict[str, float]:
    """One RA or "sivae" iteration: the encoder step (decoder frozen), then the decoder step (encoder frozen), same
    z and z_p.

    A frozen half has requires_grad off, so its weight gradients are never computed; gradients still pass through it.
    Each step backpropagates its two independent parts one after the other (see `encoder_step_loss`), which halves
    the memory that the graphs hold.
    `encoder_fwd`/`decoder_fwd` are DistributedDataParallel wrappers of the halves when training on several ranks.
    """
    encoder_fwd = encoder_fwd or model.encoder
    decoder_fwd = decoder_fwd or model.decoder
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp)

    set_requires_grad(model.decoder, False)
    set_requires_grad(model.encoder, True)
    opt_e.zero_grad(set_to_none=True)
    with autocast:
        _, terms_e, z = encoder_step_loss(encoder_fwd, model.decoder, x, z_p, weights, noise, _backward)
    opt_e.step()

    set_requires_grad(model.encoder, False)
    set_requires_grad(model.decoder, True)
    opt_d.zero_grad(set_to_none=True)
    with autocast:
        _, terms_d = decoder_step_loss(model.encoder, decoder_fwd, x, z, z_p, weights, noise, _backward)
    opt_d.step()
    set_requires_grad(model, True)
    return {k: float(v.detach()) for k, v in {**terms_e, **terms_d}.items()}


def _backward(loss: torch.Tensor) -> None:
    loss.backward()


def baseline_iteration(model: ReversedAutoEncoder, opt_e: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                       x: torch.Tensor, method: str, weights: LossWeights, noise, amp: bool = False,
                       encoder_fwd: nn.Module | None = None, decoder_fwd: nn.Module | None = None
                       ) -> dict[str, float]:
    """One iteration of the "vae" or "ae" baseline: one loss, one backward, both halves stepped.

    The two Adam optimisers hold disjoint halves with the same settings and step together, which is exactly one
    Adam over the whole network (Adam acts on each parameter alone); keeping two leaves checkpoints as RA's.
    """
    encoder_fwd = encoder_fwd or model.encoder
    decoder_fwd = decoder_fwd or model.decoder
    opt_e.zero_grad(set_to_none=True)
    opt_d.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=amp):
        if method == "vae":
            loss, terms = vae_step_loss(encoder_fwd, decoder_fwd, x, weights, noise)
        elif method == "ae":
            loss, terms = ae_step_loss(encoder_fwd, decoder_fwd, x, weights)
        else:
            raise ValueError(f"{method!r} is not a one-step baseline (vae, ae)")
    loss.backward()
    opt_e.step()
    opt_d.step()
    return {k: float(v.detach()) for k, v in terms.items()}


def build_model(arch: ArchConfig, config: TrainConfig, device: torch.device):
    """The network (initialised from the seed) and its two Adam optimisers."""
    torch.manual_seed(config.seed)
    model = ReversedAutoEncoder(arch).to(device)
    opt_e = torch.optim.Adam(model.encoder.parameters(), lr=config.lr)
    opt_d = torch.optim.Adam(model.decoder.parameters(), lr=config.lr)
    return model, opt_e, opt_d


@torch.inference_mode()
def validation_loss(model: ReversedAutoEncoder, images: np.ndarray, device: torch.device, batch_size: int = 32,
                    shard: ProcessGroup | None = None) -> float:
    """Mean squared error per pixel of the deterministic reconstruction D(mu(x)) over held-out slices (N, H, W)."""
    shard = shard or ProcessGroup.current()
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)
    indices = np.arange(shard.rank, len(images), shard.world)
    for i in range(0, len(indices), batch_size):
        x = torch.from_numpy(np.asarray(images[indices[i:i + batch_size]], dtype=np.float32)).unsqueeze(1).to(device)
        total[0] += sse_per_sample(x, model.reconstruct(x)).double().sum()
        total[1] += x[0].numel() * len(x)
    shard.sum_(total)
    model.train(was_training)
    return float(total[0] / total[1]) if total[1] > 0 else math.nan


# A network whose reconstructions keep less than this share of their inputs' brightness (or of their darkness) has
# collapsed onto one flat end of its output sigmoid.
COLLAPSE_RATIO = 0.01


@torch.inference_mode()
def reconstructions_saturated(model: ReversedAutoEncoder, images: np.ndarray, device: torch.device,
                              count: int = 8) -> bool:
    """True when D(mu(x)) of the first `count` slices of `images` (N, H, W) is all but black (its mean below
    COLLAPSE_RATIO times the inputs' mean) or all but white (the same for 1 - x): the network has collapsed onto
    its sigmoid's flat end, from which no gradient recovers. Relative to the inputs, so that nearly empty slices are
    not taken for a collapse; a freshly initialised network (about 0.5 everywhere) is not flagged."""
    if len(images) == 0:
        return False
    was_training = model.training
    model.eval()
    x = torch.from_numpy(np.asarray(images[:count], dtype=np.float32)).unsqueeze(1).to(device)
    y = model.reconstruct(x)
    model.train(was_training)
    black = float(y.mean()) < COLLAPSE_RATIO * float(x.mean())
    white = float((1 - y).mean()) < COLLAPSE_RATIO * float((1 - x).mean())
    return black or white


class Trainer:
    """Trains on `train_images` (N, H, W) float32 in [0, 1] (a memory map is fine), validates on `val_images`,
    and keeps `run_dir/checkpoints/{latest,best}.pt`. Only rank 0 writes files and progress."""

    def __init__(self, train_images: np.ndarray, val_images: np.ndarray, arch: ArchConfig, config: TrainConfig,
                 run_dir: Path, device: torch.device, progress: Progress | None = None, meta: dict | None = None):
        self.shard = ProcessGroup.current()
        # The gamma_r terms' tiny gradients leave denormal numbers in the decoder's Adam state; on x86 CPUs each
        # operation on them costs ~100x, which made small models 20x slower. Flushing them to zero changes nothing
        # measurable (they are below 1e-38) and keeps runs bitwise reproducible.
        torch.set_flush_denormal(True)
        if config.batch_size % self.shard.world:
            raise DataError(f"batch size {config.batch_size} does not split over {self.shard.world} processes: "
                            f"use a global batch size that is a multiple of the number of processes")
        if len(train_images) < config.batch_size:
            raise DataError(f"only {len(train_images)} training slices for a batch of {config.batch_size}: "
                            f"add normal scans or lower --batch-size")
        if train_images.shape[1:] != (arch.image_size, arch.image_size):
            raise DataError(f"training slices are {train_images.shape[1:]} but the model expects "
                            f"{arch.image_size}x{arch.image_size}: preprocess with the same --image-size")
        self.train_images, self.val_images = train_images, val_images
        self.arch, self.config, self.device = arch, config, device
        self.run_dir = Path(run_dir)
        self.checkpoint_dir = self.run_dir / "checkpoints"
        self.progress = progress or Progress()
        self.meta = meta or {}
        self.local_batch = config.batch_size // self.shard.world
        self.steps_per_epoch = len(train_images) // config.batch_size
        self.model, self.opt_e, self.opt_d = build_model(arch, config, device)
        if config.sync_batchnorm and config.batchnorm == "batch" and self.shard.distributed:
            self.model = nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
        self.state = TrainState()
        self.stop_requested = False

    @property
    def is_main(self) -> bool:
        return self.shard.rank == 0

    @property
    def latest_path(self) -> Path:
        return self.checkpoint_dir / "latest.pt"

    @property
    def best_path(self) -> Path:
        return self.checkpoint_dir / "best.pt"

    @property
    def total_steps(self) -> int:
        total = self.config.epochs * self.steps_per_epoch
        return min(total, self.config.max_steps) if self.config.max_steps is not None else total

    # -- checkpoints -------------------------------------------------------------------------------------------
    def checkpoint(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "model": self.model.state_dict(),
            "opt_e": self.opt_e.state_dict(),
            "opt_d": self.opt_d.state_dict(),
            "state": asdict(self.state),
            "arch": self.arch.to_dict(),
            "config": self.config.to_dict(),
            "meta": self.meta,
        }

    def save(self, path: Path) -> None:
        if self.is_main:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(self.checkpoint(), path)
            self.progress.emit("checkpoint", step=self.state.step, epoch=self.state.epoch, message=str(path))

    def resume(self) -> None:
        """Loads `latest.pt`; refuses a checkpoint whose architecture or step-changing options differ."""
        ckpt = load_checkpoint(self.latest_path, map_location=self.device)
        if ckpt.get("format") != CHECKPOINT_FORMAT:
            raise RAError(f"{self.latest_path} has checkpoint format {ckpt.get('format')}, expected {CHECKPOINT_FORMAT}")
        # Checkpoints from before `method` existed are RA's; options added since take their defaults.
        saved = TrainConfig.from_dict({"method": "ra", **ckpt["config"]}).to_dict()
        now = self.config.to_dict()
        changed = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
        differences = list(changed)
        if ckpt["arch"] != self.arch.to_dict():
            differences.append("architecture")
        if ckpt.get("meta", {}).get("data") != self.meta.get("data"):
            differences.append("training data")
        if differences:
            values = "; ".join(f"{k}: {saved.get(k)!r} in the checkpoint, {now[k]!r} now" for k in changed
                               if not isinstance(now[k], dict))
            raise RAError(f"cannot resume {self.latest_path}: {', '.join(differences)} differ from the checkpoint"
                          f"{f' ({values})' if values else ''}; resume with the same options, or start a new run "
                          f"with --overwrite")
        self.model.load_state_dict(ckpt["model"])
        self.opt_e.load_state_dict(ckpt["opt_e"])
        self.opt_d.load_state_dict(ckpt["opt_d"])
        self.state = TrainState(**ckpt["state"])

    # -- the loop ----------------------------------------------------------------------------------------------
    def _batch(self, perm: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
        rows = perm[k * self.config.batch_size:(k + 1) * self.config.batch_size][self.shard.rows(self.local_batch)]
        x = torch.from_numpy(np.asarray(self.train_images[rows.numpy()], dtype=np.float32)).unsqueeze(1)
        mine = self.shard.rows(self.local_batch)
        x = augment(x.to(self.device), draw_params(self.config.batch_size, self.config.augment, generator)[mine])
        acquisition = self.config.augment.acquisition
        if acquisition is not None:  # drawn after the affine's numbers: runs without it draw exactly as before
            params = draw_acquisition(self.config.batch_size, x.shape[-2:], acquisition, generator).rows(mine)
            x = simulate_acquisition(x, params)
        return x

    def _epoch_permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.train_images), generator=step_generator(self.config.seed, -1 - epoch))

    def fit(self) -> TrainResult:
        cfg, state = self.config, self.state
        encoder_fwd, decoder_fwd = self.model.encoder, self.model.decoder
        if self.shard.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            encoder_fwd = nn.parallel.DistributedDataParallel(self.model.encoder, device_ids=ids)
            decoder_fwd = nn.parallel.DistributedDataParallel(self.model.decoder, device_ids=ids)
        self.model.train()
        set_batchnorm_mode(self.model, cfg.batchnorm)
        if self.is_main:
            self.progress.emit("start", epoch=state.epoch, step=state.step, total_steps=self.total_steps,
                               message=f"training on {len(self.train_images)} slices, {self.steps_per_epoch} "
                                       f"steps per epoch, {self.shard.world} process(es)")
        started, start_step = time.perf_counter(), state.step
        stopped_by = None
        while stopped_by is None:
            if state.epoch >= cfg.epochs:
                stopped_by = "epochs"
                break
            perm = self._epoch_permutation(state.epoch)
            while stopped_by is None and state.step_in_epoch < self.steps_per_epoch:
                stopped_by = self._stop_reason()
                if stopped_by is None:
                    losses = self._step(perm, encoder_fwd, decoder_fwd)
                    if self.is_main:
                        eta = (time.perf_counter() - started) / (state.step - start_step) * (self.total_steps - state.step)
                        if not self.progress.emit("step", epoch=state.epoch, step=state.step,
                                                  total_steps=self.total_steps, losses=losses, eta_s=round(eta, 1)):
                            self.stop_requested = True
                    if cfg.checkpoint_every and state.step % cfg.checkpoint_every == 0:
                        self.save(self.latest_path)
            if stopped_by is None:
                state.epoch += 1
                state.step_in_epoch = 0
                if self._end_of_epoch():
                    stopped_by = "early_stopping"
        self.save(self.latest_path)
        if self.is_main:
            self.progress.emit("done", epoch=state.epoch, step=state.step, total_steps=self.total_steps,
                               val_loss=state.best_val if math.isfinite(state.best_val) else None,
                               message=f"stopped by {stopped_by}")
        best = self.best_path if self.best_path.exists() else None
        return TrainResult(state, stopped_by, best, self.latest_path)

    def _step(self, perm: torch.Tensor, encoder_fwd: nn.Module, decoder_fwd: nn.Module) -> dict[str, float]:
        cfg, state = self.config, self.state
        began = time.perf_counter()
        generator = step_generator(cfg.seed, state.step)
        x = self._batch(perm, state.step_in_epoch, generator)
        noise = sharded_noise(generator, self.shard)
        if cfg.method in INTROSPECTIVE:
            z_p = torch.randn(cfg.batch_size, self.arch.latent_dim, generator=generator)
            z_p = z_p[self.shard.rows(self.local_batch)]
            losses = train_iteration(self.model, self.opt_e, self.opt_d, x, z_p.to(self.device), cfg.weights, noise,
                                     cfg.amp, encoder_fwd, decoder_fwd)
        else:
            losses = baseline_iteration(self.model, self.opt_e, self.opt_d, x, cfg.method, cfg.weights, noise,
                                        cfg.amp, encoder_fwd, decoder_fwd)
        if not all(math.isfinite(v) for v in losses.values()):
            raise RAError(f"training diverged at step {state.step} (losses {losses}); the last good checkpoint is "
                          f"{self.latest_path}: resume from it with a lower --lr")
        state.step += 1
        state.step_in_epoch += 1
        state.seconds += time.perf_counter() - began
        return losses

    def _end_of_epoch(self) -> bool:
        """Validates, keeps the best checkpoint, reports; True when early stopping ends the run."""
        state = self.state
        val = validation_loss(self.model, self.val_images, self.device, shard=self.shard)
        collapsed = self.is_main and reconstructions_saturated(self.model, self.val_images, self.device)
        set_batchnorm_mode(self.model, self.config.batchnorm)
        state.history.append({"epoch": state.epoch, "step": state.step, "val_loss": val})
        if val < state.best_val:
            state.best_val, state.best_epoch = val, state.epoch
            self.save(self.best_path)
        self.save(self.latest_path)
        if self.is_main:
            log.info("epoch %d step %d val_loss %.6g (best %.6g at epoch %d)", state.epoch, state.step, val,
                     state.best_val, state.best_epoch)
            if not self.progress.emit("epoch", epoch=state.epoch, step=state.step, total_steps=self.total_steps,
                                      val_loss=val):
                self.stop_requested = True
            if collapsed:
                message = (f"the network has collapsed at epoch {state.epoch} (step {state.step}): its reconstructions "
                           "of the validation slices are all black (or all white), and training does not recover "
                           "from that. Stop it and train again with --overwrite --batchnorm batch (see the "
                           "BatchNorm note in docs/BENCHMARKS.md)")
                log.warning(message)
                if not self.progress.emit("warning", epoch=state.epoch, step=state.step, message=message):
                    self.stop_requested = True
        return state.epoch - state.best_epoch >= self.config.patience

    def _stop_reason(self) -> str | None:
        """"max_steps", "cancelled" or None; every rank stops at the same step when any was asked to (a signal or
        a cancelling callback on rank 0)."""
        if self.config.max_steps is not None and self.state.step >= self.config.max_steps:
            return "max_steps"
        flag = self.shard.any(self.stop_requested or self.progress.cancelled, self.device)
        return "cancelled" if flag else None

