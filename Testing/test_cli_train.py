"""`ra train` end to end on tiny data: model directory, refusals, resume, progress, bad input."""
import json
from pathlib import Path

import numpy as np
import pytest

import ra_engine
from fixtures_io import write_radiographs
from ra_engine.cli import main
from ra_engine.core.files import sha256_of

TINY = ["--preset", "xray", "--image-size", "16", "--widths", "4,8", "--latent-dim", "4", "--batch-size", "2",
        "--lr", "1e-3", "--device", "cpu", "--quiet", "--no-calibrate"]


@pytest.fixture
def radiographs(tmp_path):
    """Eight smooth 16-bit 'radiographs' of a non-square shape."""
    return write_radiographs(tmp_path / "normals")


def train(data, out, *extra):
    return main(["train", "--data", str(data), "--out", str(out), *TINY, *extra])


def test_train_writes_a_loadable_model_directory_with_its_card(radiographs, tmp_path, capsys):
    out = tmp_path / "run"
    progress = tmp_path / "progress.jsonl"
    assert train(radiographs, out, "--epochs", "2", "--progress-json", str(progress)) == 0
    model = ra_engine.load_model(out / "model")
    card = model.card
    assert card.architecture.widths == (4, 8) and card.architecture.image_size == 16
    assert card.preset.name == "xray" and card.preset.flip is False
    assert card.training.config["augment"]["flip"] is False
    assert card.training.stopped_by == "epochs" and card.training.epochs == 2
    assert card.training.data["sources"] == 8 and card.training.data["val_slices"] >= 1
    assert card.training.command == ["ra", "train", "--data", str(radiographs), "--out", str(out), *TINY,
                                           "--epochs", "2", "--progress-json", str(progress)]
    assert card.weights_sha256 == sha256_of(out / "model" / "model.safetensors")
    assert "not for diagnosis" in card.notice
    assert (out / "train.log").read_text().count("val_loss") == 2
    events = [json.loads(line)["event"] for line in progress.read_text().splitlines()]
    assert "start" in events and events[-1] == "done" and events.count("epoch") == 2


def test_an_existing_run_folder_is_refused_unless_resume_or_overwrite(radiographs, tmp_path, capsys):
    out = tmp_path / "run"
    assert train(radiographs, out, "--max-steps", "2") == 0
    assert train(radiographs, out, "--max-steps", "2") == 2
    assert "already exists" in capsys.readouterr().err
    assert train(radiographs, out, "--max-steps", "5", "--resume") == 0
    training = ra_engine.load_model(out / "model").card.training
    assert training.steps == 5 and training.weights_from == "best.pt" and training.weights_step == 3
    assert train(radiographs, out, "--max-steps", "1", "--overwrite") == 0
    assert ra_engine.load_model(out / "model").card.training.steps == 1


def test_resume_follows_the_data_by_content_not_by_file_dates_or_place(radiographs, tmp_path, capsys):
    import os
    import shutil

    out = tmp_path / "run"
    assert train(radiographs, out, "--max-steps", "2") == 0
    moved = tmp_path / "copied"
    shutil.copytree(radiographs, moved, copy_function=shutil.copyfile)  # new dates, another folder
    for path in moved.iterdir():
        os.utime(path, (1e9, 1e9))
    assert train(moved, out, "--max-steps", "3", "--resume") == 0
    assert ra_engine.load_model(out / "model").card.training.steps == 3
    changed = sorted(moved.iterdir())[0]
    changed.write_bytes(changed.read_bytes() + b"\0")
    assert train(moved, out, "--max-steps", "4", "--resume") == 2
    assert "training data differ from the checkpoint" in capsys.readouterr().err


def test_the_progress_file_gets_its_folder_and_an_unwritable_one_is_a_clear_error(radiographs, tmp_path, capsys):
    progress = tmp_path / "new" / "folder" / "progress.jsonl"
    assert train(radiographs, tmp_path / "run", "--max-steps", "1", "--progress-json", str(progress)) == 0
    assert json.loads(progress.read_text(encoding="utf-8").splitlines()[-1])["event"] == "done"
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder", encoding="utf-8")
    out = tmp_path / "other"
    assert train(radiographs, out, "--max-steps", "1", "--progress-json", str(blocker / "p.jsonl")) == 2
    assert "cannot write the progress file" in capsys.readouterr().err and not out.exists()


