"""Choosing the compute device."""
from __future__ import annotations

import os
import warnings

import torch

from ra_engine.core.errors import RAError
from ra_engine.core.resources import DEVICE_CHOICES


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" picks CUDA, then Apple MPS, then the CPU; an explicit choice that is not available is an error.
    Under torchrun, "cuda"/"auto" take the GPU of this process's LOCAL_RANK."""
    if name not in DEVICE_CHOICES and not name.startswith("cuda:"):
        raise RAError(f"unknown device {name!r}: choose one of {', '.join(DEVICE_CHOICES)}")
    cuda = torch.cuda.is_available()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda else "mps" if mps else "cpu"
    if name.startswith("cuda"):
        if not cuda:
            raise RAError("--device cuda was asked for but no CUDA GPU is available to PyTorch: use --device cpu "
                          "(or auto), or install a CUDA build of PyTorch")
        if name == "cuda":
            name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    if name == "mps" and not mps:
        raise RAError("--device mps was asked for but Apple MPS is not available: use --device cpu or auto")
    if name == "cpu" and cuda:
        warnings.warn("running on the CPU although a CUDA GPU is available (use --device auto to use it)")
    return torch.device(name)
