"""The files bundled with ra (`ra_engine/resources`, listed with their sources and licences in its README.md), and
the defaults written once for the whole engine."""
from __future__ import annotations

from pathlib import Path

VERSION = "0.1.0"  # of ra (pyproject.toml reads it from here)

RESOURCES = Path(__file__).resolve().parent.parent / "resources"
# The reference heads for alignment, by name: Colin27 at 1.5 mm (head, brain, brain mask).
REFERENCES = {"colin27": RESOURCES / "reference"}
BUNDLED_MODELS_DIR = RESOURCES / "models"  # models that ship with ra, found by name after the registered ones
LPIPS_DIR = RESOURCES / "lpips"  # the LPIPS AlexNet backbone, so that the default score works offline
SAMPLES_DIR = RESOURCES / "samples"  # normal T1 scans of the demonstration

SEED = 2109  # the paper's seed: training, data splits, registration sampling, calibration sampling
LPIPS_BACKBONE = "alex"  # the default LPIPS backbone (the paper's SqueezeNet weights ship in no registry package)
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")  # "auto": a CUDA GPU, then Apple MPS, then the CPU
