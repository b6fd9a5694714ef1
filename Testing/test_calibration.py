"""Calibration on normal scans: the stored thresholds flag the requested share of normal foreground pixels, scores
become percentiles of normal, whole-scan percentiles need 20 scans, and the card is rewritten atomically with the
weights' checksum intact. A tiny random-weight xray model and the real LPIPS AlexNet keep it fast."""
import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ra_engine.cli.calibrate import add_calibrate_parser
from ra_engine.thresholds.table import (calibration_table, FLAG_RATES, MAX_QUANTILES, MIN_SCANS_FOR_SCAN_SCORES, percentile_of_normal, score_distribution)
from ra_engine.thresholds.sampling import PixelSample
from ra_engine.calibration.calibrate import calibrate_model
from ra_engine.detection.pipeline import detect
from ra_engine.core.errors import Cancelled, DataError
from ra_engine.io.images import read_image
from ra_engine.network.config import ArchConfig
from ra_engine.network.model import ReversedAutoEncoder
from ra_engine.core.files import sha256_of
from ra_engine.models.card import ModelCard
from ra_engine.models.modeldir import load_model, save_model_dir
from ra_engine.preprocess.presets import preset_config
from ra_engine.core.progress import Progress
from ra_engine.io.sources import list_sources


def make_model(folder, name="tiny"):
    torch.manual_seed(0)
    arch = ArchConfig(image_size=32, latent_dim=4, widths=(4, 8))
    save_model_dir(folder, ReversedAutoEncoder(arch).state_dict(),
                   ModelCard(name=name, architecture=arch, preset=preset_config("xray", image_size=32)))
    return folder


