"""Training checkpoints: written atomically (`core.files.atomic_write`) so that an interruption or a full disk never
damages the previous one, and read with `weights_only=True` so that loading one never runs pickled code."""
from __future__ import annotations

from pathlib import Path

import torch

from ra_engine.core.errors import ModelError
from ra_engine.core.files import atomic_write

CHECKPOINT_FORMAT = 1


def save_checkpoint(state: dict, path: Path) -> None:
    """Writes `state` (tensors, numbers, strings, lists and dicts only) to `path`, replacing it only once complete."""

    def write(temporary: Path) -> None:
        with open(temporary, "wb") as f:
            torch.save(state, f)

    atomic_write(path, write, hint="the previous checkpoint is intact; free disk space (or fix the folder's "
                                   "permissions) and resume with --resume")


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint's contents (tensors on `map_location`); ModelError when it is missing or cannot be read."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no checkpoint at {path}: start without --resume, or point --out at the run to resume")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ModelError(f"checkpoint {path} cannot be read ({exc}); it may be corrupt: resume from another run "
                         f"folder or start again") from exc
