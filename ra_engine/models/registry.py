"""The model registry (docs/ARCHITECTURE.md, "Models"): model directories in a user folder, found by name.

A registered model is the folder `models_dir()/<name>` holding `model.json` and `model.safetensors`; models enter it
through `models.install`. Models bundled with ra (`ra_engine/resources/models/<name>`, read-only) are found by name
too, after the user's registered models: a registered model of the same name takes precedence. Wherever a model is
asked for, a model directory, a run folder of `ra train` (its `model/`) or a name will do (`resolve_model`).
Torch-free: the Slicer panel lists models before PyTorch is installed.
"""
from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

from ra_engine.core.errors import ModelError
from ra_engine.core.resources import BUNDLED_MODELS_DIR
from ra_engine.models.card import CARD_FILE, read_card

ENV_VAR = "RA_MODELS_DIR"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
BUNDLED_DIR = BUNDLED_MODELS_DIR


def models_dir() -> Path:
    """The registry folder: $RA_MODELS_DIR when set, else `<user data>/ra-slicer/models` (platformdirs)."""
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("ra-slicer")) / "models"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise ModelError(f"{name!r} is not a usable model name: use letters, digits, '.', '_' and '-' (at most 100, "
                         f"starting with a letter or digit)")
    return name


def _model_folders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and (p / CARD_FILE).is_file())


def _registered() -> list[Path]:
    return _model_folders(models_dir())


def _bundled() -> list[Path]:
    """Bundled models not shadowed by a registered model of the same name."""
    registered = {p.name for p in _registered()}
    return [p for p in _model_folders(BUNDLED_DIR) if p.name not in registered]


def list_models() -> list[dict]:
    """The registered models, then the bundled ones, by name: {"name", "path", "bundled", "preset", "image_size",
    "parameters", "lpips", "calibrated", "created"}, or {"name", "path", "bundled", "problem"} for a folder whose
    card cannot be read. Weights are not hashed here (`load_model` does that)."""
    found = []
    for path, bundled in [(p, False) for p in _registered()] + [(p, True) for p in _bundled()]:
        entry = {"name": path.name, "path": str(path), "bundled": bundled}
        try:
            card = read_card(path)
        except ModelError as exc:
            found.append({**entry, "problem": str(exc)})
            continue
        found.append({**entry, "preset": card.preset.name, "image_size": card.architecture.image_size,
                      "parameters": card.parameters, "lpips": card.lpips_backbone,
                      "calibrated": card.calibration is not None, "created": card.created})
    return found


def _available() -> str:
    names = [p.name for p in _registered()]
    bundled = [p.name for p in _bundled()]
    return ((f"registered models: {', '.join(names)}" if names else "no model is registered") + f" (in {models_dir()})"
            + (f"; bundled models: {', '.join(bundled)}" if bundled else ""))


def resolve_model(name_or_path: str | Path) -> Path:
    """The model directory meant by `name_or_path`: an existing directory wins (a run folder of `ra train` gives its
    `model/`); else the registered model of that name; else the bundled model of that name. Raises ModelError,
    listing the names, when it is none of these."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / CARD_FILE).is_file() and (path / "model" / CARD_FILE).is_file():
            return path / "model"  # a run folder of `ra train`
        if not (path / CARD_FILE).is_file() and (path / "checkpoints").is_dir():
            raise ModelError(f"{path} is a run folder of `ra train` whose model is not written yet (its training "
                             f"has not finished): continue it with `ra train ... --resume --out {path}`, or give "
                             f"another model")
        return path
    text = str(name_or_path)
    if NAME_PATTERN.fullmatch(text):
        for folder in (models_dir(), BUNDLED_DIR):
            if (folder / text / CARD_FILE).is_file():
                return folder / text
    raise ModelError(f"{text} is neither a model directory nor a registered model name; {_available()}. Import a "
                     f"model with `ra models import SOURCE`")


def remove_model(name: str) -> Path:
    """Removes the registered model `name` (its folder); returns the path it had."""
    target = models_dir() / check_name(name)
    if not (target / CARD_FILE).is_file() and (BUNDLED_DIR / name / CARD_FILE).is_file():
        raise ModelError(f"{name} is bundled with ra ({BUNDLED_DIR / name}) and cannot be removed; only registered "
                         f"models can")
    if not (target / CARD_FILE).is_file():
        raise ModelError(f"no registered model is named {name}; {_available()}")
    trash = target.with_name(f".removing-{name}-{uuid.uuid4().hex[:8]}")
    os.replace(target, trash)  # gone from the registry at once, even if deleting its files takes a while
    shutil.rmtree(trash, ignore_errors=True)
    return target


