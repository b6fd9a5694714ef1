"""Makes a bundled model (ra_engine/resources/models/NAME) from a trained and calibrated model directory: its
weights (float16 with --float16), its card with the description, the data's provenance and the measured figures
added, after checking that detection with the stored weights equals detection with the trained ones within the
stated tolerance on the scans given (`TOLERANCE`: the anomaly maps' mean difference relative to their 99th
percentile, and the detections' Dice at the card's default flag rate), and that the directory is at most 25 MB.

    python scripts/bundle_model.py --model /work/runs/chest_ra --name chest-xray --float16 \\
        --about docs/models/chest-xray.json --check scan1.jpeg scan2.jpeg
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
import ra_engine  # noqa: E402
from ra_engine.models.card import write_card  # noqa: E402
from ra_engine.models.modeldir import save_model_dir  # noqa: E402

MAX_BYTES = 25 * 2**20
# The stored weights must keep the anomaly maps within 2% of their 99th percentile on average and the detections at
# a Dice of 0.95; the largest single-pixel difference is reported but not bounded (CLAHE's local histograms turn a
# tiny change of the reconstruction into a jump at a few pixels).
TOLERANCE = {"anomaly_mean_relative": 0.02, "dice": 0.95}


def compare(original, stored, scans: list[str]) -> dict:
    """The anomaly-map differences (mean and largest, relative to each map's 99th percentile inside the mask; the
    worst scan's) and the smallest Dice of the detections at the default flag rate, over `scans`."""
    worst_mean, worst_max, worst_dice = 0.0, 0.0, 1.0
    scorer = ra_engine.make_scorer(original)
    for path in scans:
        image = ra_engine.read_image(path)
        a, b = ra_engine.detect(original, image, scorer=scorer), ra_engine.detect(stored, image, scorer=scorer)
        inside = a.mask.array > 0
        scale = float(np.percentile(a.anomaly.array[inside], 99)) or 1.0
        difference = np.abs(a.anomaly.array - b.anomaly.array)[inside] / scale
        worst_mean, worst_max = max(worst_mean, float(difference.mean())), max(worst_max, float(difference.max()))
        da, db = a.detections_at().array > 0, b.detections_at().array > 0
        both = float(da.sum() + db.sum())
        worst_dice = min(worst_dice, 2 * float((da & db).sum()) / both if both else 1.0)  # both empty: they agree
    return {"scans": len(scans), "anomaly_mean_difference_relative_to_p99": round(worst_mean, 5),
            "anomaly_max_difference_relative_to_p99": round(worst_max, 5), "detections_min_dice": round(worst_dice, 5),
            "tolerance": TOLERANCE}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the trained, calibrated model (directory or run folder)")
    parser.add_argument("--name", required=True, help="the bundled model's name")
    parser.add_argument("--about", type=Path, required=True,
                        help="JSON with description (text), provenance (dict) and evaluation (dict)")
    parser.add_argument("--float16", action="store_true", help="store the weights in half precision")
    parser.add_argument("--check", nargs="+", required=True, help="scans to compare detection on")
    args = parser.parse_args(argv)
    original = ra_engine.load_model(args.model, "cpu")
    about = json.loads(args.about.read_text())
    card = replace(original.card, name=args.name, description=about["description"], provenance=about["provenance"],
                   evaluation=about["evaluation"])
    target = REPO / "ra_engine" / "resources" / "models" / args.name
    with tempfile.TemporaryDirectory(dir=target.parent) as work:
        staged = Path(work) / args.name
        save_model_dir(staged, original.network.state_dict(), card, float16=args.float16)
        stored = ra_engine.load_model(staged, "cpu")
        check = compare(original, stored, args.check)
        weights = {"dtype": "float16" if args.float16 else "float32", "detection_against_the_trained_weights": check}
        write_card(staged, replace(stored.card, evaluation={**(about["evaluation"] or {}), "stored_weights": weights}))
        size = sum(p.stat().st_size for p in staged.iterdir())
        print(json.dumps({**check, "bytes": size}, indent=1))
        if size > MAX_BYTES:
            print(f"the model is {size / 2**20:.1f} MB, over {MAX_BYTES / 2**20:.0f} MB: use --float16", file=sys.stderr)
            return 2
        if (check["anomaly_mean_difference_relative_to_p99"] > TOLERANCE["anomaly_mean_relative"]
                or check["detections_min_dice"] < TOLERANCE["dice"]):
            print("the stored weights change detection beyond the tolerance: bundle without --float16", file=sys.stderr)
            return 2
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)
    print(f"bundled {args.name} in {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
