"""Model directories (docs/ARCHITECTURE.md, "Contracts"): `model.safetensors` (weights, loaded without unpickling) and
`model.json` (the model card, `models.card`). The card carries everything needed to rebuild the network, preprocess
exactly as in training, score, and reproduce the model; the sha256 of the weights guards against corrupt or tampered
files."""
from __future__ import annotations

import datetime as _dt
import functools
import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ra_engine.core.errors import ModelError
from ra_engine.core.files import atomic_write, sha256_of
from ra_engine.core.resources import VERSION
from ra_engine.models.card import (
    WEIGHTS_FILE,
    ModelCard,
    card_notice,
    read_card,
    write_card,
)
from ra_engine.models.registry import resolve_model
from ra_engine.network.config import ArchConfig
from ra_engine.network.model import ReversedAutoEncoder, inference_copy


def save_model_dir(directory: Path, state_dict: dict[str, torch.Tensor], card: ModelCard,
                   float16: bool = False) -> ModelCard:
    """Writes weights and card into `directory` (created); returns the card as written. The caller's card gives the
    name, method, preset, architecture, training record and calibration; the parameter count, checksum, software
    versions, notice and date are filled in here. `float16`: store floating-point weights in half precision (half
    the size; `load_model` computes in float32 all the same)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    if float16:
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    written = []

    def write(temporary: Path) -> None:
        # The new card goes into place only once the new weights are complete on disk, and the weights right after
        # it (a rename needs no space): a full disk or a failed write leaves the previous model whole.
        save_file(weights, str(temporary))
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        full = replace(card, parameters=sum(v.numel() for k, v in weights.items() if not _is_buffer(k)),
                       weights_sha256=sha256_of(temporary),
                       software={"ra_engine": VERSION, "torch": torch.__version__},
                       created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       notice=card_notice(card.method))
        write_card(directory, full)
        written.append(full)

    atomic_write(directory / WEIGHTS_FILE, write)
    return written[0]


def _is_buffer(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


@dataclass
class RAModel:
    """A loaded model: the network in eval mode on `device`, and its card. `amp`: detection runs the network under
    bfloat16 autocast (faster on GPUs and on CPUs with AVX512-BF16 or AMX; the maps differ slightly, see
    docs/BENCHMARKS.md); the scorer always works in float32."""

    network: ReversedAutoEncoder
    card: ModelCard
    path: Path
    device: torch.device
    amp: bool = False

    @property
    def arch(self) -> ArchConfig:
        return self.network.config

    @functools.cached_property
    def inference_network(self) -> ReversedAutoEncoder:
        """`network` with BatchNorm folded and channels-last weights (`network.model.inference_copy`), built on
        first use."""
        return inference_copy(self.network)


def _check_weights_fit(weights_path: Path, arch: ArchConfig) -> None:
    """ModelError unless `weights_path` is a safetensors file (read without unpickling anything) holding exactly the
    tensors, by name and shape, of the network that `arch` describes. Checked on the file's header and a network
    without storage (PyTorch's meta device), before any memory is allocated for either."""
    try:
        with torch.device("meta"):
            expected = {k: tuple(v.shape) for k, v in ReversedAutoEncoder(arch).state_dict().items()}
    except Exception as exc:  # the card's numbers do not make a network
        raise ModelError(f"the architecture in the card of {weights_path.parent} cannot be built ({arch}: "
                         f"{type(exc).__name__}: {exc}): the card is damaged; get the model again") from exc
    try:
        with safe_open(str(weights_path), framework="pt") as f:
            stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelError(f"{weights_path} is not a safetensors weights file ({exc}): the file is damaged, or it is "
                         f"another format (a pickle is never loaded); get the model again") from exc
    wrong = sorted(k for k in expected.keys() | stored.keys() if expected.get(k) != stored.get(k))
    if wrong:
        listed = ", ".join(f"{k}: {stored.get(k, 'missing')} in the file, {expected.get(k, 'none')} in the card"
                           for k in wrong[:4])
        raise ModelError(f"{weights_path} does not fit the architecture in its card ({len(wrong)} tensor(s) differ: "
                         f"{listed}{', ...' if len(wrong) > 4 else ''}): get the model again")


def load_model(path: str | Path, device: str | torch.device = "cpu", amp: bool = False) -> RAModel:
    """Loads a model directory (or a registered model's name, or a run folder of `ra train`: its `model/`),
    verifying the weights' sha256 against the card before reading them."""
    directory = resolve_model(path)
    card = read_card(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelError(f"{weights_path} is missing: copy the whole model directory")
    actual = sha256_of(weights_path)
    if actual != card.weights_sha256:
        raise ModelError(f"{weights_path} does not match its card (sha256 {actual}, card says "
                         f"{card.weights_sha256}): the file is corrupt or was changed; get the model again")
    _check_weights_fit(weights_path, card.architecture)
    network = ReversedAutoEncoder(card.architecture)
    try:
        network.load_state_dict(load_file(str(weights_path)), strict=True)
    except (RuntimeError, SafetensorError) as exc:
        raise ModelError(f"{weights_path} does not fit the architecture in its card: {exc}") from exc
    device = torch.device(device)
    network.to(device).eval()
    for p in network.parameters():
        p.requires_grad_(False)
    return RAModel(network, card, directory, device, amp)
