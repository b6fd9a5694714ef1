"""The intensities the network sees at the lesions of a benchmark set: why some anomaly types score low.

Each test scan with a lesion mask is preprocessed as detection does (the set's preset at --image-size), its mask is
mapped into the model space (nearest neighbour), and per anomaly type (mean over scans) the script reports the
median model-space intensity (0..1) of the lesion and of the tissue around it (a shell --shell voxels wide inside
the brain/body mask), their difference (the lesion's contrast, what a reconstruction error can see), and the share
of lesion voxels and of the rest of the brain/body clipped at 1 by the preset's upper percentile. With --model, also
the mean reconstruction error |x - D(mu(x))| (clamped to 0..1, as scoring does) in the lesion and in the rest of the
brain/body: a lesion stands out only where its error exceeds the model's error on normal tissue.

    python benchmarks/lesion_contrast.py --set runs/benchmark/sets/brain --image-size 64 \
        [--model runs/benchmark/runs/smoke/brain/ra-s0/model]
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
from scipy import ndimage

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ra_engine.io.images import read_image  # noqa: E402
from ra_engine.preprocess.pipeline import preprocess
from ra_engine.preprocess.presets import preset_config  # noqa: E402


def lesion_figures(image_path: Path, mask_path: Path, preset: str, image_size: int, shell: int,
                   model=None) -> dict | None:
    """The figures of one scan (see the module docstring); None when its lesion mask is empty (a normal scan)."""
    slices = preprocess(read_image(image_path), preset_config(preset, image_size=image_size))
    lesion = slices.space.from_input_grid(read_image(mask_path, validate=False).array > 0, "nearest")
    lesion &= slices.masks
    if not lesion.any():
        return None
    around = ndimage.binary_dilation(lesion, iterations=shell) & slices.masks & ~lesion
    rest = slices.masks & ~lesion
    images = slices.images
    figures = {"lesion_median": float(np.median(images[lesion])),
               "around_median": float(np.median(images[around])),
               "contrast": float(np.median(images[lesion]) - np.median(images[around])),
               "lesion_clipped": float(np.mean(images[lesion] >= 1.0)),
               "rest_clipped": float(np.mean(images[rest] >= 1.0))}
    if model is not None:
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(images).unsqueeze(1).to(model.device)
            error = (model.inference_network.reconstruct(x.contiguous(memory_format=torch.channels_last))
                     .clamp(0, 1) - x).abs()[:, 0].cpu().numpy()
        figures.update(lesion_error=float(error[lesion].mean()), rest_error=float(error[rest].mean()))
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", type=Path, required=True, help="a benchmark set folder holding test.csv")
    parser.add_argument("--preset", default="brain-mri", choices=("brain-mri", "xray"))
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--shell", type=int, default=2, help="width in model voxels of the tissue around a lesion")
    parser.add_argument("--model", default=None, help="a model (name or folder) whose reconstruction error to show")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    args = parser.parse_args(argv)
    model = None
    if args.model:
        import ra_engine

        model = ra_engine.load_model(args.model, device="cpu")
        args.image_size = model.card.preset.image_size

    by_type: dict[str, list[dict]] = defaultdict(list)
    with open(args.set / "test.csv", newline="") as handle:
        for row in csv.DictReader(handle):
            if not row.get("mask"):
                continue
            figures = lesion_figures(args.set / row["image"], args.set / row["mask"], args.preset, args.image_size,
                                     args.shell, model)
            if figures is not None:
                by_type[row.get("type") or "lesion"].append(figures)
    keys = ["lesion_median", "around_median", "contrast", "lesion_clipped", "rest_clipped"]
    keys += ["lesion_error", "rest_error"] if model is not None else []
    summary = {kind: {"scans": len(rows), **{k: round(float(np.mean([r[k] for r in rows])), 4) for k in keys}}
               for kind, rows in sorted(by_type.items())}
    errors = model is not None
    print("| type | scans | lesion median | around median | contrast | lesion clipped at 1 | rest clipped at 1 |"
          + (" error in lesion | error in rest |" if errors else ""))
    print("|---|---|---|---|---|---|---|" + ("---|---|" if errors else ""))
    for kind, s in summary.items():
        print(f"| {kind} | {s['scans']} | {s['lesion_median']:.3f} | {s['around_median']:.3f} | {s['contrast']:+.3f} "
              f"| {s['lesion_clipped']:.0%} | {s['rest_clipped']:.1%} |"
              + (f" {s['lesion_error']:.3f} | {s['rest_error']:.3f} |" if errors else ""))
    if args.out:
        args.out.write_text(json.dumps({"command": " ".join(sys.argv), "set": str(args.set), "preset": args.preset,
                                        "image_size": args.image_size, "shell": args.shell, "model": args.model,
                                        "types": summary}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
