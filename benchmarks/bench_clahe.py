#!/usr/bin/env python
"""CLAHE speed: skimage's `equalize_adapthist` one image at a time (what `ra_engine.scoring.clahe` does) against the
batched `ra_engine.clahe.clahe_torch`, on real T1 slices, and the largest difference between the two. Prints JSON.

    python benchmarks/bench_clahe.py [--threads 2] [--device cpu|cuda] [--repeats 7] [--sizes 128,64]
                                     [--batches 84,8] [--out FILE]

Slices: the bundled MNI152 2009a T1 (ra_engine/resources/samples/mni152_2009a_t1.nii.gz, 112 axial slices of
129x105), scaled to [0, 1] by its own range and resized bilinearly to size x size; a batch of N takes N slices spread
evenly over the volume (N = 84: about the slices of a T1 that detection scores). Each timing is repeated --repeats times
after one warm-up call, and the minimum is reported with the median (other processes on the machine only make times
longer). "cpu_s" is the process CPU time of the best repeat: on a loaded machine, wall time well above cpu_s / threads
means the threads did not get their cores. On a machine with more runnable threads than cores, OpenMP's default active
waiting makes every parallel torch op wait for a descheduled thread (seen here: 2 threads 10-100x slower than 1 on
small batches); OMP_WAIT_POLICY=PASSIVE (recorded in the JSON) or --threads 1 gives figures that mean something
there. On CUDA the torch timings synchronise the device and keep the images on it (skimage still runs on the CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SAMPLE = REPO / "ra_engine" / "resources" / "samples" / "mni152_2009a_t1.nii.gz"


def load_slices(size: int, n: int):
    import numpy as np
    import torch
    import torch.nn.functional as F

    from ra_engine.io.images import read_image

    volume = read_image(SAMPLE).array.astype(np.float32)
    volume = (volume - volume.min()) / (volume.max() - volume.min())
    picks = np.linspace(0, volume.shape[0] - 1, n).round().astype(int)
    stack = torch.from_numpy(volume[picks])[:, None]
    stack = F.interpolate(stack, size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return stack.clamp(0, 1).contiguous()


def timed(fn, repeats: int, sync=None) -> dict:
    fn()  # warm-up
    if sync:
        sync()
    walls, cpus = [], []
    for _ in range(repeats):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        if sync:
            sync()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    best = min(range(repeats), key=walls.__getitem__)
    return {"min_s": walls[best], "median_s": sorted(walls)[repeats // 2], "cpu_s": cpus[best], "repeats": repeats}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", default="128,64")
    parser.add_argument("--batches", default="84,8")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    import numpy as np
    import torch
    from skimage import exposure

    from ra_engine.scoring.clahe import clahe_torch

    load_at_start = list(os.getloadavg())
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None

    def skimage_loop(images: np.ndarray) -> np.ndarray:
        return np.stack([exposure.equalize_adapthist(image).astype(np.float32, copy=False) for image in images])

    cases = []
    for size in [int(s) for s in args.sizes.split(",")]:
        for n in [int(b) for b in args.batches.split(",")]:
            x = load_slices(size, n)
            x_np = x.numpy()
            x_dev = x.to(device)
            ref = skimage_loop(x_np)
            got = clahe_torch(x_dev).cpu().numpy()
            sk = timed(lambda: skimage_loop(x_np), args.repeats)
            tt = timed(lambda: clahe_torch(x_dev), args.repeats, sync)
            cases.append({
                "size": size, "n": n,
                "skimage_loop": sk, "clahe_torch": tt,
                "speedup_min": sk["min_s"] / tt["min_s"],
                "skimage_ms_per_image": 1e3 * sk["min_s"] / n, "torch_ms_per_image": 1e3 * tt["min_s"] / n,
                "max_abs_diff": float(np.abs(ref.astype(np.float64) - got).max()),
                "pixels_differing": int((ref != got).sum()),
            })
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "load_average_at_start": load_at_start,
        "load_average_at_end": list(os.getloadavg()),
        "torch": torch.__version__, "python": platform.python_version(),
        "cases": cases,
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
