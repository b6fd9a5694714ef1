"""`ra detect`: anomaly detection on scans or radiographs with a trained (and calibrated) model.

Writes, per input, into --out, in the input's format where it can hold them (NRRD stays NRRD, MetaImage stays
MetaImage, NIfTI, DICOM and 2D pictures give NIfTI), with the input's exact shape, spacing, origin and direction:
<name>_pseudo_healthy (the reconstruction, in the input's intensity units), <name>_anomaly_map (float32),
<name>_detections (uint8 label map, 1 = flagged), <name>_scores.json (whole-scan and per-slice scores,
percentiles of normal, threshold and flag rate used, detected regions with size and position) and
<name>_overlay.png. Under torchrun (torchrun --nproc-per-node N -m ra_engine.cli detect ...) the inputs are shared
among the processes, one GPU each, and each input's outputs are written once. Research use only, not for diagnosis.
"""
from __future__ import annotations

import argparse
import os
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
from ra_engine.detection.files import MASK_MODES


def _threshold(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"the threshold on the anomaly map must be 0 or more, got {text}")
    return value


def add_detect_parser(sub) -> None:
    p = sub.add_parser("detect", help="detect anomalies in scans or radiographs with a trained model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="scans or radiographs: image files, DICOM series folders, folders (searched recursively), "
                        "or a CSV with the columns image[,mask] (mask: the brain/body mask)")
    p.add_argument("--model", required=True, help="a model directory, a run folder of `ra train`, or the name of a "
                                                   "registered model (`ra models list`)")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--flag-rate", type=flag_rate, default=None, metavar="RATE",
                   help="share of normal brain/body pixels that would be flagged, 0.1%% to 20%% (0.001 to 0.2); the "
                        "model's calibration turns it into a threshold (default: the model card's, normally 5%%)")
    p.add_argument("--threshold", type=_threshold, default=None,
                   help="threshold on the anomaly map instead of a flag rate (needed for an uncalibrated model)")
    p.add_argument("--mask", choices=MASK_MODES, default="none",
                   help="brain/body masks: none, the model's own (the reference brain, the whole radiograph) unless a "
                        "CSV names one; auto, also a `<name>_mask.*` or `<name>_seg.*` file beside an input (a brain "
                        "mask must cover a brain: a lesion mask is refused). Each input's report says which mask it "
                        "used (default: none)")
    add_device_option(p)
    p.add_argument("--amp", action="store_true",
                   help="run the network under bfloat16 autocast: 2.3x faster network on CPUs with AVX512-BF16, "
                        "anomaly maps within 0.03 (about 15%% of their 99th percentile) and detections overlapping by "
                        "Dice 0.96 with the float32 default on the bundled model (docs/BENCHMARKS.md)")
    p.add_argument("--batch-size", type=positive(int), default=8,
                   help="slices per network pass (default: 8; measured fastest on CPUs, see docs/BENCHMARKS.md)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist already")
    p.add_argument("--force", action="store_true",
                   help="run even when a DICOM's modality is not the model's (e.g. CT given to a brain MRI model)")
    add_progress_options(p, quiet_help="no progress bar and no per-input summary")
    p.set_defaults(run=cmd_detect)


def cmd_detect(args) -> int:
    if args.flag_rate is not None and args.threshold is not None:
        raise api.RAError("--flag-rate and --threshold exclude each other: give one")
    lead = int(os.environ.get("RANK", "0")) == 0  # under torchrun, the first process reports
    progress = Progress(args.progress_json if lead else None,
                        bar=lead and not args.quiet and args.progress_json != "-")
    complain = lambda line: print(line, file=sys.stderr)  # noqa: E731
    say = (lambda line: None) if args.quiet else complain
    with stop_on_signals(progress):
        result = api.detect_files(args.model, args.inputs, args.out, flag_rate=args.flag_rate,
                                  threshold=args.threshold, masks=args.mask, device=args.device, amp=args.amp,
                                  batch_size=args.batch_size, overwrite=args.overwrite, force=args.force,
                                  progress=progress, say=say, complain=complain)
    progress.close()
    if lead and result.unused_masks:
        print(f"ra detect: {result.unused_masks} `<name>_mask` file(s) beside the inputs were not used; pass --mask "
              "auto to use them as brain/body masks", file=sys.stderr)
    if result.cancelled:
        if lead:
            print("ra detect: cancelled; the outputs of the inputs finished before were kept", file=sys.stderr)
        return 130
    if result.failed:
        if lead:
            print(f"ra detect: {len(result.failed)} of {result.total} input(s) failed (no output written for them): "
                  f"{', '.join(image for image, _ in result.failed)}", file=sys.stderr)
        return 2
    return 0