def write_radiographs(folder, n, seed=0):
    """n smooth 16-bit 'radiographs' (40 x 30) with noise and a shifting body."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:40, 0:30]
    for i in range(n):
        body = np.exp(-(((yy - 20 - rng.integers(-4, 5)) / 14.0) ** 2 + ((xx - 15) / rng.uniform(7, 11)) ** 2))
        img = (body * 30000 + rng.normal(0, 2000, body.shape)).clip(0, 65535).astype(np.uint16)
        sitk.WriteImage(sitk.GetImageFromArray(img), str(folder / f"cxr_{i:02d}.png"))
    return folder


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, scorer):
    """A model calibrated on 20 normal radiographs, its section, the card before calibration, and A at every
    foreground pixel of those radiographs from a separate detection run."""
    root = tmp_path_factory.mktemp("calibrated")
    model_dir = make_model(root / "model")
    before = (model_dir / "model.json").read_bytes()
    normals = write_radiographs(root / "normals", MIN_SCANS_FOR_SCAN_SCORES)
    section = calibrate_model(model_dir, normals, scorer=scorer)
    model = load_model(model_dir)
    pooled, scan_scores = [], []
    for source in list_sources(normals):
        found = detect(model, read_image(source.image), scorer)
        pooled.append(found.anomaly_stack[found.slices.masks])
        scan_scores.append(found.scan_score)
    return model_dir, section, before, np.concatenate(pooled), np.asarray(scan_scores)


def test_stored_thresholds_flag_the_requested_share_of_the_normal_pixels(calibrated):
    model_dir, section, _, pooled, _ = calibrated
    assert section.n_pixels == section.n_foreground_pixels == pooled.size, "small data: every pixel is kept"
    card = load_model(model_dir).card.calibration
    for rate in (0.001, 0.003, 0.01, 0.03, 0.05, 0.1, 0.2):
        share = np.mean(pooled >= card.threshold(rate))
        assert abs(share - rate) <= 0.05 * rate + 2 / pooled.size, (rate, share)
    assert card.threshold() == card.threshold(0.05), "the default flag rate is 5%"


def test_thresholds_fall_monotonically_as_the_flag_rate_grows(calibrated):
    section = calibrated[1]
    assert section.flag_rates == list(FLAG_RATES) and np.all(np.diff(section.flag_rates) > 0)
    assert np.all(np.diff(section.thresholds) <= 0)
    dense = [section.threshold(r) for r in np.geomspace(0.001, 0.2, 200)]
    assert np.all(np.diff(dense) <= 0) and dense[0] > dense[-1]


def test_scores_are_reported_as_percentiles_of_normal(calibrated):
    _, section, _, _, scan_scores = calibrated
    assert section.slice_scores["n"] == section.scan_scores["n"] == MIN_SCANS_FOR_SCAN_SCORES
    np.testing.assert_allclose(section.scan_scores["quantiles"], np.sort(scan_scores), rtol=1e-6)
    ranks = [percentile_of_normal(s, section.scan_scores) for s in np.sort(scan_scores)]
    np.testing.assert_allclose(ranks, np.linspace(0, 100, len(scan_scores)), atol=1e-6)
    assert percentile_of_normal(scan_scores.max() * 2, section.scan_scores) == 100.0
    assert percentile_of_normal(scan_scores.min() / 2, section.scan_scores) == 0.0


def test_the_card_is_rewritten_with_the_scans_used_and_the_weights_untouched(calibrated):
    model_dir, section, before, _, _ = calibrated
    old = json.loads(before)
    model = load_model(model_dir)  # verifies the weights against the card's sha256
    assert model.card.weights_sha256 == old["weights_sha256"] == sha256_of(model_dir / "model.safetensors")
    assert {k: v for k, v in model.card.to_dict().items() if k != "calibration"} == {
        k: v for k, v in old.items() if k != "calibration"}
    assert model.card.calibration == section
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "model.safetensors"], "no temporary files"
    scans = section.scans
    assert len(scans) == MIN_SCANS_FOR_SCAN_SCORES and section.skipped == []
    normals = model_dir.parent / "normals"
    assert all(s["sha256"] == sha256_of(normals / s["file"]) and s["bytes"] > 0 and s["slices"] == 1 for s in scans)
    assert not any(Path(s["file"]).is_absolute() for s in scans), "no path of this machine in the card"
    assert section.scorer == {"lpips": "alex", "sigma": 2.0}


def test_whole_scan_percentiles_need_twenty_scans(calibrated, tmp_path, scorer):
    normals = sorted((calibrated[0].parent / "normals").glob("*.png"))
    section = calibrate_model(make_model(tmp_path / "m"), normals[:MIN_SCANS_FOR_SCAN_SCORES - 1], scorer=scorer)
    assert section.scan_scores is None and section.slice_scores["n"] == MIN_SCANS_FOR_SCAN_SCORES - 1


def test_unusable_scans_are_skipped_and_listed(tmp_path, scorer):
    normals = write_radiographs(tmp_path / "normals", 3)
    sitk.WriteImage(sitk.GetImageFromArray(np.full((40, 30), 7, np.uint16)), str(normals / "blank.png"))
    with pytest.warns(UserWarning, match="skipping .*blank.png"):
        section = calibrate_model(make_model(tmp_path / "m"), normals, scorer=scorer)
    assert len(section.scans) == 3 and [s["path"] for s in section.skipped] == ["blank.png"]
    assert "constant image" in section.skipped[0]["reason"]


def test_out_of_range_flag_rates_are_refused_with_a_clear_message(calibrated, tmp_path):
    section = calibrated[1]
    for rate in (0.0005, 0.25, float("nan")):
        with pytest.raises(DataError, match="outside the calibrated range 0.001 to 0.2"):
            section.threshold(rate)
    with pytest.raises(DataError, match=r"did you mean 0.05, i.e. 5%"):
        section.threshold(5)
    with pytest.raises(DataError, match="not a number"):
        section.threshold("five")
    with pytest.raises(DataError, match="outside the calibrated range"):
        calibrate_model(tmp_path / "no-model-needed", tmp_path, flag_rate=0.3)  # refused before any work
    with pytest.raises(DataError, match="outside the calibrated range"):
        calibration_table(np.random.default_rng(0).random(2000), default_flag_rate=0.5)


def test_a_cancelled_or_failed_calibration_leaves_the_card_as_it_was(tmp_path, scorer, monkeypatch):
    model_dir = make_model(tmp_path / "m")
    normals = write_radiographs(tmp_path / "normals", 3)
    before = (model_dir / "model.json").read_bytes()
    progress = Progress(callback=lambda event: event["event"] != "step")
    with pytest.raises(Cancelled, match="card was not changed"):
        calibrate_model(model_dir, normals, scorer=scorer, progress=progress)
    assert (model_dir / "model.json").read_bytes() == before

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr("ra_engine.core.files.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        calibrate_model(model_dir, normals, scorer=scorer)
    assert (model_dir / "model.json").read_bytes() == before
    assert sorted(p.name for p in model_dir.iterdir()) == ["model.json", "model.safetensors"]


def test_percentile_of_normal_interpolates_and_splits_ties():
    five = score_distribution([5.0, 1.0, 4.0, 2.0, 3.0])
    assert five == {"n": 5, "quantiles": [1.0, 2.0, 3.0, 4.0, 5.0]}
    assert [percentile_of_normal(v, five) for v in (0.5, 1, 2.5, 3, 5, 6)] == [0.0, 0.0, 37.5, 50.0, 100.0, 100.0]
    ties = score_distribution([1.0, 2.0, 2.0, 2.0, 3.0])
    assert percentile_of_normal(2.0, ties) == 50.0 and percentile_of_normal(1.5, ties) == 12.5
    assert percentile_of_normal(2.0, score_distribution([2.0])) == 50.0
    with pytest.raises(DataError, match="ra calibrate"):
        percentile_of_normal(1.0, None)


def test_large_distributions_keep_bounded_quantiles_that_give_the_same_percentiles():
    scores = np.random.default_rng(1).lognormal(size=50_000)
    distribution = score_distribution(scores)
    assert distribution["n"] == scores.size and len(distribution["quantiles"]) == MAX_QUANTILES
    for value in np.quantile(scores, [0.001, 0.01, 0.5, 0.95, 0.999]):
        assert percentile_of_normal(value, distribution) == pytest.approx(100 * np.mean(scores < value), abs=0.1)


def test_the_pixel_sample_is_uniform_bounded_reproducible_and_accurate_in_the_tails():
    rng = np.random.default_rng(3)
    # Scans of different sizes and distributions: a uniform sample keeps each scan's share of the pooled pixels.
    scans = [rng.lognormal(mean=m, size=n).astype(np.float32) for m, n in
             [(0.0, 300_000), (0.5, 50_000), (-0.2, 650_000), (1.0, 200_000), (0.0, 400_000)]]
    pooled = np.concatenate(scans)
    samples = []
    for _ in range(2):
        sample = PixelSample(capacity=400_000)
        for scan in scans:
            sample.add(scan)
        samples.append(sample.values)
    assert sample.seen == pooled.size and samples[0].size == 400_000
    np.testing.assert_array_equal(samples[0], samples[1])
    from_second = np.isin(samples[0], scans[1]).mean()
    assert from_second == pytest.approx(scans[1].size / pooled.size, rel=0.05)
    table = calibration_table(samples[0])
    for rate in (0.001, 0.01, 0.05, 0.2):
        # relative standard error sqrt((1 - p) / (p K)): 5% at 0.1% for K = 400,000; allow 4 of them
        assert np.mean(pooled >= table.threshold(rate)) == pytest.approx(rate, rel=0.2 if rate < 0.01 else 0.05)
    small = PixelSample(capacity=10)
    small.add(np.arange(4))
    small.add(np.arange(4, 10))
    assert sorted(small.values) == list(range(10)), "under capacity every value is kept"


def run_cli(*argv) -> int:
    parser = argparse.ArgumentParser(prog="ra")
    add_calibrate_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["calibrate", *argv])
    args.command_line = ["ra", "calibrate", *argv]
    return args.run(args)


def test_ra_calibrate_by_registered_name_with_progress(tmp_path, alex_safetensors, monkeypatch, capsys):
    from ra_engine.models.install import import_model

    monkeypatch.setenv("RA_LPIPS_WEIGHTS", str(alex_safetensors))
    monkeypatch.setenv("RA_MODELS_DIR", str(tmp_path / "registry"))
    path = import_model(make_model(tmp_path / "src"), name="xr")
    normals = write_radiographs(tmp_path / "normals", 2)
    events = tmp_path / "progress.jsonl"
    argv = ["--model", "xr", "--data", str(normals), "--flag-rate", "1%", "--device", "cpu",
            "--progress-json", str(events)]
    assert run_cli(*argv) == 0
    calibration = load_model(path).card.calibration
    assert calibration.default_flag_rate == 0.01 and calibration.command == ["ra", "calibrate", *argv]
    assert calibration.threshold() == calibration.threshold(0.01)
    assert [json.loads(line)["event"] for line in events.read_text().splitlines()] == ["start", "step", "step", "done"]
    assert "flag rate   1.0%: threshold" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        run_cli("--model", "xr", "--data", str(normals), "--flag-rate", "30%")
    assert "outside the calibrated range" in capsys.readouterr().err
    from ra_engine.core.errors import ModelError

    with pytest.raises(ModelError, match="registered models: xr"):
        run_cli("--model", "missing", "--data", str(normals))


def test_the_image_score_can_be_the_reconstruction_error_and_the_distributions_follow_it(tmp_path, scorer):
    model_dir = make_model(tmp_path / "m")
    normals = write_radiographs(tmp_path / "normals", 3)
    calibrate_model(model_dir, normals, scorer=scorer, image_score="l1")
    model = load_model(model_dir)
    assert model.card.image_score == "l1"
    found = detect(model, read_image(sorted(normals.glob("*.png"))[0]), scorer)
    x, x_ph = found.slices.images, None
    expected = None
    with torch.inference_mode():
        batch = torch.from_numpy(x).unsqueeze(1)
        x_ph = model.inference_network.reconstruct(batch.contiguous(memory_format=torch.channels_last))[:, 0].numpy()
        expected = float(np.abs(x - x_ph)[found.slices.masks].mean())
    assert found.scan_score == pytest.approx(expected, rel=1e-5)
    assert found.scan_score in model.card.calibration.slice_scores["quantiles"], "the distribution is of l1 too"
    with pytest.raises(DataError, match="unknown image score"):
        calibrate_model(model_dir, normals, scorer=scorer, image_score="max")
