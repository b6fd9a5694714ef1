"""Does training collapse onto an all-black output? The first iterations of one method on a set's training scans,
with the reconstruction of 64 of its slices printed every 10 iterations.

With BatchNorm in the paper's reference mode (a learned scale and shift, no normalisation), the decoder's output
sigmoid can saturate within a few dozen iterations on brain slices, which are mostly black background; no gradient
revives it and the validation error stops moving (`ra train` warns when it sees it). This script shows it in
minutes instead of epochs, for any configuration:

    python benchmarks/bn_collapse.py --set runs/benchmark/sets/brain --method ae --batchnorm reference
    python benchmarks/bn_collapse.py --set runs/benchmark/sets/brain --method ae --batchnorm batch

Defaults: the paper's network (128x128, widths 64-128-256-512-512, latent 128), lr 5e-5, batch 8, seed 2109, the
first 4 scans of the set's train.csv, 30 iterations. A line per 10 iterations: mean and maximum of the
reconstructions (eval mode, as validation and detection see them) and their mean squared error.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ra_engine.io.images import read_image  # noqa: E402
from ra_engine.network.config import ArchConfig
from ra_engine.network.model import set_batchnorm_mode  # noqa: E402
from ra_engine.preprocess.pipeline import preprocess
from ra_engine.preprocess.presets import preset_config  # noqa: E402
from ra_engine.io.sources import list_sources  # noqa: E402
from ra_engine.training.config import INTROSPECTIVE, TrainConfig
from ra_engine.training.trainer import baseline_iteration, build_model, train_iteration  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", type=Path, required=True, help="a benchmark set folder holding train.csv")
    parser.add_argument("--preset", default="brain-mri", choices=("brain-mri", "xray"))
    parser.add_argument("--method", default="ra", choices=("ra", "sivae", "vae", "ae"))
    parser.add_argument("--batchnorm", default="reference", choices=("reference", "batch"))
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--widths", default="64,128,256,512,512")
    parser.add_argument("--latent-dim", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--scans", type=int, default=4, help="training scans to take from train.csv")
    parser.add_argument("--seed", type=int, default=2109)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    preset = preset_config(args.preset, image_size=args.image_size)
    stacks = []
    for source in list_sources(str(args.set / "train.csv"))[:args.scans]:
        slices = preprocess(read_image(source.image), preset)
        stacks.append(slices.images[slices.masks.reshape(len(slices), -1).any(1)])
    data = torch.from_numpy(np.concatenate(stacks)).unsqueeze(1)
    shown = data[:64]
    print(f"{len(data)} slices from {len(stacks)} scans; mean x^2 {float((shown ** 2).mean()):.4f} "
          f"(the squared error of an all-black output)")

    arch = ArchConfig(image_size=args.image_size, latent_dim=args.latent_dim,
                      widths=tuple(int(w) for w in args.widths.split(",")))
    config = TrainConfig(method=args.method, lr=args.lr, batchnorm=args.batchnorm, seed=args.seed)
    model, opt_e, opt_d = build_model(arch, config, torch.device("cpu"))
    generator = torch.Generator().manual_seed(args.seed)
    noise = lambda shape: torch.randn(shape, generator=generator)
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % 10 == 0:
            model.eval()
            with torch.inference_mode():
                y = model.reconstruct(shown)
            print(f"iteration {step}: output mean {float(y.mean()):.4f}, max {float(y.max()):.4f}, "
                  f"MSE {float(((y - shown) ** 2).mean()):.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
        if step == args.steps:
            break
        model.train()
        set_batchnorm_mode(model, args.batchnorm)
        x = data[torch.randint(len(data), (8,), generator=generator)]
        if args.method in INTROSPECTIVE:
            train_iteration(model, opt_e, opt_d, x, torch.randn(8, arch.latent_dim, generator=generator),
                            config.weights, noise)
        else:
            baseline_iteration(model, opt_e, opt_d, x, args.method, config.weights, noise)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
