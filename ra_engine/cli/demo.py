"""`ra demo`: detect a synthetic lesion in an unseen brain with the bundled demonstration model (`ra_engine.demo`)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ra_engine.cli.options import add_device_option, positive
from ra_engine.demo import SMALL_MODEL, run_demo
from ra_engine.demo import __doc__ as DEMO


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="the bundled models on a synthetic lesion in an unseen brain and on a real radiograph",
                       description=DEMO, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="output folder")
    p.add_argument("--steps", type=positive(int), default=None,
                   help=f"train a new small model for this many iterations on the three bundled normal T1 scans (a few "
                        f"minutes for 600; how {SMALL_MODEL} was made) instead of using the bundled brain model")
    add_device_option(p)
    p.add_argument("--overwrite", action="store_true", help="replace an earlier demo in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_demo)


def cmd_demo(args) -> int:
    run_demo(args.out, steps=args.steps, device=args.device, overwrite=args.overwrite, quiet=args.quiet,
             command=args.command_line, say=lambda text: print(f"[ra demo] {text}", file=sys.stderr))
    return 0
