"""The `ra` command: one command with sub-commands (train, demo, ...), each with --help."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .cli_args import add_device_option, add_progress_options, positive, stop_on_signals
from .errors import RAError

PAPER = "paper default"


def _widths(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"widths must be comma-separated integers, e.g. 64,128,256,512,512; got {text!r}")


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
    p.add_argument("--preset", required=True, choices=("brain-mri", "xray"),
                   help="brain-mri: align to the bundled reference head, brain only, axial slices; xray: 2D "
                        "radiographs, 98th-percentile scaling, padded square")
    p.add_argument("--out", required=True, type=Path, help="run folder (refused if it exists, unless --resume/--overwrite)")
    p.add_argument("--method", choices=("ra", "sivae", "vae", "ae"), default="ra",
                   help="what to train on the same network, data and schedule: ra (Reversed Auto-Encoder); or a "
                        "baseline for comparison: sivae (Soft-IntroVAE: RA without the reversed embedding loss), vae "
                        "(plain VAE, one step per iteration), ae (plain auto-encoder on D(mu), no sampling, no KL)")
    p.add_argument("--epochs", type=positive(int), default=1500)
    p.add_argument("--max-steps", type=positive(int), default=None,
                   help="stop after this many iterations in all (the run stays resumable)")
    p.add_argument("--batch-size", type=positive(int), default=8, help="global batch, split over torchrun processes")
    p.add_argument("--lr", type=positive(float), default=5e-5, help="Adam learning rate of both halves (constant)")
    p.add_argument("--patience", type=positive(int), default=500, help="early stopping: epochs without a better "
                                                                        "validation reconstruction error")
    p.add_argument("--select", choices=("best", "last"), default="best",
                   help="the weights the model gets: best = the epoch with the lowest validation reconstruction "
                        "error (the paper's early stopping); last = the last iteration's. Resuming a finished run "
                        "with another choice writes its model again")
    p.add_argument("--image-size", type=positive(int), default=128)
    p.add_argument("--latent-dim", type=positive(int), default=128)
    p.add_argument("--widths", type=_widths, default=(64, 128, 256, 512, 512),
                   help="encoder widths, one stage each (the bottleneck is image size / 2^stages)")
    p.add_argument("--batchnorm", choices=("reference", "batch"), default="reference",
                   help="reference: BatchNorm as a learned scale and shift (how the published results were "
                        "trained); batch: batch statistics")
    p.add_argument("--sync-batchnorm", action="store_true", help="with --batchnorm batch under torchrun on GPUs")
    p.add_argument("--amp", action="store_true", help="bfloat16 autocast (CUDA)")
    add_device_option(p)
    p.add_argument("--seed", type=int, default=2109)
    p.add_argument("--workers", type=int, default=0, help="processes that preprocess scans into the slice cache")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of whole scans held out for validation")
    p.add_argument("--checkpoint-every", type=int, default=500, help="also checkpoint every N iterations (0: only "
                                                                     "at epoch ends and stops)")
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
    from .augment import AugmentConfig
    from .model import ArchConfig
    from .preprocess import preset_config
    from .progress import Progress
    from .trainer import TrainConfig
    from .training import run_training

    if args.resume and args.overwrite:
        raise RAError("--resume and --overwrite exclude each other: choose one")
    arch = ArchConfig(image_size=args.image_size, latent_dim=args.latent_dim, widths=args.widths)
    preset = preset_config(args.preset, image_size=args.image_size)
    config = TrainConfig(method=args.method, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                         seed=args.seed, patience=args.patience, batchnorm=args.batchnorm,
                         sync_batchnorm=args.sync_batchnorm, amp=args.amp, max_steps=args.max_steps,
                         checkpoint_every=args.checkpoint_every, select=args.select,
                         augment=AugmentConfig(flip=preset.flip))
    progress = Progress(args.progress_json, bar=not args.quiet and args.progress_json != "-",
                        stop_file=args.stop_file)
    with stop_on_signals(progress):
        result, model_dir = run_training(args.data, preset, args.out, arch, config, device=args.device,
                                         workers=args.workers, resume=args.resume, overwrite=args.overwrite,
                                         val_fraction=args.val_fraction, cache_dir=args.cache_dir,
                                         progress=progress, command=args.command_line, calibrate=args.calibrate)
    progress.close()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports
    if model_dir is None:
        print(f"training stopped at step {result.state.step}; continue with --resume --out {args.out}",
              file=sys.stderr)
        return 130 if result.stopped_by == "cancelled" else 0
    print(f"model written to {model_dir}", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="ra", description="Reversed Auto-Encoders (RA) for unsupervised anomaly detection in medical images. "
                               "Research use only, not for diagnosis.")
    parser.add_argument("--version", action="version", version=f"ra {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    from .calibrate_cli import add_calibrate_parser
    from .demo import add_demo_parser
    from .detect_cli import add_detect_parser
    from .eval_cli import add_eval_parser
    from .models_cli import add_models_parser

    add_train_parser(sub)
    add_detect_parser(sub)
    add_calibrate_parser(sub)
    add_eval_parser(sub)
    add_models_parser(sub)
    add_demo_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.command_line = ["ra", *argv]  # recorded in model cards, so that every result can be reproduced
    try:
        return args.run(args)
    except RAError as exc:
        print(f"ra {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ra {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
