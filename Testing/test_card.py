"""The model card as a typed object: format 1 cards (the bundled model's) still load, a card survives its JSON form
unchanged, and cards of a future format or of another network are refused with a message saying what to do."""
import json

import pytest

from ra_engine.core.errors import ModelError
from ra_engine.core.resources import BUNDLED_MODELS_DIR
from ra_engine.models.card import CARD_FORMAT, ModelCard, read_card, write_card
from ra_engine.network.config import ArchConfig
from ra_engine.preprocess.presets import preset_config
from ra_engine.thresholds.table import Calibration

BUNDLED = BUNDLED_MODELS_DIR / "brain-t1-demo"


@pytest.fixture
def format_1(tmp_path):
    """The bundled model's card as the first releases wrote it: format 1, with an empty `metrics` section."""
    raw = json.loads((BUNDLED / "model.json").read_text())
    raw = {**raw, "format_version": 1, "metrics": {}}
    (tmp_path / "model.json").write_text(json.dumps(raw))
    return tmp_path


def test_the_bundled_card_is_of_the_current_format_with_no_path_of_the_machine_that_made_it():
    raw = json.loads((BUNDLED / "model.json").read_text())
    assert raw["format_version"] == CARD_FORMAT and "metrics" not in raw
    text = (BUNDLED / "model.json").read_text()
    assert "/work/" not in text and "/tmp/" not in text and "/home/" not in text


def test_a_format_1_card_loads_and_its_empty_metrics_section_is_dropped(format_1):
    raw = json.loads((format_1 / "model.json").read_text())
    assert raw["format_version"] == 1 and raw["metrics"] == {}
    card = read_card(format_1)
    assert card.architecture == ArchConfig(image_size=64, latent_dim=64, widths=(16, 32, 64, 128))
    assert card.preset.name == "brain-mri" and card.preset.image_size == 64
    assert card.training.steps == raw["training"]["steps"] and card.training.config == raw["training"]["config"]
    assert isinstance(card.calibration, Calibration)
    assert card.calibration.threshold(0.05) == pytest.approx(card.calibration.threshold())
    assert card.weights_sha256 == raw["weights_sha256"] and card.parameters == raw["architecture"]["parameters"]
    written = card.to_dict()
    assert written["format_version"] == CARD_FORMAT == 2 and "metrics" not in written
    assert written["image_score"] == "mean_a", "format 1 scored images by the mean of A"
    added = ("format_version", "image_score", "description", "provenance", "evaluation")
    assert written["description"] == "" and written["provenance"] is None and written["evaluation"] is None
    assert {k: v for k, v in written.items() if k not in added} == {
        k: v for k, v in raw.items() if k not in (*added, "metrics")}


def test_a_card_survives_its_json_form(tmp_path):
    card = ModelCard(name="x", architecture=ArchConfig(image_size=32, widths=(8, 16)),
                     preset=preset_config("xray", image_size=32), method="ae", parameters=123)
    write_card(tmp_path, card)
    assert read_card(tmp_path) == card
    assert read_card(tmp_path).training is None and read_card(tmp_path).calibration is None


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format_version=3), "has format 3; this version of ra reads formats 1, 2: update ra"),
    (lambda d: d["architecture"].update({"class": "UNet"}), "describes a 'UNet' network"),
    (lambda d: d.pop("preset"), "is incomplete or malformed"),
    (lambda d: d["preset"].update(shiny=True), "written by a newer version"),
])
def test_cards_of_another_format_or_network_are_refused(tmp_path, change, message):
    data = json.loads((BUNDLED / "model.json").read_text())
    change(data)
    (tmp_path / "model.json").write_text(json.dumps(data))
    with pytest.raises(ModelError, match=message):
        read_card(tmp_path)
