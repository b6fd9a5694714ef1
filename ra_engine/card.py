"""The model card (`model.json`) and the weights' checksum, without torch: the registry, the Slicer panel and the
model list read cards before PyTorch may be installed. The card's content is described in ARCHITECTURE.md
("Contracts"); `ra_engine.modeldir` writes and loads whole model directories."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .atomic import atomic_write
from .errors import ModelError

CARD_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
NOTICE = "Research use only, not for diagnosis."


def card_notice(method: str) -> str:
    """The card's notice: a model trained by a baseline method (card "method" other than "ra") says it is not RA."""
    if method == "ra":
        return NOTICE
    return f"Baseline for comparison (method {method!r}), not a Reversed Auto-Encoder (RA). {NOTICE}"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_card(directory: Path, card: dict) -> None:
    """Writes (or rewrites, e.g. after calibration) `model.json` atomically."""
    text = json.dumps(card, indent=2, sort_keys=False) + "\n"
    atomic_write(Path(directory) / CARD_FILE, lambda p: Path(p).write_text(text, encoding="utf-8"))


def read_card(directory: Path) -> dict:
    """The card of the model directory `directory`; ModelError when it is missing, unreadable or of another format."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise ModelError(f"{directory} is not a model directory: {CARD_FILE} is missing (a model directory holds "
                         f"{WEIGHTS_FILE} and {CARD_FILE}, as written by `ra train`)")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"model card {path} cannot be read: {exc}") from exc
    if card.get("format_version") != CARD_FORMAT:
        raise ModelError(f"model card {path} has format {card.get('format_version')}; this version of ra reads "
                         f"format {CARD_FORMAT}: update ra or re-export the model")
    return card
