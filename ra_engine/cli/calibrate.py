"""`ra calibrate`: calibrate a model's detection thresholds and score percentiles on normal scans."""
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
from ra_engine.core.progress import Progress
from ra_engine.thresholds.table import DEFAULT_FLAG_RATE, MIN_SCANS_FOR_SCAN_SCORES


def add_calibrate_parser(sub) -> None:
    p = sub.add_parser(
        "calibrate", help="calibrate a model's thresholds and score percentiles on normal scans",
        description="Run the model on normal scans held out from training and store, in its model card, a table "
                    "that turns any flag rate (the share of normal brain/body pixels flagged, 0.1% to 20%) into a "
                    "threshold of the anomaly map, and the distribution of normal per-slice scores (and whole-scan "
                    f"scores, from {MIN_SCANS_FOR_SCAN_SCORES} scans on) so that scores are reported as percentiles "
                    "of normal. The weights are not changed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR_OR_NAME",
                   help="a model directory or the name of a registered model (`ra models list`)")
    p.add_argument("--data", required=True, nargs="+", metavar="NORMALS",
                   help="normal scans not used in training: a folder (searched recursively; `<name>_mask.*` files "
                        "pair as brain/body masks), a glob, a CSV with columns image[,mask], or several paths")
    p.add_argument("--flag-rate", type=flag_rate, default=DEFAULT_FLAG_RATE,
                   help="the default flag rate stored in the card, as a fraction (0.05) or a percentage (5%%); "
                        "0.01 is the strict choice")
    p.add_argument("--image-score", choices=tuple(api.IMAGE_SCORES), default=None,
                   help="the image-level score the card names from now on (its slice and scan percentiles are of "
                        "it): " + "; ".join(f"{k}: {v}" for k, v in api.IMAGE_SCORES.items()) + " (default: keep the "
                        "card's, mean_a for a new model)")
    add_device_option(p)
    p.add_argument("--batch-size", type=positive(int), default=8, help="slices per forward pass")
    add_progress_options(p, quiet_help="no progress bar and no summary")
    p.set_defaults(run=cmd_calibrate)


def cmd_calibrate(args) -> int:
    model_dir = api.resolve_model(args.model)
    progress = Progress(args.progress_json, bar=not args.quiet and args.progress_json != "-")
    try:
        with stop_on_signals(progress):
            calibration = api.calibrate(model_dir, args.data, device=args.device, progress=progress,
                                        batch_size=args.batch_size, flag_rate=args.flag_rate,
                                        command=getattr(args, "command_line", None), image_score=args.image_score)
    except Exception as exc:
        progress.emit("error", message=str(exc))
        raise
    finally:
        progress.close()
    if not args.quiet:
        scan_percentiles = ("yes" if calibration.scan_scores else
                            f"no (fewer than {calibration.min_scans_for_scan_scores} scans)")
        print(f"calibrated {Path(model_dir)} on {len(calibration.scans)} scan(s), {calibration.n_foreground_pixels} "
              f"foreground pixels ({len(calibration.skipped)} skipped); whole-scan percentiles: {scan_percentiles}",
              file=sys.stderr)
        for rate in sorted({0.001, 0.01, calibration.default_flag_rate, 0.05, 0.2}):
            marker = "  (default)" if rate == calibration.default_flag_rate else ""
            print(f"  flag rate {rate:6.1%}: threshold {calibration.threshold(rate):.6g}{marker}", file=sys.stderr)
    return 0