def test_masks_and_label_maps_in_the_data_folder_are_not_trained_on_as_scans(radiographs, tmp_path):
    import SimpleITK as sitk

    lesion = np.zeros((40, 30), np.uint8)
    lesion[10:20, 5:12] = 1
    sitk.WriteImage(sitk.GetImageFromArray(lesion), str(radiographs / "lesions.png"))
    labels = (np.arange(40 * 30).reshape(40, 30) % 5).astype(np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(radiographs / "cxr_3_labels.png"))
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="skipped"):
        assert train(radiographs, out, "--max-steps", "1") == 0
    data = ra_engine.load_model(out / "model").card.training.data
    assert data["sources"] == 10 and data["scans_used"] == 8
    skipped = {s["file"]: s["reason"] for s in data["skipped"]}
    assert set(skipped) == {"lesions.png", "cxr_3_labels.png"}
    assert "2 distinct value(s) (0, 1)" in skipped["lesions.png"] and "label map" in skipped["cxr_3_labels.png"]


def test_label_map_values_finds_masks_and_not_scans():
    from ra_engine.training.pipeline import label_map_values

    rng = np.random.default_rng(0)
    assert list(label_map_values(np.array([[0, 1], [1, 0]], np.uint8))) == [0, 1]
    assert list(label_map_values(np.zeros((5, 5)))) == [0]
    assert label_map_values(rng.integers(0, 256, (64, 64)).astype(np.uint8)) is None  # an 8-bit picture
    assert label_map_values(np.array([0.0, 0.5, 1.0])) is None  # few values, not whole numbers: intensities
    volume = np.zeros((200, 200, 200), np.int16)
    volume.flat[1::1000] = np.arange(volume.size // 1000) % 20  # values the sample (every 80th voxel) misses
    assert label_map_values(volume) is None


def test_select_last_gives_the_last_iterations_weights_and_a_finished_run_can_be_exported_again(radiographs,
                                                                                                 tmp_path):
    from safetensors.torch import load_file
    from ra_engine.training.checkpoint import load_checkpoint

    out = tmp_path / "run"
    assert train(radiographs, out, "--max-steps", "5") == 0
    best = ra_engine.load_model(out / "model").card.training
    assert best.weights_from == "best.pt" and best.weights_step == 3 and best.config["select"] == "best"
    # Resuming the finished run with --select last trains nothing more and writes the model from latest.pt.
    assert train(radiographs, out, "--max-steps", "5", "--resume", "--select", "last") == 0
    last = ra_engine.load_model(out / "model").card.training
    assert last.weights_from == "latest.pt" and last.weights_step == 5 and last.steps == 5
    assert last.config["select"] == "last"
    latest = load_checkpoint(out / "checkpoints" / "latest.pt")["model"]
    exported = load_file(out / "model" / "model.safetensors")
    assert exported.keys() == latest.keys() and all(exported[k].equal(latest[k]) for k in latest)
    assert not all(exported[k].equal(v) for k, v in load_checkpoint(out / "checkpoints" / "best.pt")["model"].items())


def test_missing_or_empty_data_is_a_clear_error_and_writes_no_run(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert train(empty, tmp_path / "run1", "--max-steps", "1") == 2
    assert "ra train: error:" in capsys.readouterr().err
    assert train(tmp_path / "missing", tmp_path / "run2", "--max-steps", "1") == 2
    assert not (tmp_path / "run2" / "model").exists()


def test_training_ends_with_calibration_on_the_held_out_scans(radiographs, tmp_path, alex_safetensors, monkeypatch):
    monkeypatch.setenv("RA_LPIPS_WEIGHTS", str(alex_safetensors))
    out = tmp_path / "run"
    args = [a for a in TINY if a != "--no-calibrate"]
    args[args.index("--image-size") + 1] = "32"
    assert main(["train", "--data", str(radiographs), "--out", str(out), *args, "--max-steps", "2",
                 "--val-fraction", "0.4"]) == 0
    card = ra_engine.load_model(out / "model").card
    held_out = card.training.data["held_out"]
    assert held_out and [s["file"] for s in card.calibration.scans] == [s["file"] for s in held_out]
    assert [s["sha256"] for s in card.calibration.scans] == [s["sha256"] for s in held_out]
    assert not any(Path(s["file"]).is_absolute() for s in held_out), "no path of this machine in the card"
    assert card.calibration.thresholds == sorted(card.calibration.thresholds, reverse=True)


def test_without_lpips_weights_the_model_is_kept_and_the_log_says_how_to_calibrate(radiographs, tmp_path,
                                                                                  monkeypatch):
    from ra_engine.scoring import scorer as scorer_module
    from ra_engine.core.errors import ModelError

    def offline(*args, **kwargs):
        raise ModelError("no LPIPS weights offline")

    monkeypatch.setattr(scorer_module, "load_lpips", offline)
    out = tmp_path / "run"
    args = [a for a in TINY if a != "--no-calibrate"]
    assert main(["train", "--data", str(radiographs), "--out", str(out), *args, "--max-steps", "1"]) == 0
    assert ra_engine.load_model(out / "model").card.calibration is None
    assert "ra calibrate --model" in (out / "train.log").read_text()
