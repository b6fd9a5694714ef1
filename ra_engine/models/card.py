"""The model card (`model.json`): what a model is, how it preprocesses, scores and thresholds, and how it was made;
read and written here only, as a typed `ModelCard`. Torch-free: the registry, the Slicer panel and the model list
read cards before PyTorch may be installed. Every field is described in docs/MODEL_CARD.md; `models.modeldir` writes
and loads whole model directories (weights and card).

Format 2 is written; format 1 cards (the first releases', e.g. the bundled `brain-t1-demo`) are read too: they differ
only by an always-empty `metrics` section, which is dropped.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from ra_engine.core.errors import ModelError
from ra_engine.core.files import atomic_write
from ra_engine.core.resources import LPIPS_BACKBONE
from ra_engine.network.config import ArchConfig
from ra_engine.preprocess.presets import PresetConfig
from ra_engine.scoring.kinds import IMAGE_SCORES
from ra_engine.thresholds.table import Calibration

CARD_FORMAT = 2
READ_FORMATS = (1, 2)
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "model.json"
NOTICE = "Research use only, not for diagnosis."
NETWORK_CLASS = "ReversedAutoEncoder"


def card_notice(method: str) -> str:
    """The card's notice: a model trained by a baseline method (card "method" other than "ra") says it is not RA."""
    if method == "ra":
        return NOTICE
    return f"Baseline for comparison (method {method!r}), not a Reversed Auto-Encoder (RA). {NOTICE}"


@dataclass
class TrainingRecord:
    """How `ra train` made the model: its options (`training.config.TrainConfig.to_dict()`), the data (counts, the
    data root's name, file names relative to it with their sha256), the command, how far it ran and why it stopped,
    which checkpoint the weights come from, the validation history, and the wall time of the iterations."""

    config: dict
    data: dict
    command: list[str]
    steps: int
    epochs: int
    weights_from: str
    weights_step: int
    stopped_by: str
    best_val_loss: float | None = None
    best_epoch: int | None = None
    history: list[dict] = field(default_factory=list)
    seconds: float | None = None


@dataclass
class ModelCard:
    """A model card; see docs/MODEL_CARD.md for each field."""

    name: str
    architecture: ArchConfig
    preset: PresetConfig
    method: str = "ra"
    method_description: str = ""
    parameters: int = 0
    lpips_backbone: str = LPIPS_BACKBONE
    image_score: str = "mean_a"
    training: TrainingRecord | None = None
    calibration: Calibration | None = None
    description: str = ""
    provenance: dict | None = None
    evaluation: dict | None = None
    weights_sha256: str = ""
    software: dict = field(default_factory=dict)
    created: str = ""
    notice: str = NOTICE

    def with_calibration(self, calibration: Calibration | None) -> ModelCard:
        return replace(self, calibration=calibration)

    def to_dict(self) -> dict:
        return {
            "format_version": CARD_FORMAT,
            "name": self.name,
            "architecture": {"class": NETWORK_CLASS, **self.architecture.to_dict(), "parameters": self.parameters},
            "method": self.method,
            "method_description": self.method_description,
            "preset": self.preset.to_dict(),
            "lpips": {"backbone": self.lpips_backbone},
            "image_score": self.image_score,
            "training": None if self.training is None else dict(vars(self.training)),
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "description": self.description,
            "provenance": self.provenance,
            "evaluation": self.evaluation,
            "weights_sha256": self.weights_sha256,
            "software": dict(self.software),
            "created": self.created,
            "notice": self.notice,
        }

    @classmethod
    def from_dict(cls, data: dict, origin: str = "the model card") -> ModelCard:
        """The card of a `model.json`'s content (format 1 or 2); ModelError naming `origin` when it is of another
        format or lacks what a model needs."""
        version = data.get("format_version")
        if version not in READ_FORMATS:
            raise ModelError(f"{origin} has format {version}; this version of ra reads formats "
                             f"{', '.join(map(str, READ_FORMATS))}: update ra or re-export the model")
        try:
            arch = dict(data["architecture"])
            network = arch.pop("class", NETWORK_CLASS)
            if network != NETWORK_CLASS:
                raise ModelError(f"{origin} describes a {network!r} network; this version of ra builds "
                                 f"{NETWORK_CLASS} only")
            parameters = int(arch.pop("parameters", 0))
            training = data.get("training")
            calibration = data.get("calibration")
            return cls(
                name=str(data.get("name", "")),
                architecture=ArchConfig.from_dict(arch),
                preset=PresetConfig.from_dict(data["preset"]),
                method=data.get("method", "ra"),
                method_description=data.get("method_description", ""),
                parameters=parameters,
                lpips_backbone=(data.get("lpips") or {}).get("backbone", LPIPS_BACKBONE),
                image_score=_image_score(data.get("image_score", "mean_a"), origin),
                training=None if training is None else TrainingRecord(**training),
                calibration=None if not calibration else Calibration.from_dict(calibration),
                description=data.get("description", ""),
                provenance=data.get("provenance"),
                evaluation=data.get("evaluation"),
                weights_sha256=data.get("weights_sha256", ""),
                software=dict(data.get("software") or {}),
                created=data.get("created", ""),
                notice=data.get("notice", NOTICE),
            )
        except ModelError:
            raise
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelError(f"{origin} is incomplete or malformed ({type(exc).__name__}: {exc}): get the model "
                             "again or re-export it") from exc


def _image_score(kind: str, origin: str) -> str:
    if kind not in IMAGE_SCORES:
        raise ModelError(f"{origin} names the image score {kind!r}, which this version of ra does not know "
                         f"({', '.join(IMAGE_SCORES)}): update ra")
    return kind


def write_card(directory: Path, card: ModelCard) -> None:
    """Writes (or rewrites, e.g. after calibration) `model.json` atomically."""
    text = json.dumps(card.to_dict(), indent=2) + "\n"
    atomic_write(Path(directory) / CARD_FILE, lambda p: Path(p).write_text(text, encoding="utf-8"))


def read_card(directory: Path) -> ModelCard:
    """The card of the model directory `directory`; ModelError when it is missing, unreadable or of another format."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        raise ModelError(f"{directory} is not a model directory: {CARD_FILE} is missing (a model directory holds "
                         f"{WEIGHTS_FILE} and {CARD_FILE}, as written by `ra train`)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8 text, not JSON
        raise ModelError(f"model card {path} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelError(f"model card {path} is not a JSON object")
    return ModelCard.from_dict(data, origin=f"model card {path}")
