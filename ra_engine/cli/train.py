"""`ra train`: train RA (or a baseline) on a cohort of normal scans. Every default and choice comes from the
configuration types (`TrainConfig`, `ArchConfig`, the presets), so that the command and the Python API agree."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ra_engine import api
from ra_engine.cli.options import (
    add_device_option,
    add_progress_options,
    positive,
    stop_on_signals,
)
from ra_engine.core.errors import RAError
from ra_engine.network.config import BATCHNORM_MODES
from ra_engine.training.config import SELECTIONS
from ra_engine.training.pipeline import VAL_FRACTION

TRAIN = api.TrainConfig()
ARCH = api.ArchConfig()


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be comma-separated integers, e.g. "
                                         f"{','.join(map(str, ARCH.widths))}; got {text!r}") from None


def add_train_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train RA on a cohort of normal scans",
        description="Train a Reversed Auto-Encoder on normal scans only. The defaults are the paper's configuration "
                    "and schedule. Writes RUN_DIR/checkpoints (resumable), RUN_DIR/train.log and, when training "
                    "ends, the model directory RUN_DIR/model. Several GPUs or nodes: start the same command with "
                    "`torchrun --nproc-per-node N -m ra_engine.cli train ...`.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", required=True, nargs="+",
                   help="normal scans: a folder (searched recursively; `<name>_mask.*` files pair as brain/body "
                        "masks), a glob, a CSV with columns image[,mask], or several paths")
    p.add_argument("--preset", required=True, choices=api.PRESETS,
                   help="brain-mri: align to the bundled reference head, brain only, axial slices; xray: 2D "
                        "radiographs, 98th-percentile scaling, padded square")
    p.add_argument("--out", required=True, type=Path,
                   help="run folder (refused if it exists, unless --resume/--overwrite)")
    p.add_argument("--method", choices=tuple(api.METHODS), default=TRAIN.method,
                   help="what to train on the same network, data and schedule: ra (Reversed Auto-Encoder); or a "
                        "baseline for comparison: sivae (Soft-IntroVAE: RA without the reversed embedding loss), vae "
                        "(plain VAE, one step per iteration), ae (plain auto-encoder on D(mu), no sampling, no KL)")
    p.add_argument("--epochs", type=positive(int), default=TRAIN.epochs)
    p.add_argument("--max-steps", type=positive(int), default=TRAIN.max_steps,
                   help="stop after this many iterations in all (the run stays resumable)")
    p.add_argument("--batch-size", type=positive(int), default=TRAIN.batch_size,
                   help="global batch, split over torchrun processes")
    p.add_argument("--lr", type=positive(float), default=TRAIN.lr, help="Adam learning rate of both halves (constant)")
    p.add_argument("--patience", type=positive(int), default=TRAIN.patience,
                   help="early stopping: epochs without a better validation reconstruction error")
    p.add_argument("--select", choices=SELECTIONS, default=TRAIN.select,
                   help="the weights the model gets: best = the epoch with the lowest validation reconstruction "
                        "error (the paper's early stopping); last = the last iteration's. Resuming a finished run "
                        "with another choice writes its model again")
    p.add_argument("--image-size", type=positive(int), default=ARCH.image_size)
    p.add_argument("--headroom", type=positive(float), default=1.0,
                   help="the value the brain's (body's) high intensity percentile maps to before the clip at 1: 1 is "
                        "the paper's; 0.75 keeps lesions brighter than normal tissue from being flattened "
                        "(docs/BENCHMARKS.md)")
    p.add_argument("--latent-dim", type=positive(int), default=ARCH.latent_dim)
    p.add_argument("--widths", type=_widths, default=ARCH.widths,
                   help="encoder widths, one stage each (the bottleneck is image size / 2^stages)")
    p.add_argument("--batchnorm", choices=BATCHNORM_MODES, default=TRAIN.batchnorm,
                   help="reference: BatchNorm as a learned scale and shift (how the published results were "
                        "trained); batch: batch statistics")
    p.add_argument("--sync-batchnorm", action="store_true", help="with --batchnorm batch under torchrun on GPUs")
    p.add_argument("--amp", action="store_true",
                   help="bfloat16 autocast: on CUDA GPUs, and on CPUs with AVX512-BF16 or AMX, where it measured "
                        "1.6-2.2x faster (docs/BENCHMARKS.md); weights and optimiser states stay float32")
    p.add_argument("--acquisition", action="store_true",
                   help="simulate other acquisitions in training (blur along one axis, bias field, gamma, noise; "
                        "docs/METHOD.md): for clinical scans unlike the training cohort; off in the paper")
    add_device_option(p)
    p.add_argument("--seed", type=int, default=TRAIN.seed)
    p.add_argument("--workers", type=int, default=0, help="processes that preprocess scans into the slice cache")
    p.add_argument("--val-fraction", type=float, default=VAL_FRACTION,
                   help="share of whole scans held out for validation (and calibration) when --val-data is not given")
    p.add_argument("--val-data", nargs="+", default=None, metavar="NORMALS",
                   help="normal scans to validate (and calibrate) on instead of a random share of --data, e.g. other "
                        "patients: a folder, glob, CSV or several paths")
    p.add_argument("--checkpoint-every", type=int, default=TRAIN.checkpoint_every,
                   help="also checkpoint every N iterations (0: only at epoch ends and stops)")
    p.add_argument("--cache-dir", type=Path, default=None, help="slice cache folder (default RUN_DIR/cache)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="do not calibrate the detection thresholds on the held-out scans after training")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace the checkpoints and model in --out")
    add_progress_options(p)
    p.add_argument("--stop-file", type=Path, default=None, metavar="PATH",
                   help="stop cleanly (checkpoint, exit 130) when this file appears, as on SIGTERM; for launchers "
                        "on systems without signals (the Slicer panel on Windows)")
    p.set_defaults(run=cmd_train)


def cmd_train(args) -> int:
    if args.resume and args.overwrite:
        raise RAError("--resume and --overwrite exclude each other: choose one")
    arch = api.ArchConfig(image_size=args.image_size, latent_dim=args.latent_dim, widths=args.widths)
    preset = api.preset_config(args.preset, image_size=args.image_size, headroom=args.headroom)
    config = api.TrainConfig(method=args.method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, patience=args.patience, batchnorm=args.batchnorm,
                             sync_batchnorm=args.sync_batchnorm, amp=args.amp, max_steps=args.max_steps,
                             checkpoint_every=args.checkpoint_every, select=args.select,
                             augment=api.AugmentConfig(flip=preset.flip, acquisition=(
                                 api.AcquisitionConfig() if args.acquisition else None)))
    progress = api.Progress(args.progress_json, bar=not args.quiet and args.progress_json != "-",
                            stop_file=args.stop_file)
    with stop_on_signals(progress):
        result, model_dir = api.train(args.data, args.out, preset=preset, arch=arch, config=config,
                                      device=args.device, workers=args.workers, resume=args.resume,
                                      overwrite=args.overwrite, val_fraction=args.val_fraction,
                                      val_data=args.val_data,
                                      cache_dir=args.cache_dir, progress=progress, command=args.command_line,
                                      calibrate=args.calibrate)
    progress.close()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports
    if model_dir is None:
        print(f"training stopped at step {result.state.step}; continue with --resume --out {args.out}",
              file=sys.stderr)
        return 130 if result.stopped_by == "cancelled" else 0
    print(f"model written to {model_dir}", file=sys.stderr)
    return 0
