"""`ra demo` end to end (a few iterations): the README's main command on bundled data, offline."""
import json
from pathlib import Path

import numpy as np
import pytest

from ra_engine.cli import main
from ra_engine.core.resources import BUNDLED_MODELS_DIR
from ra_engine.demo import BRAIN_MODEL, SMALL_MODEL
from ra_engine.io.images import read_image


@pytest.mark.slow
def test_demo_trains_calibrates_and_writes_results_on_the_scans_grid(tmp_path, alex_safetensors, monkeypatch, capsys):
    monkeypatch.setenv("RA_LPIPS_WEIGHTS", str(alex_safetensors))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "3", "--device", "cpu", "--quiet"]) == 0

    scan = read_image(out / "test_scan.nii.gz")
    for name in ("pseudo_healthy", "anomaly_map", "detections"):
        result = read_image(out / f"test_scan_{name}.nii.gz", validate=False)
        assert result.array.shape == scan.array.shape
        np.testing.assert_allclose(result.geometry.spacing, scan.geometry.spacing, rtol=1e-6)
        np.testing.assert_allclose(result.geometry.origin, scan.geometry.origin, atol=1e-4)
        np.testing.assert_allclose(result.geometry.direction, scan.geometry.direction, atol=1e-6)
    summary = json.loads((out / "demo_summary.json").read_text())
    assert summary["lesion_voxels"] > 100 and 0 <= summary["lesion_fraction_flagged"] <= 1
    assert 0.0 < summary["normal_fraction_flagged"] < 0.5  # calibrated at 5% on another subject
    report = json.loads((out / "test_scan_scores.json").read_text())
    assert report["threshold"] == summary["threshold"] and report["flag_rate"] == 0.05
    assert (out / "test_scan_overlay.png").stat().st_size > 1000
    assert (out / "demo_lesion_overlay.png").stat().st_size > 1000
    card = json.loads((out / "run" / "model" / "model.json").read_text())
    assert card["calibration"]["scans"] and len(card["calibration"]["thresholds"]) == len(card["calibration"]["flag_rates"])
    assert card["training"]["steps"] == 3
    assert "lesion" in capsys.readouterr().err
    assert main(["demo", "--out", str(out), "--steps", "3"]) == 2, "an existing demo is not overwritten silently"


def test_demo_with_the_bundled_model_flags_the_synthetic_lesion(tmp_path, alex_safetensors, monkeypatch, capsys):
    """The README's main command as it runs by default: the bundled brain model, no training."""
    monkeypatch.setenv("RA_LPIPS_WEIGHTS", str(alex_safetensors))
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    assert not (out / "run").exists(), "nothing is trained"
    summary = json.loads((out / "demo_summary.json").read_text())
    bundled = BRAIN_MODEL if (BUNDLED_MODELS_DIR / BRAIN_MODEL).is_dir() else SMALL_MODEL
    assert Path(summary["model"]).name == bundled
    assert summary["lesion_detected"] and summary["lesion_fraction_flagged"] > 0.5
    assert summary["mean_anomaly_in_lesion"] > 2 * summary["mean_anomaly_in_normal_brain"]
    assert summary["normal_fraction_flagged"] < 0.2
    assert f"using the bundled model {bundled}" in capsys.readouterr().err
