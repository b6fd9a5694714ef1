"""Model directories (ARCHITECTURE.md, "Contracts"): `model.safetensors` (weights, loaded without unpickling) and
`model.json` (the model card). The card carries everything needed to rebuild the network, preprocess exactly as in
training, score, and reproduce the model; the sha256 of the weights guards against corrupt or tampered files."""
from __future__ import annotations

import datetime as _dt
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .atomic import atomic_write
from .card import CARD_FORMAT, WEIGHTS_FILE, card_notice, read_card, sha256_of, write_card
from .errors import ModelError
from .model import ArchConfig, ReversedAutoEncoder, inference_copy

def save_model_dir(directory: Path, state_dict: dict[str, torch.Tensor], arch: ArchConfig, card: dict) -> dict:
    """Writes weights and card into `directory` (created); returns the card as written. `card` holds the
    caller's sections (method, preset, training, lpips, calibration, metrics); architecture, checksum, version, notice
    and date are filled in here. A card without "method" is RA's."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in state_dict.items()}
    atomic_write(directory / WEIGHTS_FILE, lambda p: save_file(weights, str(p)))
    full = {
        "format_version": CARD_FORMAT,
        "name": card.get("name", directory.name),
        "architecture": {"class": "ReversedAutoEncoder", **arch.to_dict(),
                         "parameters": sum(v.numel() for k, v in weights.items() if not _is_buffer(k))},
        **{k: v for k, v in card.items() if k != "name"},
        "weights_sha256": sha256_of(directory / WEIGHTS_FILE),
        "software": {"ra_engine": __version__, "torch": torch.__version__},
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "notice": card_notice(card.get("method", "ra")),
    }
    write_card(directory, full)
    return full


def _is_buffer(key: str) -> bool:
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


@dataclass
class RAModel:
    """A loaded model: the network in eval mode on `device`, and its card."""

    network: ReversedAutoEncoder
    card: dict
    path: Path
    device: torch.device

    @property
    def arch(self) -> ArchConfig:
        return self.network.config

    @functools.cached_property
    def inference_network(self) -> ReversedAutoEncoder:
        """`network` with BatchNorm folded and channels-last weights (`model.inference_copy`), built on first use."""
        return inference_copy(self.network)

    def detect(self, array, **kwargs):
        """Detection on a numpy scan ((z, y, x) or (y, x)); keyword arguments as `ra_engine.detect.detect_array`
        (spacing, origin, direction in LPS x-y-z order, mask, progress, ...). Returns a `Detection`."""
        from .detect import detect_array

        return detect_array(self, array, **kwargs)


def load_model(path: str | Path, device: str | torch.device = "cpu") -> RAModel:
    """Loads a model directory, verifying the weights' sha256 against the card before reading them."""
    directory = Path(path)
    card = read_card(directory)
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise ModelError(f"{weights_path} is missing: copy the whole model directory")
    actual = sha256_of(weights_path)
    if actual != card.get("weights_sha256"):
        raise ModelError(f"{weights_path} does not match its card (sha256 {actual}, card says "
                         f"{card.get('weights_sha256')}): the file is corrupt or was changed; get the model again")
    arch = ArchConfig.from_dict(card["architecture"])
    network = ReversedAutoEncoder(arch)
    try:
        network.load_state_dict(load_file(str(weights_path)), strict=True)
    except RuntimeError as exc:
        raise ModelError(f"{weights_path} does not fit the architecture in its card: {exc}") from exc
    device = torch.device(device)
    network.to(device).eval()
    for p in network.parameters():
        p.requires_grad_(False)
    return RAModel(network, card, directory, device)
