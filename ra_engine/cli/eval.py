"""`ra eval`: evaluate a model on a labelled test set (image, pixel and lesion level) and write the figures.

The test set is a CSV with the columns image, mask (optional: the lesion mask on the image's grid), label
(optional: 0 normal, 1 abnormal; without it, a scan is abnormal when its mask marks a lesion) and type (optional:
the anomaly type, for per-type figures). Writes into --out: metrics.json (every figure, the model card's name and
weights sha256, the score kind, flag rates and thresholds, counts, the command), metrics.md (the same as tables),
pixel_curves.png and image_curves.png (ROC and precision-recall), per_type.png (lesion detection rate and AP per
anomaly type) and examples.png (input, pseudo-healthy, anomaly map, detections, truth of up to --examples scans).
Definitions: ra_engine/evaluation/metrics.py. Research use only, not for diagnosis.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ra_engine import api
from ra_engine.cli.options import (
    add_device_option,
    add_progress_options,
    flag_rate,
    positive,
    stop_on_signals,
)
from ra_engine.core.errors import Cancelled
from ra_engine.core.progress import Progress
from ra_engine.evaluation.metrics import DEFAULT_FLAG_RATES
from ra_engine.evaluation.report import summary
from ra_engine.scoring.kinds import SCORE_KINDS


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def add_eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a model on a labelled test set (image, pixel and lesion level)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR_OR_NAME",
                   help="a model directory or the name of a registered model (`ra models list`)")
    p.add_argument("--data", required=True, metavar="TEST",
                   help="the test set: a CSV with columns image[,mask,label,type] (relative paths start at the "
                        "CSV's folder), or a folder/glob whose `<name>_mask.*` files are lesion masks")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--flag-rates", type=flag_rate, nargs="+", default=list(DEFAULT_FLAG_RATES), metavar="RATE",
                   help="normal flag rates (fractions such as 0.05 or percentages such as 5%%) whose calibrated "
                        "thresholds give the Dice and lesion detection figures (default: 0.05 0.01)")
    p.add_argument("--score", choices=tuple(SCORE_KINDS), default="full",
                   help="full: the RA score L1 x LPIPS x LPIPS-after-CLAHE; l1: |x - x_ph| only (ablation)")
    p.add_argument("--calibration-data", nargs="+", default=None, metavar="NORMALS",
                   help="normal scans held out from training (folder, glob, CSV or paths) to calibrate the "
                        "thresholds for the chosen score; default: the model card's table for --score full, the "
                        "test set's own normal scans (in-sample, reported so) for --score l1")
    add_device_option(p)
    p.add_argument("--batch-size", type=positive(int), default=8, help="slices per network pass (default: 8)")
    p.add_argument("--examples", type=_count, default=6, metavar="N",
                   help="scans shown in examples.png, those with lesions first (default: 6; 0: no examples.png)")
    p.add_argument("--overwrite", action="store_true", help="replace the outputs of an earlier evaluation in --out")
    add_progress_options(p, quiet_help="no progress bar and no summary")
    p.set_defaults(run=cmd_eval)


def cmd_eval(args) -> int:
    progress = Progress(args.progress_json, bar=not args.quiet and args.progress_json != "-")
    try:
        with stop_on_signals(progress):
            metrics = api.evaluate(args.model, args.data, out=args.out, score=args.score, flag_rates=args.flag_rates,
                                   calibration_data=args.calibration_data, device=args.device,
                                   batch_size=args.batch_size, examples=args.examples, overwrite=args.overwrite,
                                   progress=progress, command=getattr(args, "command_line", None))
    except Cancelled:
        print("ra eval: cancelled; nothing was written", file=sys.stderr)
        return 130
    finally:
        progress.close()
    if not args.quiet:
        print(summary(metrics, args.out), file=sys.stderr)
    return 0
