"""`ra detect` end to end with tiny untrained models: every output in the input's format and exact geometry, the
scores file, masks from folders and CSVs, radiographs (PNG, RGB, DICOM), thresholds and flag rates, progress
events, and the refusals that leave nothing half-written."""
from __future__ import annotations

import json
import re
import warnings
import shutil
import signal
from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
import SimpleITK as sitk
from PIL import Image as PILImage
from scipy import ndimage

from ra_engine import cli
from ra_engine.detection.pipeline import detect
from ra_engine.core.errors import RAError
from ra_engine.io.images import read_image
from ra_engine.models.card import read_card
from ra_engine.models.modeldir import load_model
from test_detect import MNI, RESOURCES, calibrate, make_model

SUBJECT = RESOURCES / "samples" / "itk_subject_t1.nii.gz"
SUBJECT_MASK = RESOURCES / "samples" / "itk_subject_brain_mask.nii.gz"
KINDS = ("pseudo_healthy", "anomaly_map", "detections")


@pytest.fixture(autouse=True)
def offline_lpips(alex_safetensors, monkeypatch):
    monkeypatch.setenv("RA_LPIPS_WEIGHTS", str(alex_safetensors))


def ra_detect(*argv) -> int:
    return cli.main(["detect", *[str(a) for a in argv]])


@pytest.fixture(scope="module")
def brain_model(tmp_path_factory, scorer) -> Path:
    directory = make_model(tmp_path_factory.mktemp("models") / "brain", "brain-mri")
    calibrate(directory, [detect(load_model(directory), read_image(MNI), scorer)])
    return directory


@pytest.fixture(scope="module")
def xray_model(tmp_path_factory, scorer) -> Path:
    directory = make_model(tmp_path_factory.mktemp("models") / "xray", "xray")
    model = load_model(directory)
    calibrate(directory, [detect(model, read_image(pydicom.data.get_testdata_file(name)), scorer)
                          for name in ("RG1_UNCI.dcm", "RG3_UNCI.dcm")])
    return directory


@pytest.fixture(scope="module")
def uncalibrated_xray(tmp_path_factory) -> Path:
    return make_model(tmp_path_factory.mktemp("models") / "raw", "xray")


