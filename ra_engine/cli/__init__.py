"""The `ra` command: one command with sub-commands (train, detect, calibrate, eval, models, demo), each with --help.
Each sub-command parses its options and calls the Python API (`ra_engine.api`)."""
from __future__ import annotations

import argparse
import sys

from ra_engine.cli.calibrate import add_calibrate_parser
from ra_engine.cli.demo import add_demo_parser
from ra_engine.cli.detect import add_detect_parser
from ra_engine.cli.eval import add_eval_parser
from ra_engine.cli.models import add_models_parser
from ra_engine.cli.train import add_train_parser
from ra_engine.core.errors import Cancelled, RAError
from ra_engine.core.resources import VERSION


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ra", description="Reversed Auto-Encoders (RA) for unsupervised anomaly detection in medical images. "
                               "Research use only, not for diagnosis.")
    parser.add_argument("--version", action="version", version=f"ra {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
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
    except Cancelled as exc:  # stopped on request (a progress callback, a stop file, a signal): resumable
        print(f"ra {args.command}: {exc}", file=sys.stderr)
        return 130
    except RAError as exc:
        print(f"ra {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ra {args.command}: interrupted", file=sys.stderr)
        return 130
