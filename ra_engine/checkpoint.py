"""Training checkpoints: written atomically (temporary file, fsync, rename) so that an interruption or a full disk
never damages the previous one, and read with `weights_only=True` so that loading one never runs pickled code."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import ModelError, RAError


def save_checkpoint(state: dict, path: Path) -> None:
    """Writes `state` (tensors, numbers, strings, lists and dicts only) to `path`, replacing it only once complete."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise RAError(f"could not write checkpoint {path}: {exc}. The previous checkpoint is intact; free disk "
                          f"space (or fix the folder's permissions) and resume with --resume.") from exc
        raise


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"no checkpoint at {path}: start without --resume, or point --out at the run to resume")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a truncated or foreign file
        raise ModelError(f"checkpoint {path} cannot be read ({exc}); it may be corrupt: resume from another run "
                         f"folder or start again") from exc
