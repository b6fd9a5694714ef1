"""The trivial pixel score a model must beat: the raw intensity inside the brain, in its better direction (chosen with
the labels, so an upper bound of what intensity alone gives), on the same pixels `ra eval` scores (the preset's
brain mask mapped onto each scan's grid), against the lesion masks of a test list (`ra eval`'s CSV).

    python benchmarks/trivial_pixels.py --data ms.csv --image-size 64 --out trivial_ms.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import ra_engine  # noqa: E402
from ra_engine.evaluation.metrics import lesion_mask_on_grid  # noqa: E402
from ra_engine.preprocess.pipeline import preprocess  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from sklearn.metrics import average_precision_score, roc_auc_score

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="CSV with columns image, mask (the lesion mask)")
    parser.add_argument("--preset", default="brain-mri")
    parser.add_argument("--image-size", type=int, default=64, help="the model's (the brain mask's resolution)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    preset = ra_engine.preset_config(args.preset, image_size=args.image_size)
    values, truths, per_scan = [], [], []
    for source in ra_engine.list_sources(args.data):
        image = ra_engine.read_image(source.image)
        slices = preprocess(image, preset)
        brain = slices.space.to_input_grid(slices.masks.astype(np.uint8), "nearest", positions=slices.positions) > 0
        truth = lesion_mask_on_grid(ra_engine.read_image(source.mask, validate=False), image) > 0
        v, t = image.array[brain].astype(np.float64), truth[brain]
        values.append(v)
        truths.append(t)
        per_scan.append({"image": Path(source.image).name, "brain_pixels": int(brain.sum()),
                         "lesion_pixels_in_brain": int(t.sum()), "lesion_pixels": int(truth.sum())})
    v, t = np.concatenate(values), np.concatenate(truths)
    figures = {}
    for name, score in (("intensity", v), ("negative intensity", -v)):
        figures[name] = {"pixel_auroc": float(roc_auc_score(t, score)), "pixel_ap": float(average_precision_score(t, score))}
    best = max(figures, key=lambda k: figures[k]["pixel_auroc"])
    result = {"data": str(args.data), "preset": preset.to_dict(), "scans": per_scan, "figures": figures,
              "better_direction": best, "prevalence": float(t.mean()),
              "command": ["python", "benchmarks/trivial_pixels.py", *(argv if argv is not None else sys.argv[1:])]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for name, f in figures.items():
        print(f"{name:18s} pixel AUROC {f['pixel_auroc']:.3f}  AP {f['pixel_ap']:.3f}")
    print(f"better direction: {best}; lesion prevalence in the brain {t.mean():.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
