"""Argument types and options shared by the `ra` sub-commands, so that each means the same everywhere."""
from __future__ import annotations

import argparse
import signal
import sys

from ra_engine.core.errors import DataError
from ra_engine.core.resources import DEVICE_CHOICES
from ra_engine.thresholds.table import validate_flag_rate


def positive(kind):
    """argparse type: a positive number of `kind` (int or float)."""

    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value

    return parse


def flag_rate(text: str) -> float:
    """argparse type of --flag-rate: a fraction (0.05) or a percentage (5%), within the calibrated range."""
    number = text.strip()
    try:
        return validate_flag_rate(float(number[:-1]) / 100 if number.endswith("%") else float(number))
    except ValueError as exc:  # DataError is a ValueError
        raise argparse.ArgumentTypeError(str(exc) if isinstance(exc, DataError) else
                                         f"give a fraction such as 0.05 or a percentage such as 5%, not {text!r}")


def add_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES,
                   help="auto: a CUDA GPU, then Apple MPS, then the CPU")


def add_progress_options(p: argparse.ArgumentParser, quiet_help: str = "no progress bar") -> None:
    p.add_argument("--progress-json", default=None, metavar="PATH",
                   help="write progress events as JSON lines to PATH ('-': standard output)")
    p.add_argument("--quiet", action="store_true", help=quiet_help)


class stop_on_signals:
    """Within it, SIGINT/SIGTERM ask the job behind `progress` to stop cleanly at its next step (training writes a
    checkpoint); a second SIGINT interrupts at once."""

    def __init__(self, progress):
        self.progress = progress

    def _handle(self, signum, frame):
        if self.progress.cancelled and signum == signal.SIGINT:
            raise KeyboardInterrupt
        print("\nstopping after this step (press Ctrl-C again to abort at once)", file=sys.stderr)
        self.progress.cancel()

    def __enter__(self):
        self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        return False
