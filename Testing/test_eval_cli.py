"""`ra eval` end to end with a tiny untrained xray model and the real LPIPS-alex weights, on real radiographs with
synthetic lesions: every output written, the figures in metrics.json equal to a direct recomputation from `detect`
and scikit-learn, the L1 score's thresholds and where they come from, and the refusals."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from ra_engine import cli
from ra_engine.thresholds.table import calibration_table
from ra_engine.detection.pipeline import detect, detect_array
from ra_engine.evaluation.report import OUTPUTS
from ra_engine.io.images import read_image
from ra_engine.models.card import read_card
from ra_engine.models.modeldir import load_model
from ra_engine.scoring.scorer import AnomalyScorer
from test_detect import calibrate, make_model
from test_detect_cli import radiograph_pixels


@pytest.fixture(autouse=True)
def offline_lpips(alex_safetensors, monkeypatch):
    monkeypatch.setenv("RA_LPIPS_WEIGHTS", str(alex_safetensors))


def ra_eval(*argv) -> int:
    return cli.main(["eval", *[str(a) for a in argv]])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, scorer) -> Path:
    """A tiny xray model calibrated on two real radiographs (subsampled), as `ra calibrate` would."""
    directory = make_model(tmp_path_factory.mktemp("models") / "xray", "xray", seed=3)
    model = load_model(directory)
    calibrate(directory, [detect_array(model, radiograph_pixels(name, step=6), scorer=scorer)
                          for name in ("RG1_UNCI.dcm", "RG3_UNCI.dcm")])
    return directory


def disk(shape, centre, radius) -> np.ndarray:
    y, x = np.ogrid[:shape[0], :shape[1]]
    return (y - centre[0]) ** 2 + (x - centre[1]) ** 2 <= radius ** 2


def write_png(path: Path, pixels: np.ndarray) -> Path:
    grey = (255 * (pixels - pixels.min()) / max(float(np.ptp(pixels)), 1.0)).astype(np.uint8)
    PILImage.fromarray(grey).save(path)
    return path


@pytest.fixture(scope="module")
def test_set(tmp_path_factory) -> Path:
    """test.csv: two abnormal radiographs with bright synthetic lesions (types nodule and mass; three lesions of
    three size classes), a normal one without a mask, a normal one with an empty mask, and an abnormal one without
    a mask (image level only)."""
    folder = tmp_path_factory.mktemp("test_set")
    rg1, rg3 = radiograph_pixels("RG1_UNCI.dcm").astype(np.float64), radiograph_pixels("RG3_UNCI.dcm").astype(
        np.float64)
    rows = []

    def add(name, pixels, lesions=None, label="", type_=""):
        pixels = pixels.copy()
        mask_name = ""
        if lesions is not None:
            truth = np.zeros(pixels.shape, bool)
            for centre, radius in lesions:
                truth |= disk(pixels.shape, centre, radius)
            pixels[truth] = pixels.max() * 1.2
            mask_name = f"{name}_lesion.png"
            PILImage.fromarray((255 * truth).astype(np.uint8)).save(folder / mask_name)
        write_png(folder / f"{name}.png", pixels)
        rows.append({"image": f"{name}.png", "mask": mask_name, "label": label, "type": type_})

    add("nodule", rg1, [((60, 80), 8)], type_="nodule")                        # 201 mm^2: medium
    add("mass", rg3, [((120, 100), 20), ((40, 170), 3)], label="1", type_="mass")  # large and small
    add("normal_plain", rg1[:, ::-1], label="0")
    add("normal_blank", rg3[::-1], lesions=[])
    add("abnormal_unlocalised", rg1[::-1, ::-1], label="1", type_="mass")
    with open(folder / "test.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image", "mask", "label", "type"])
        writer.writeheader()
        writer.writerows(rows)
    return folder / "test.csv"


def recompute(model_dir: Path, csv_path: Path, scorer) -> dict:
    """The figures straight from `detect` on every row, all pixels at once, scikit-learn and ndimage."""
    model = load_model(model_dir)
    rows = list(csv.DictReader(open(csv_path)))
    values, truths, scores, labels, lesions = [], [], [], [], []
    for row in rows:
        found = detect(model, read_image(csv_path.parent / row["image"]), scorer)
        truth = (read_image(csv_path.parent / row["mask"], validate=False).array != 0 if row["mask"]
                 else None)
        label = int(row["label"]) if row["label"] else int(truth.any())
        scores.append(found.scan_score)
        labels.append(label)
        inside = found.mask.array > 0
        if truth is not None or label == 0:
            truth = np.zeros(inside.shape, bool) if truth is None else truth
            if label == 0 or truth.any():
                values.append(found.anomaly.array[inside])
                truths.append(truth[inside])
                components, n = ndimage.label(truth, np.ones((3, 3), bool))
                lesions += [(found.anomaly.array, inside, components == k) for k in range(1, n + 1)]
    return {"values": np.concatenate(values), "truths": np.concatenate(truths), "scores": scores,
            "labels": labels, "lesions": lesions}


def test_eval_writes_every_output_with_figures_equal_to_a_direct_recomputation(model_dir, test_set, scorer,
                                                                                tmp_path, capsys):
    out, events = tmp_path / "eval", tmp_path / "progress.jsonl"
    assert ra_eval("--model", model_dir, "--data", test_set, "--out", out, "--examples", 3,
                   "--progress-json", events) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUTS)  # nothing else left (no temporary files)
    for name in OUTPUTS:
        if name.endswith(".png"):
            with PILImage.open(out / name) as picture:
                assert picture.format == "PNG" and min(picture.size) > 200
    metrics = json.loads((out / "metrics.json").read_text())
    card = read_card(model_dir)
    assert metrics["model"]["weights_sha256"] == card.weights_sha256 and metrics["model"]["name"] == card.name
    assert metrics["command"][:2] == ["ra", "eval"] and metrics["score"]["kind"] == "full"
    assert metrics["thresholds"]["source"] == "model card"
    assert metrics["thresholds"]["flag_rates"] == [0.05, 0.01]
    thresholds = [card.calibration.threshold(rate) for rate in (0.05, 0.01)]
    assert metrics["thresholds"]["values"] == pytest.approx(thresholds)
    counts = metrics["counts"]
    assert (counts["scans"], counts["normal"], counts["abnormal"], counts["with_known_lesion_pixels"],
            counts["abnormal_without_lesion_mask"], counts["lesions"]) == (5, 2, 3, 4, 1, 3)

    direct = recompute(model_dir, test_set, scorer)
    values, truths = direct["values"], direct["truths"]
    assert counts["lesion_pixels"] == truths.sum() and counts["healthy_pixels"] == (~truths).sum()
    pixel = metrics["pixel_level"]
    assert pixel["auroc"] == pytest.approx(roc_auc_score(truths, values), abs=1e-9)
    assert pixel["ap"] == pytest.approx(average_precision_score(truths, values), abs=1e-9)
    best = max((2 * np.sum((values >= t) & truths) / (np.sum(values >= t) + truths.sum()), t)
               for t in np.unique(values[truths]))
    assert pixel["best_dice"]["dice"] == pytest.approx(best[0]) and "upper bound" in pixel["best_dice"]["note"]
    for threshold, at in zip(thresholds, pixel["at_flag_rate"]):
        flagged = values >= threshold
        assert at["dice"] == pytest.approx(2 * np.sum(flagged & truths) / (flagged.sum() + truths.sum()))
        assert at["healthy_flagged_fraction"] == pytest.approx(flagged[~truths].mean())
    image = metrics["image_level"]
    assert image["auroc"] == pytest.approx(roc_auc_score(direct["labels"], direct["scores"]))
    assert image["ap"] == pytest.approx(average_precision_score(direct["labels"], direct["scores"]))
    for threshold, at in zip(thresholds, metrics["lesion_level"]["at_flag_rate"]):
        detected = [np.sum((anomaly >= threshold) & inside & lesion) > 0.1 * lesion.sum()
                    for anomaly, inside, lesion in direct["lesions"]]
        assert (at["lesions"], at["detected"]) == (3, sum(detected))
    assert metrics["lesion_level"]["by_size"] == {"small": 1, "medium": 1, "large": 1}
    assert set(metrics["per_type"]) == {"mass", "nodule"} and metrics["per_type"]["mass"]["scans"] == 2
    assert metrics["per_type"]["nodule"]["lesions"] == 1 and metrics["per_type"]["mass"]["lesions"] == 2
    assert [s["image"].rsplit("/", 1)[-1] for s in metrics["scans"]] == [
        "nodule.png", "mass.png", "normal_plain.png", "normal_blank.png", "abnormal_unlocalised.png"]

    table = (out / "metrics.md").read_text()
    assert "## Image level" in table and "## Lesion level" in table and "upper bound (uses test labels)" in table
    assert f"{image['auroc']:.3f}" in table
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "done"
    assert [e["step"] for e in lines if e["event"] == "step"] == [1, 2, 3, 4, 5]
    assert "image AUROC" in capsys.readouterr().err


def test_existing_outputs_are_refused_unless_overwrite(model_dir, test_set, tmp_path, capsys):
    small = tmp_path / "small.csv"
    folder = test_set.parent
    small.write_text(f"image,mask,label\n{folder / 'nodule.png'},{folder / 'nodule_lesion.png'},\n"
                     f"{folder / 'normal_plain.png'},,0\n")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    assert ra_eval("--model", model_dir, "--data", small, "--out", out) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "metrics.json").read_text() == "{}"
    (out / "examples.png").write_text("stale")
    assert ra_eval("--model", model_dir, "--data", small, "--out", out, "--overwrite", "--examples", 0,
                   "--quiet") == 0
    assert json.loads((out / "metrics.json").read_text())["counts"]["scans"] == 2
    assert not (out / "examples.png").exists()  # not this evaluation's: removed


def test_l1_score_thresholds_come_from_normal_scans_and_say_so(model_dir, test_set, tmp_path):
    out = tmp_path / "l1"
    assert ra_eval("--model", model_dir, "--data", test_set, "--out", out, "--score", "l1", "--quiet",
                   "--examples", 0) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["score"]["kind"] == "l1" and metrics["thresholds"]["source"] == "test-set normal scans"
    assert "in-sample" in metrics["thresholds"]["meaning"] and "in-sample" in (out / "metrics.md").read_text()

    l1 = AnomalyScorer(None, kind="l1")
    direct = recompute(model_dir, test_set, l1)
    assert metrics["pixel_level"]["auroc"] == pytest.approx(roc_auc_score(direct["truths"], direct["values"]),
                                                            abs=1e-9)
    model = load_model(model_dir)
    normals = [detect(model, read_image(test_set.parent / name), l1)
               for name in ("normal_plain.png", "normal_blank.png")]
    table = calibration_table(np.concatenate([f.anomaly_stack[f.slices.masks] for f in normals]))
    assert metrics["thresholds"]["values"] == pytest.approx([table.threshold(r) for r in (0.05, 0.01)])

    calibration = tmp_path / "normals"
    calibration.mkdir()
    for name in ("normal_plain.png", "normal_blank.png"):
        (calibration / name).write_bytes((test_set.parent / name).read_bytes())
    out = tmp_path / "l1_calibrated"
    assert ra_eval("--model", model_dir, "--data", test_set, "--out", out, "--score", "l1", "--quiet",
                   "--calibration-data", calibration, "--flag-rates", "2%", "--examples", 0) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["thresholds"]["source"] == "calibration data"
    assert metrics["thresholds"]["values"] == pytest.approx([table.threshold(0.02)])


def test_unusable_rows_are_skipped_and_listed_and_unlabelled_ones_refused(model_dir, test_set, tmp_path, capsys):
    folder = test_set.parent
    bad = tmp_path / "bad.csv"
    elsewhere = tmp_path / "small_mask.png"
    PILImage.fromarray(np.zeros((20, 20), np.uint8)).save(elsewhere)  # another grid, not the same space
    rows = [f"{folder / 'nodule.png'},{folder / 'nodule_lesion.png'},,nodule",
            f"{folder / 'normal_plain.png'},,0,", f"{folder / 'mass.png'},{elsewhere},1,mass"]
    bad.write_text("image,mask,label,type\n" + "\n".join(rows) + "\n")
    out = tmp_path / "eval"
    with pytest.warns(UserWarning, match="does not cover the same physical space"):
        assert ra_eval("--model", model_dir, "--data", bad, "--out", out, "--quiet", "--examples", 0) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["data"]["evaluated"] == 2 and metrics["data"]["skipped"][0]["image"] == str(folder / "mass.png")
    assert "Skipped scans" in (out / "metrics.md").read_text()

    unlabelled = tmp_path / "unlabelled.csv"
    unlabelled.write_text(f"image,mask,label\n{folder / 'nodule.png'},,\n")
    assert ra_eval("--model", model_dir, "--data", unlabelled, "--out", tmp_path / "none") == 2
    assert "neither a lesion mask nor a label" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