def radiograph_pixels(name: str = "RG1_UNCI.dcm", step: int = 8) -> np.ndarray:
    """A real chest radiograph, bright = dense, subsampled: uint16 (y, x)."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file(name))
    pixels = ds.pixel_array[::step, ::step]
    return (pixels.max() - pixels).astype(np.uint16) if ds.PhotometricInterpretation == "MONOCHROME1" else pixels


def write_png(path: Path, pixels: np.ndarray, rgb: bool = False) -> Path:
    grey = (255 * (pixels - pixels.min()) / max(np.ptp(pixels), 1)).astype(np.uint8)
    PILImage.fromarray(np.repeat(grey[..., None], 3, axis=2) if rgb else grey).save(path)
    return path


def write_dicom(path: Path, name: str = "RG1_UNCI.dcm", step: int = 8, spacing=(0.4, 0.5),
                modality: str | None = None) -> Path:
    """A real DICOM radiograph (or slice) subsampled by `step`, with PixelSpacing (row, column) = `spacing`."""
    ds = pydicom.dcmread(pydicom.data.get_testdata_file(name))
    pixels = ds.pixel_array[::step, ::step].copy()
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelData = pixels.tobytes()
    ds.PixelSpacing = [str(v) for v in spacing]
    if modality:
        ds.Modality = modality
    ds.save_as(path)
    return path


def outputs(out: Path, name: str, extension: str) -> dict[str, Path]:
    paths = {kind: out / f"{name}_{kind}{extension}" for kind in KINDS}
    return {**paths, "scores": out / f"{name}_scores.json", "overlay": out / f"{name}_overlay.png"}


def assert_same_grid(path: Path, reference: sitk.Image) -> sitk.Image:
    written = sitk.ReadImage(str(path))
    assert written.GetSize() == reference.GetSize()
    np.testing.assert_allclose(written.GetSpacing(), reference.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), reference.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), reference.GetDirection(), atol=1e-6)
    return written


# ---- volumes -----------------------------------------------------------------------------------------------------


def test_a_folder_with_a_mask_gives_every_output_on_the_input_grid(brain_model, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    sitk.WriteImage(sitk.ReadImage(str(SUBJECT)), str(data / "subject.nrrd"))  # anisotropic, permuted axes
    sitk.WriteImage(sitk.ReadImage(str(SUBJECT_MASK)), str(data / "subject_mask.nrrd"))
    events = tmp_path / "progress.jsonl"
    assert ra_detect(data, "--model", brain_model, "--out", out, "--progress-json", events, "--batch-size", 5,
                     "--mask", "auto") == 0

    scan = sitk.ReadImage(str(data / "subject.nrrd"))
    files = outputs(out, "subject", ".nrrd")  # NRRD stays NRRD
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in files.values())  # nothing else left
    types = {kind: assert_same_grid(files[kind], scan).GetPixelID() for kind in KINDS}
    assert types == {"pseudo_healthy": sitk.sitkFloat32, "anomaly_map": sitk.sitkFloat32,
                     "detections": sitk.sitkUInt8}
    # The user's brain mask replaced the reference's: nothing is flagged or scored farther from it than a model
    # pixel (7.3 mm at 32 pixels), the mask's resolution in model space.
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(SUBJECT_MASK))) > 0
    near_mask = ndimage.distance_transform_edt(~mask, sampling=scan.GetSpacing()[::-1]) < 233.0 / 32
    for kind in ("anomaly_map", "detections"):
        assert not sitk.GetArrayFromImage(sitk.ReadImage(str(files[kind])))[~near_mask].any()

    card = read_card(brain_model)
    scores = json.loads(files["scores"].read_text())
    assert scores["input"] == str(data / "subject.nrrd") and scores["mask"] == str(data / "subject_mask.nrrd")
    assert scores["flag_rate"] == card.calibration.default_flag_rate == 0.05
    assert scores["threshold"] == pytest.approx(card.calibration.threshold())
    assert scores["scan_score"] > 0 and 0 <= scores["scan_percentile_of_normal"] <= 100
    assert scores["slice_scores"] and all(0 <= s["percentile_of_normal"] <= 100 for s in scores["slice_scores"])
    detections = sitk.GetArrayFromImage(sitk.ReadImage(str(files["detections"])))
    assert scores["flagged_voxels"] == int(detections.sum()) > 0
    assert scores["regions_total"] >= len(scores["regions"]) >= 1
    voxel_mm3 = float(np.prod(scan.GetSpacing()))
    for region in scores["regions"]:
        assert region["volume_mm3"] == pytest.approx(region["voxels"] * voxel_mm3)
        low, high = region["bbox_index"]["min"], region["bbox_index"]["max"]
        centre = scan.TransformPhysicalPointToContinuousIndex(region["centroid_lps_mm"])
        assert all(lo - 1e-6 <= c <= hi + 1e-6 for lo, c, hi in zip(low, centre, high))
    assert "research use only" in scores["notice"].lower()
    assert files["overlay"].stat().st_size > 1000

    lines = [json.loads(line) for line in events.read_text().splitlines()]
    assert lines[0]["event"] == "start" and lines[-1]["event"] == "done"
    steps = [e["step"] for e in lines]
    assert steps == sorted(steps) and steps[-1] == lines[0]["total_steps"] and len(lines) > 4
    assert "subject" in capsys.readouterr().err


def test_a_mask_beside_an_input_is_used_only_when_asked_and_a_lesion_mask_is_refused(brain_model, tmp_path,
                                                                                    capsys):
    data = tmp_path / "data"
    data.mkdir()
    scan = sitk.ReadImage(str(SUBJECT))
    sitk.WriteImage(scan, str(data / "subject.nii.gz"))
    lesion = np.zeros(sitk.GetArrayViewFromImage(scan).shape, np.uint8)
    lesion[30:34, 60:64, 60:64] = 1  # a lesion mask under the name a brain mask would have
    sitk.WriteImage(_on_grid(lesion, scan), str(data / "subject_mask.nii.gz"))

    assert ra_detect(data, "--model", brain_model, "--out", tmp_path / "default") == 0
    err = capsys.readouterr().err
    assert "1 `<name>_mask` file(s) beside the inputs were not used; pass --mask auto" in err
    scores = json.loads((tmp_path / "default" / "subject_scores.json").read_text())
    assert scores["mask"] == "the reference brain (colin27)", "the report says which mask was used"

    assert ra_detect(data, "--model", brain_model, "--out", tmp_path / "auto", "--mask", "auto") == 2
    err = capsys.readouterr().err
    assert re.search(r"subject_mask.nii.gz covers 0\.00\d litres", err) and "looks like a lesion mask" in err
    assert not (tmp_path / "auto").exists() or not any((tmp_path / "auto").iterdir()), "nothing half-written"


def _on_grid(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(reference)
    return image


def test_a_run_folder_of_ra_train_serves_as_the_model(brain_model, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(brain_model, run / "model")
    assert ra_detect(MNI, "--model", run, "--out", tmp_path / "out") == 0
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints").mkdir(parents=True)
    with pytest.raises(RAError, match="whose model is not written yet"):
        load_model(unfinished)


# ---- radiographs -------------------------------------------------------------------------------------------------


def test_radiographs_from_a_csv_png_rgb_and_dicom(xray_model, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    pixels = radiograph_pixels()
    write_png(data / "chest.png", pixels, rgb=True)
    body = np.zeros(pixels.shape, np.uint8)
    body[20:-20, 30:-30] = 255
    PILImage.fromarray(body).save(data / "body.png")
    write_dicom(data / "film.dcm", spacing=(0.4, 0.5))
    (data / "list.csv").write_text("image,mask\nchest.png,body.png\nfilm.dcm,\n")
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*converted to grey")  # grey stored as RGB: no warning
        assert ra_detect(data / "list.csv", "--model", xray_model, "--out", out, "--quiet", "--flag-rate", "1%") == 0

    table = read_card(xray_model).calibration
    png = outputs(out, "chest", ".nii.gz")  # pictures and DICOM cannot hold float maps with geometry: NIfTI
    for kind in KINDS:
        result = read_image(png[kind], validate=False)
        assert result.array.shape == pixels.shape and result.geometry.spacing == (1.0, 1.0)
    anomaly = read_image(png["anomaly_map"], validate=False).array
    assert not anomaly[body == 0].any() and anomaly[body > 0].any()  # the body mask from the CSV
    scores = json.loads(png["scores"].read_text())
    assert scores["flag_rate"] == 0.01 and scores["threshold"] == pytest.approx(table.threshold(0.01))
    assert scores["mask"] == str(data / "body.png") and len(scores["slice_scores"]) == 1
    assert all("area_mm2" in r and len(r["centroid_lps_mm"]) == 2 for r in scores["regions"])
    assert png["overlay"].stat().st_size > 1000

    film = outputs(out, "film", ".nii.gz")
    detections = read_image(film["detections"], validate=False)
    assert detections.geometry.spacing == pytest.approx((0.5, 0.4))  # (x, y): DICOM lists (row, column)
    assert detections.array.shape == read_image(data / "film.dcm").array.shape
    scores = json.loads(film["scores"].read_text())
    assert sum(r["area_mm2"] for r in scores["regions"]) == pytest.approx(scores["flagged_voxels"] * 0.2)


# ---- thresholds ----------------------------------------------------------------------------------------------------


def test_an_uncalibrated_model_needs_a_threshold(uncalibrated_xray, tmp_path, capsys):
    image = write_png(tmp_path / "chest.png", radiograph_pixels())
    out = tmp_path / "out"
    assert ra_detect(image, "--model", uncalibrated_xray, "--out", out) == 2
    assert "ra calibrate" in capsys.readouterr().err and not out.exists()
    assert ra_detect(image, "--model", uncalibrated_xray, "--out", out, "--threshold", "0", "--quiet") == 0
    scores = json.loads((out / "chest_scores.json").read_text())
    assert scores["threshold"] == 0 and scores["flag_rate"] is None
    assert scores["scan_percentile_of_normal"] is None and scores["slice_scores"][0]["percentile_of_normal"] is None
    mask_pixels = read_image(out / "chest_detections.nii.gz", validate=False).array.sum()
    assert scores["regions_total"] == 1 and scores["regions"][0]["voxels"] == scores["flagged_voxels"] == mask_pixels


@pytest.mark.parametrize("option", [["--flag-rate", "30%"], ["--flag-rate", "0.0001"], ["--flag-rate", "5"],
                                    ["--threshold", "-1"], ["--batch-size", "0"]])
def test_options_out_of_range_are_refused(option, xray_model, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        ra_detect(tmp_path / "x.png", "--model", xray_model, "--out", tmp_path / "out", *option)
    assert exit_.value.code == 2 and option[0] in capsys.readouterr().err


def test_flag_rate_and_threshold_exclude_each_other(xray_model, tmp_path, capsys):
    image = write_png(tmp_path / "chest.png", radiograph_pixels())
    assert ra_detect(image, "--model", xray_model, "--out", tmp_path / "out", "--flag-rate", "0.01",
                     "--threshold", "0.1") == 2
    assert "exclude each other" in capsys.readouterr().err


# ---- refusals that leave nothing half-written ----------------------------------------------------------------------


def test_existing_outputs_are_kept_unless_overwrite(xray_model, tmp_path, capsys, monkeypatch):
    image = write_png(tmp_path / "chest.png", radiograph_pixels())
    out = tmp_path / "out"
    assert ra_detect(image, "--model", xray_model, "--out", out, "--quiet") == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 5
    assert ra_detect(image, "--model", xray_model, "--out", out, "--quiet", "--flag-rate", "1%") == 2
    assert "--overwrite" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # A failure while writing (here: the overlay, written last) leaves every earlier output as it was.
    import ra_engine.detection.outputs as outputs

    def broken(*args, **kwargs):
        raise RAError("disk full")

    working = outputs.overlay_png
    monkeypatch.setattr(outputs, "overlay_png", broken)
    assert ra_detect(image, "--model", xray_model, "--out", out, "--quiet", "--overwrite", "--flag-rate", "1%") == 2
    assert "disk full" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.setattr(outputs, "overlay_png", working)
    # A failure of the report (made while the writer threads write the maps) leaves them as they were too, and no
    # temporary file behind.
    import ra_engine.detection.result as result_module

    monkeypatch.setattr(result_module, "find_regions", broken)
    assert ra_detect(image, "--model", xray_model, "--out", out, "--quiet", "--overwrite", "--flag-rate", "1%") == 2
    assert "disk full" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    monkeypatch.undo()
    assert ra_detect(image, "--model", xray_model, "--out", out, "--quiet", "--overwrite", "--flag-rate", "1%") == 0
    assert json.loads((out / "chest_scores.json").read_text())["flag_rate"] == 0.01


def test_bad_inputs_are_reported_and_the_others_done(xray_model, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    write_png(data / "good.png", radiograph_pixels())
    PILImage.fromarray(np.full((40, 50), 9, np.uint8)).save(data / "flat.png")
    volume = sitk.GetImageFromArray(np.random.default_rng(0).random((2, 6, 7, 8)).astype(np.float32),
                                    isVector=False)
    sitk.WriteImage(volume, str(data / "sequence.nii.gz"))  # 4D
    write_dicom(data / "slice.dcm", name="MR2_UNCI.dcm", step=8)  # an MR slice is no radiograph
    assert ra_detect(data, "--model", xray_model, "--out", out, "--quiet") == 2
    err = capsys.readouterr().err
    assert "constant" in err and "4D" in err and "--force" in err and "3 of 4 input(s) failed" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in outputs(out, "good", ".nii.gz").values())
    assert ra_detect(data / "slice.dcm", "--model", xray_model, "--out", out, "--quiet", "--force") == 0


def test_a_model_for_another_modality_is_refused(brain_model, xray_model, tmp_path, capsys):
    image = write_png(tmp_path / "chest.png", radiograph_pixels())
    assert ra_detect(image, "--model", brain_model, "--out", tmp_path / "out") == 2
    assert "use an xray model" in capsys.readouterr().err
    assert ra_detect(SUBJECT, "--model", xray_model, "--out", tmp_path / "out") == 2
    assert "use a brain-mri model" in capsys.readouterr().err
    assert not any((tmp_path / "out").iterdir())


def test_inputs_with_the_same_name_are_refused_up_front(xray_model, tmp_path, capsys):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        write_png(tmp_path / folder / "scan.png", radiograph_pixels())
    assert ra_detect(tmp_path / "a", tmp_path / "b", "--model", xray_model, "--out", tmp_path / "out") == 2
    assert "two inputs are named 'scan'" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_registered_model_is_found_by_name(xray_model, tmp_path, monkeypatch):
    pytest.importorskip("ra_engine.models.registry")
    monkeypatch.setenv("RA_MODELS_DIR", str(tmp_path / "models"))
    shutil.copytree(xray_model, tmp_path / "models" / "tiny-xray")
    image = write_png(tmp_path / "chest.png", radiograph_pixels())
    assert ra_detect(image, "--model", "tiny-xray", "--out", tmp_path / "out", "--quiet") == 0
    assert json.loads((tmp_path / "out" / "chest_scores.json").read_text())["model"]["name"] == "xray"


def test_an_interrupt_stops_cleanly_between_batches(xray_model, tmp_path, monkeypatch, capsys):
    import ra_engine.detection.files as files_module

    for name in ("a", "b", "c"):
        write_png(tmp_path / f"{name}.png", radiograph_pixels())
    build = files_module.scorer_for

    def interrupted_on_the_second_input(model):
        scorer = build(model)
        score, calls = scorer.score, []

        def score_then_interrupt(x, rec):
            calls.append(len(x))
            if len(calls) == 2:
                signal.raise_signal(signal.SIGINT)  # Ctrl-C, as the Slicer panel's Cancel sends it
            return score(x, rec)

        scorer.score = score_then_interrupt
        return scorer

    monkeypatch.setattr(files_module, "scorer_for", interrupted_on_the_second_input)
    out = tmp_path / "out"
    assert ra_detect(tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png", "--model", xray_model,
                     "--out", out, "--quiet") == 130
    assert "cancelled" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in outputs(out, "a", ".nii.gz").values())
