"""`ra demo`: the whole pipeline on bundled real anatomy, in seconds (bundled models) or minutes (--steps) on a CPU.

Runs detection with the bundled brain model (`brain-t1`, trained on real normal T1 cohorts; `brain-t1-demo` where
it is absent) on an unseen subject (Colin27, the alignment reference) into which a synthetic lesion was placed, and
reports how much of the lesion is flagged. Then the bundled chest model (`chest-xray`) on a real radiograph from the
registry (pydicom-data's RG1_UNCI.dcm, an adult PA chest radiograph: the model was trained on children's AP ones,
so it is out of distribution and its percentile of normal says so). With `steps` it first trains a new small RA for
that many iterations on the three bundled normal T1 scans and calibrates it on the one held out (how the small
`brain-t1-demo` was made, with `--steps 600`). Research use only, not for diagnosis. Everything goes through the
Python API (`ra_engine.api`), as a user's script would.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Callable

import numpy as np

from ra_engine import api
from ra_engine.core.errors import RAError
from ra_engine.core.files import atomic_write
from ra_engine.core.image import Image
from ra_engine.core.resources import BUNDLED_MODELS_DIR, SAMPLES_DIR
from ra_engine.core.samples import TEST_SCAN, insert_lesion
from ra_engine.detection.overlay import overlay_png

TRAIN_SCANS = tuple(SAMPLES_DIR / name for name in ("mni152_2009a_t1.nii.gz", "fsl_mni152_t1_brain.nii.gz",
                                                    "itk_subject_t1.nii.gz"))
BRAIN_MODEL, SMALL_MODEL, CHEST_MODEL = "brain-t1", "brain-t1-demo", "chest-xray"
RADIOGRAPH = "RG1_UNCI.dcm"  # pydicom-data's adult PA chest radiograph (NEMA WG04, MIT)
NOTICE = "Demonstration of the pipeline: research use only, not for diagnosis."


def run_demo(out: Path, *, steps: int | None = None, device: str = "auto", overwrite: bool = False,
             quiet: bool = False, command: list[str] | None = None,
             say: Callable[[str], None] = lambda text: None) -> dict:
    """The demo into `out`: the model (bundled, or trained for `steps` iterations into `out/run`), the test scan
    with its synthetic lesion and the lesion mask, `ra detect`'s outputs of the test scan, demo_summary.json and
    demo_lesion_overlay.png. Returns the summary."""
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise RAError(f"{out} already exists: pass --overwrite to replace the demo there, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if steps is None:
        name = BRAIN_MODEL if (BUNDLED_MODELS_DIR / BRAIN_MODEL / "model.json").is_file() else SMALL_MODEL
        model_dir = BUNDLED_MODELS_DIR / name
        if not (model_dir / "model.json").is_file():
            raise RAError(f"the bundled brain model is missing from {model_dir}: reinstall ra, or train one "
                          "with `ra demo --steps 600`")
        say(f"using the bundled model {name} ({model_dir})")
    else:
        model_dir = train_demo_model(out / "run", steps, device, quiet, command, say)
    model = api.load_model(model_dir, device)

    scan_path = out / "test_scan.nii.gz"
    say(f"detecting anomalies in an unseen subject (Colin27) with a synthetic lesion ({scan_path})")
    scan, truth = insert_lesion(api.read_image(TEST_SCAN))
    api.write_image(scan, scan_path)
    api.write_image(Image(truth, scan.geometry), out / "test_lesion_mask.nii.gz", dtype=np.uint8)
    scan.source = str(scan_path)
    found = api.detect(model, scan)
    report = api.save_detection(model, scan, found, out)
    anomaly = found.anomaly.array
    flagged = found.detections_at(report["threshold"]).array > 0
    lesion = truth > 0
    normal = (anomaly > 0) & ~lesion  # A is 0 outside the brain mask
    summary = {
        "notice": NOTICE,
        "model": str(model_dir),
        "flag_rate": report["flag_rate"],
        "threshold": report["threshold"],
        "scan_score": report["scan_score"],
        "lesion_voxels": int(lesion.sum()),
        "lesion_fraction_flagged": float(flagged[lesion].mean()),
        "lesion_detected": bool(flagged[lesion].mean() > 0.1),
        "normal_fraction_flagged": float(flagged[normal].mean()),
        "mean_anomaly_in_lesion": float(anomaly[lesion].mean()),
        "mean_anomaly_in_normal_brain": float(anomaly[normal].mean()),
    }
    overlay_png(scan, found.anomaly, Image(flagged.astype(np.uint8), scan.geometry), out / "demo_lesion_overlay.png",
                truth=truth)
    say(f"lesion: {summary['lesion_fraction_flagged']:.0%} of its voxels flagged at the {summary['flag_rate']:.0%} "
        f"normal flag rate ({'detected' if summary['lesion_detected'] else 'not detected'}); normal brain flagged: "
        f"{summary['normal_fraction_flagged']:.1%}; mean anomaly lesion/normal: "
        f"{summary['mean_anomaly_in_lesion'] / max(summary['mean_anomaly_in_normal_brain'], 1e-12):.1f}x")
    summary["radiograph"] = radiograph_demo(out / "radiograph", device, say)
    text = json.dumps(summary, indent=2) + "\n"
    atomic_write(out / "demo_summary.json", lambda path: path.write_text(text, encoding="utf-8"))
    say(f"outputs in {out}: test_scan_* (detect's outputs), test_lesion_mask.nii.gz (truth), demo_summary.json, "
        f"demo_lesion_overlay.png (cyan: truth, green: detections), radiograph/ (the chest model's)")
    return summary


def radiograph_demo(out: Path, device: str, say: Callable[[str], None]) -> dict | None:
    """The bundled chest model on pydicom-data's real radiograph, its outputs in `out`; None (with a note) when the
    model or the registry package is not installed."""
    model_dir = BUNDLED_MODELS_DIR / CHEST_MODEL
    if not (model_dir / "model.json").is_file():
        say(f"radiograph: skipped (the bundled {CHEST_MODEL} model is not installed)")
        return None
    if importlib.util.find_spec("data_store") is None:  # pydicom-data's package; pydicom would download instead
        say(f"radiograph: skipped (it is {RADIOGRAPH} of the registry package pydicom-data: pip install pydicom-data)")
        return None
    from pydicom.data import get_testdata_file

    path = get_testdata_file(RADIOGRAPH)
    model = api.load_model(model_dir, device)
    image = api.read_image(path)
    found = api.detect(model, image)
    report = api.save_detection(model, image, found, out)
    percentile = report["scan_percentile_of_normal"]
    say(f"radiograph {RADIOGRAPH} with {CHEST_MODEL}: scan score {report['scan_score']:.4g}"
        f"{f' (percentile of normal {percentile:.0f})' if percentile is not None else ''}, "
        f"{report['flagged_fraction_of_mask']:.1%} of the image flagged; an adult PA radiograph, unlike the "
        f"children's AP ones the model learned: -> {out}")
    return {"input": RADIOGRAPH, "model": CHEST_MODEL, "scan_score": report["scan_score"],
            "scan_percentile_of_normal": percentile, "flagged_fraction": report["flagged_fraction_of_mask"]}


def train_demo_model(run_dir: Path, steps: int, device: str, quiet: bool, command: list[str] | None,
                     say: Callable[[str], None]) -> Path:
    """Trains and calibrates a small RA (64x64) on the bundled normal T1 scans into `run_dir`; returns its model
    directory."""
    arch = api.ArchConfig(image_size=64, latent_dim=64, widths=(16, 32, 64, 128))
    preset = api.preset_config("brain-mri", image_size=64)
    # Batch-statistics BatchNorm and a higher learning rate: in the paper's "reference" BatchNorm mode the network
    # starts unnormalised and learns far too slowly for a demo of minutes on a CPU (validation error unchanged
    # after 600 iterations at 64x64; with batch statistics it falls by 60% within 100).
    config = api.TrainConfig(epochs=100_000, max_steps=steps, batch_size=8, lr=2e-4, patience=100_000,
                             checkpoint_every=0, batchnorm="batch", augment=api.AugmentConfig(flip=preset.flip))
    say(f"training a {arch.image_size}x{arch.image_size} model for {steps} iterations on {len(TRAIN_SCANS)} bundled "
        "normal T1 scans (one held out for validation and calibration of the threshold)")
    progress = api.Progress(bar=not quiet)
    _, model_dir = api.train([str(s) for s in TRAIN_SCANS], run_dir, preset=preset, arch=arch, config=config,
                             device=device, overwrite=True, val_fraction=0.1, progress=progress, command=command)
    progress.close()
    if api.read_card(model_dir).calibration is None:
        raise RAError(f"the demo model in {model_dir} could not be calibrated: see {run_dir / 'train.log'}")
    return model_dir
