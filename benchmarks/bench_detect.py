#!/usr/bin/env python
"""Detection-speed benchmark of `ra detect` on CPU (GPU with --device cuda): a 256x256x160 T1 volume and a 2048x2048
radiograph, time per stage, whole-command time, peak and working memory, the network's FLOP/s against this machine's
convolution throughput, and the reference implementation's one-slice-at-a-time loop on the same slices.

    python benchmarks/bench_detect.py [--threads T] [--device cpu|cuda] [--batch-size 32] [--no-large]
                                      [--out benchmarks/results/detect_cpu.json]

Inputs (made once under --work, default a temporary folder), all from bundled real anatomy:
  t1_256      the bundled reference head (Colin27, ra_engine/resources/reference/head.nii.gz, 1.5 mm) resampled
              linearly onto 256x256x160 voxels of 1 x 1 x 1.2 mm (centred on the head), int16 NIfTI.
  xray_2048   the real chest radiograph RG1_UNCI.dcm of pydicom-data (CR, 1955x1841, 15-bit, MONOCHROME1)
              resized bilinearly to 2048x2048, written back as an uncompressed DICOM (same tags).
  t1_512      the same head resampled onto 512x512x300 voxels of 0.5 x 0.5 x 0.64 mm (int16 NIfTI), for the memory
              figure.
Models: untrained paper-configuration networks (ArchConfig defaults: 1 channel, 128x128, latent 128, widths
64-128-256-512-512; weights from seed 2109; speed does not depend on training) with the default presets
(`preset_config("brain-mri")`, `preset_config("xray")`, both 128 pixels), LPIPS AlexNet, written with
`save_model_dir` and given a calibration table computed from arbitrary values so that `ra detect` runs. They are
marked "speed_only" in their card: their anomaly maps mean nothing.

Workers (each in its own Python subprocess, so each peak RSS is its own):
  stages     the steps of one `ra detect` input, timed one by one with the project's own functions: read
             (`read_image`), alignment/preprocessing (`preprocess`), the network and the scorer inside the real
             `detect_slices` (its `reconstruct` and `score` calls timed in place), mapping back (the rest of
             `detect_slices`), and outputs (`detections_at`, then `write_outputs`, which writes the maps and the
             overlay on its writer threads while it makes the report with its regions: the per-file times in
             "outputs_detail" overlap, and their CPU seconds are the whole process's during each). Its peak
             RSS is read after the outputs are written; then the batched network and scorer run a second, warm time.
  reference  the reference implementation's inference loop on the same model-space slices: one slice at a time,
             the model in train mode (BatchNorm in its "reference" mode, as trained) with gradients enabled (no
             inference or no-grad mode), z sampled (mu + sigma * eps), D(z), clamp, CLAHE of x and of x_ph (two
             calls), LPIPS(x, x_ph) and LPIPS(CLAHE x, CLAHE x_ph) as two separate passes, each blurred with
             skimage's Gaussian (sigma 2), A = |CLAHE(x_ph) - CLAHE(x)| * S1 * S2. Warm (two untimed slices first).
  command    `ra detect` itself (`ra_engine.cli.main(["detect", ...])`, --quiet), wall time from outside, CPU time
             from os.wait4, peak RSS = the process's VmHWM at exit.
Peak RSS is VmHWM (/proc/self/status), not ru_maxrss: Linux carries a parent's high-water mark into a child started
with fork/vfork + exec, which made every worker report this driver's peak.
  conv       this machine's convolution throughput, measured in the same run: the network's fastest convolution
             (3x3, 256 -> 512 channels at 16x16, the best shape of bench_train.py) at batch 8 and at the detection
             batch size, best of several blocks.
See docs/BENCHMARKS.md, "Detection speed".
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import machine_info, maxrss_bytes, rss_bytes  # noqa: E402  (one definition for both benchmarks)

SEED = 2109
INPUTS = {
    "t1_256": {"kind": "brain-mri", "shape": (160, 256, 256), "spacing": (1.0, 1.0, 1.2)},  # (z, y, x); (x, y, z)
    "xray_2048": {"kind": "xray", "shape": (2048, 2048)},
    "t1_512": {"kind": "brain-mri", "shape": (300, 512, 512), "spacing": (0.5, 0.5, 0.64)},
}
REFERENCE_FIGURES = {
    "source": "docs/METHOD.md, 'Defects of the reference implementation', speed: reference code on 2 CPU cores",
    "forward_seconds_per_slice": [0.15, 0.2],
    "scoring_seconds_per_image": 0.1,
}
TARGETS = {"network_fraction_of_conv_throughput": 0.70, "overhead_fraction_of_network": 0.30,
           "working_memory_bytes_512": 1e9}


# ----------------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------------
class Clock:
    """Wall and process-CPU seconds of named stages; cpu_share = CPU / (wall x threads)."""

    def __init__(self, threads: int):
        self.threads = threads
        self.stages: dict[str, dict] = {}

    def add(self, name: str, wall: float, cpu: float) -> None:
        s = self.stages.setdefault(name, {"seconds": 0.0, "cpu_seconds": 0.0, "calls": 0})
        s["seconds"] += wall
        s["cpu_seconds"] += cpu
        s["calls"] += 1

    def time(self, name: str, fn, *args, **kwargs):
        w, c = time.perf_counter(), time.process_time()
        out = fn(*args, **kwargs)
        self.add(name, time.perf_counter() - w, time.process_time() - c)
        self.memory(name)
        return out

    def memory(self, name: str) -> None:
        """Records the process's peak RSS so far and its RSS now, after stage `name` (the stage whose maxrss jumps
        is where the peak happened)."""
        self.stages[name]["maxrss_after_bytes"] = maxrss_bytes()
        self.stages[name]["rss_after_bytes"] = rss_bytes()

    def result(self) -> dict:
        for s in self.stages.values():
            s["cpu_share"] = s["cpu_seconds"] / (s["seconds"] * self.threads) if s["seconds"] > 0 else None
        return self.stages


def _torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    return torch


def _sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------------------------
# Inputs and models
# ----------------------------------------------------------------------------------------------------------------
def make_volume(path: Path, shape_zyx: tuple, spacing_xyz: tuple) -> None:
    """The bundled reference head resampled (linear) onto a grid of `shape_zyx` voxels of `spacing_xyz` mm centred on
    the head, intensities x4 (0-1000, as a T1's), int16 NIfTI."""
    import numpy as np
    import SimpleITK as sitk

    head = sitk.ReadImage(str(REPO / "ra_engine" / "resources" / "reference" / "head.nii.gz"), sitk.sitkFloat32)
    centre = np.array(head.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in head.GetSize()]))
    size = [int(shape_zyx[2]), int(shape_zyx[1]), int(shape_zyx[0])]
    grid = sitk.Image(size, sitk.sitkInt16)
    grid.SetSpacing([float(v) for v in spacing_xyz])
    grid.SetOrigin([float(c - (n - 1) / 2.0 * s) for c, n, s in zip(centre, size, spacing_xyz)])
    out = sitk.Resample(head * 4.0, grid, sitk.Transform(), sitk.sitkLinear, 0.0, sitk.sitkInt16)
    sitk.WriteImage(out, str(path), True)


def make_radiograph(path: Path, side: int) -> None:
    """pydicom-data's RG1_UNCI.dcm (a real chest CR) resized bilinearly to side x side, same tags, uncompressed."""
    import numpy as np
    import pydicom
    from pydicom.data import get_testdata_file
    from skimage.transform import resize

    ds = pydicom.dcmread(get_testdata_file("RG1_UNCI.dcm"))
    pixels = ds.pixel_array.astype(np.float32)
    big = resize(pixels, (side, side), order=1, preserve_range=True, anti_aliasing=False)
    ds.PixelData = np.clip(np.rint(big), 0, 2 ** int(ds.BitsStored) - 1).astype(np.uint16).tobytes()
    ds.Rows, ds.Columns = side, side
    ds.save_as(str(path))


def make_model(directory: Path, preset_name: str, calibrate_on: Path) -> None:
    """An untrained paper-configuration model of `preset_name` with a speed-only calibration table: the quantiles
    of its own anomaly map on the mask of `calibrate_on` (one of the benchmark's inputs), so that the default 5%
    flag rate flags about 5% of the mask, as a calibrated model does on a normal scan (an arbitrary table would
    flag nearly everything, and the regions of a fully flagged 512x512x300 volume dominate time and memory)."""
    import torch
    from ra_engine.thresholds.table import calibration_table
    from ra_engine.network.config import ArchConfig
    from ra_engine.network.model import ReversedAutoEncoder
    from ra_engine.models.card import ModelCard
    from ra_engine.models.modeldir import save_model_dir
    from ra_engine.preprocess.presets import preset_config

    arch = ArchConfig()
    preset = preset_config(preset_name)
    assert preset.image_size == arch.image_size
    torch.manual_seed(SEED)
    network = ReversedAutoEncoder(arch)
    card = ModelCard(name=f"bench-{preset_name}-untrained", architecture=arch, preset=preset,
                     method_description="UNTRAINED weights, calibrated on one benchmark input: for timing `ra detect` "
                                        "only; its anomaly maps and detections mean nothing")
    save_model_dir(directory, network.state_dict(), card)
    from ra_engine.detection.pipeline import detect
    from ra_engine.io.images import read_image
    from ra_engine.models.card import read_card, write_card
    from ra_engine.models.modeldir import load_model

    found = detect(load_model(directory), read_image(calibrate_on))
    card = read_card(directory)
    card.calibration = calibration_table(found.anomaly_stack[found.slices.masks])
    write_card(directory, card)


def prepare(work: Path, large: bool) -> dict:
    """Makes the inputs and models under `work` (kept when they exist); returns their paths."""
    work.mkdir(parents=True, exist_ok=True)
    paths = {"t1_256": work / "t1_256.nii.gz", "xray_2048": work / "xray_2048.dcm", "t1_512": work / "t1_512.nii.gz",
             "model_brain-mri": work / "model_brain", "model_xray": work / "model_xray"}
    for name in ("t1_256", "t1_512") if large else ("t1_256",):
        if not paths[name].exists():
            spec = INPUTS[name]
            make_volume(paths[name], spec["shape"], spec["spacing"])
    if not paths["xray_2048"].exists():
        make_radiograph(paths["xray_2048"], INPUTS["xray_2048"]["shape"][0])
    for preset, on in (("brain-mri", "t1_256"), ("xray", "xray_2048")):
        if not (paths[f"model_{preset}"] / "model.json").exists():
            make_model(paths[f"model_{preset}"], preset, paths[on])
    return {k: str(v) for k, v in paths.items()}


# ----------------------------------------------------------------------------------------------------------------
# Workers
# ----------------------------------------------------------------------------------------------------------------
def stages_worker(input_path: str, model_dir: str, out_dir: str, threads: int, device: str, batch_size: int,
                  warm: bool) -> dict:
    rss_start = rss_bytes()
    torch = _torch(threads)
    import numpy as np
    from torch.utils.flop_counter import FlopCounterMode

    from ra_engine.detection.pipeline import check_input, detect_slices, scorer_for
    from ra_engine.detection.outputs import plan_jobs, write_outputs
    from ra_engine.io.sources import Source
    from ra_engine.io.images import read_image, validate_image
    from ra_engine.models.modeldir import load_model
    from ra_engine.preprocess.pipeline import preprocess
    rss_imports = rss_bytes()

    model = load_model(model_dir, device=device)
    scorer = scorer_for(model)
    baseline = rss_bytes()
    maxrss_before = maxrss_bytes()
    clock = Clock(threads)

    image = clock.time("read", read_image, input_path)
    input_bytes = image.array.nbytes

    def align():
        validate_image(image)
        check_input(model, image)
        return preprocess(image, model.card.preset)

    slices = clock.time("alignment_preprocess", align)

    # The network (the inference copy that detect_slices runs) and the scorer timed in place inside detect_slices.
    network = model.inference_network
    reconstruct, score = network.reconstruct, scorer.score

    def timed_reconstruct(x):
        _sync(device)
        w, c = time.perf_counter(), time.process_time()
        out = reconstruct(x)
        _sync(device)
        clock.add("network", time.perf_counter() - w, time.process_time() - c)
        return out

    def timed_score(x, rec):
        w, c = time.perf_counter(), time.process_time()
        out = score(x, rec)
        clock.add("scoring", time.perf_counter() - w, time.process_time() - c)
        return out

    network.reconstruct = timed_reconstruct
    scorer.score = timed_score
    w, c = time.perf_counter(), time.process_time()
    found = detect_slices(model, slices, scorer, image.geometry, batch_size=batch_size, source=image.source)
    total_w, total_c = time.perf_counter() - w, time.process_time() - c
    inner = clock.stages["network"]["seconds"] + clock.stages["scoring"]["seconds"]
    inner_c = clock.stages["network"]["cpu_seconds"] + clock.stages["scoring"]["cpu_seconds"]
    clock.add("map_back", total_w - inner, total_c - inner_c)
    clock.memory("map_back")  # the peak of the network, scoring and mapping back together

    threshold = float(found.threshold_at())
    job = plan_jobs([Source(Path(input_path).absolute())], Path(out_dir))[0]
    Path(out_dir).mkdir(parents=True, exist_ok=True)

    # Inside the outputs stage: each file written by the real `write_outputs`, timed with the peak RSS after it.
    import ra_engine.detection.outputs as outputs_module

    detail = Clock(threads)
    write_image, overlay_png = outputs_module.write_image, outputs_module.overlay_png

    def timed(fn, label):
        def wrapper(*a, **k):
            name = f"{label}:{Path(str(a[1] if label == 'write_image' else a[3])).name.split('.partial')[0]}"
            return detail.time(name, fn, *a, **k)
        return wrapper

    def outputs():
        detections = detail.time("detections_at", found.detections_at, threshold)
        flag_rate = float(model.card.calibration.default_flag_rate)
        outputs_module.write_image = timed(write_image, "write_image")
        outputs_module.overlay_png = timed(overlay_png, "overlay_png")
        try:  # as `ra detect` does: the report (regions) is made while the writer threads write the maps
            write_outputs(job, image, found, detections,
                           lambda: detail.time("report (regions)", found.report, detections, threshold, flag_rate))
        finally:
            outputs_module.write_image, outputs_module.overlay_png = write_image, overlay_png
        return detections

    detections = clock.time("outputs", outputs)
    peak = maxrss_bytes()
    output_bytes = sum(a.array.nbytes for a in (found.pseudo_healthy, found.anomaly, found.mask, detections))
    stages = clock.result()
    n_used = int(np.count_nonzero(slices.masks.reshape(len(slices), -1).any(1)))

    # FLOPs of the network on one slice (every slice costs the same), counted outside the timings.
    x1 = torch.from_numpy(slices.images[:1]).unsqueeze(1).to(device)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        reconstruct(x1)
    flops_per_slice = counter.get_total_flops()

    result = {
        "input": input_path, "input_shape": list(image.array.shape), "input_spacing": list(image.geometry.spacing),
        "model_slices": len(slices), "slices_used": n_used, "batch_size": batch_size, "device": device,
        "threads": torch.get_num_threads(),
        "stages": stages,
        "outputs_detail": detail.result(),
        "alignment": dict(slices.space.alignment),
        "rss_at_start_bytes": rss_start, "rss_after_imports_bytes": rss_imports,
        "baseline_rss_bytes": baseline, "maxrss_before_input_bytes": maxrss_before,
        "peak_rss_bytes": peak, "input_array_bytes": input_bytes, "output_array_bytes": output_bytes,
        "working_memory_bytes": peak - baseline - input_bytes - output_bytes,
        "working_memory_from_imports_bytes": peak - rss_imports - input_bytes - output_bytes,
        "flops_per_slice": flops_per_slice,
    }
    if str(device).startswith("cuda"):
        result["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    del found, detections

    if warm:  # the same batched pass again, warm (oneDNN primitives made, caches filled)
        warm_clock = Clock(threads)
        clock_cold = clock
        clock = warm_clock
        w = time.perf_counter()
        detect_slices(model, slices, scorer, image.geometry, batch_size=batch_size, source=image.source)
        total = time.perf_counter() - w
        result["warm"] = {"stages": warm_clock.result(), "detect_slices_seconds": total}
        clock = clock_cold
    return result


def reference_worker(input_path: str, model_dir: str, threads: int, device: str, warmup: int,
                     max_slices: int = 0) -> dict:
    """The reference implementation's per-slice inference loop (see the module docstring) on the same slices."""
    torch = _torch(threads)
    import numpy as np
    from skimage import exposure, filters

    from ra_engine.detection.pipeline import scorer_for
    from ra_engine.io.images import read_image
    from ra_engine.network.model import reparameterize, set_batchnorm_mode
    from ra_engine.models.modeldir import load_model
    from ra_engine.preprocess.pipeline import preprocess

    model = load_model(model_dir, device=device)
    lpips_net = scorer_for(model).lpips  # same backbone and weights as ours
    image = read_image(input_path)
    slices = preprocess(image, model.card.preset)
    used = np.flatnonzero(slices.masks.reshape(len(slices), -1).any(1))
    n_used = int(used.size)
    if 0 < max_slices < used.size:  # an evenly spaced sample of the same slices (every slice costs the same)
        used = used[np.unique(np.linspace(0, used.size - 1, max_slices).round().astype(int))]
    net = model.network
    for p in net.parameters():
        p.requires_grad_(True)
    net.train()
    set_batchnorm_mode(net, "reference")
    torch.manual_seed(SEED)

    def one(i: int) -> tuple[float, float]:
        w = time.perf_counter()
        x = torch.from_numpy(slices.images[i][None, None]).to(device)
        mu, logvar, _ = net.encoder(x)
        x_ph = net.decoder(reparameterize(mu, logvar))
        _sync(device)
        t_net = time.perf_counter() - w
        x, x_ph = x.clamp(0, 1), x_ph.clamp(0, 1)
        c_x = exposure.equalize_adapthist(x[0, 0].detach().cpu().numpy())
        c_ph = exposure.equalize_adapthist(x_ph[0, 0].detach().cpu().numpy())
        s1 = lpips_net(x.expand(-1, 3, -1, -1), x_ph.expand(-1, 3, -1, -1), normalize=True)
        tc_x = torch.from_numpy(c_x).float().to(device)[None, None].expand(-1, 3, -1, -1)
        tc_ph = torch.from_numpy(c_ph).float().to(device)[None, None].expand(-1, 3, -1, -1)
        s2 = lpips_net(tc_x, tc_ph, normalize=True)
        s1 = filters.gaussian(s1[0, 0].detach().cpu().numpy(), sigma=2, mode="reflect", preserve_range=True)
        s2 = filters.gaussian(s2[0, 0].detach().cpu().numpy(), sigma=2, mode="reflect", preserve_range=True)
        anomaly = np.abs(c_ph - c_x) * s1 * s2 * slices.masks[i]
        assert np.isfinite(anomaly).all()
        return t_net, time.perf_counter() - w - t_net

    for i in used[:warmup]:
        one(int(i))
    clock = Clock(threads)
    w, c = time.perf_counter(), time.process_time()
    for i in used:
        t_net, t_score = one(int(i))
        clock.add("network", t_net, 0.0)
        clock.add("scoring", t_score, 0.0)
    total, cpu = time.perf_counter() - w, time.process_time() - c
    stages = clock.result()
    for s in stages.values():
        s.pop("cpu_seconds"), s.pop("cpu_share")
    return {"slices": int(used.size), "slices_of_the_scan": n_used, "warmup_slices": int(min(warmup, used.size)), "seconds": total,
            "cpu_share": cpu / (total * torch.get_num_threads()), "seconds_per_slice": total / used.size,
            "stages": stages, "peak_rss_bytes": maxrss_bytes()}


def sweep_worker(model_dir: str, threads: int, device: str, batches=(1, 4, 8, 16, 32), rounds: int = 2) -> dict:
    """Seconds per slice of the batched network (inference mode, D(mu)) at several batch sizes, best of `rounds`
    rounds of at least 32 slices each; random 128x128 inputs (the cost does not depend on them)."""
    torch = _torch(threads)
    from torch.utils.flop_counter import FlopCounterMode

    from ra_engine.models.modeldir import load_model

    net = load_model(model_dir, device=device).inference_network  # what detection runs
    out = {"threads": torch.get_num_threads(), "seconds_per_slice": {}, "gflops": {}}
    with torch.inference_mode():
        with FlopCounterMode(display=False) as counter:
            net.reconstruct(torch.rand(1, 1, 128, 128, device=device))
        flops = counter.get_total_flops()
        for b in batches:
            x = torch.rand(b, 1, 128, 128, device=device).contiguous(memory_format=torch.channels_last)
            net.reconstruct(x)
            best = float("inf")
            for _ in range(rounds):
                n = max(1, 32 // b)
                _sync(device)
                start = time.perf_counter()
                for _ in range(n):
                    net.reconstruct(x)
                _sync(device)
                best = min(best, (time.perf_counter() - start) / (n * b))
            out["seconds_per_slice"][str(b)] = best
            out["gflops"][str(b)] = flops / best / 1e9
    out["flops_per_slice"] = flops
    return out


def conv_worker(threads: int, device: str, batch_size: int, min_time: float = 0.3, repeats: int = 4) -> dict:
    """Best forward rate of the network's fastest convolution shape (bench_train.py's best: 3x3, 256 -> 512 at
    16x16) at batch 8 and at `batch_size`, with this run's thread count."""
    torch = _torch(threads)
    import torch.nn.functional as F

    out = {"threads": torch.get_num_threads(), "shape": "3x3 conv, 256 -> 512 channels, 16x16, no bias"}
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(512, 256, 3, 3, generator=g) * 0.05).to(device)
    for n in sorted({8, batch_size}):
        x = torch.randn(n, 256, 16, 16, generator=g).to(device)
        flops = 2 * n * 512 * 16 * 16 * 256 * 9
        with torch.inference_mode():
            F.conv2d(x, w, None, 1, 1)
            best = float("inf")
            for _ in range(repeats):
                k, start = 0, time.perf_counter()
                while True:
                    F.conv2d(x, w, None, 1, 1)
                    _sync(device)
                    k += 1
                    if time.perf_counter() - start >= min_time:
                        break
                best = min(best, (time.perf_counter() - start) / k)
        out[f"batch_{n}_gflops"] = flops / best / 1e9
    out["best_gflops"] = max(v for k, v in out.items() if k.endswith("_gflops"))
    return out


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------
def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_worker(args, kind: str, *extra: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--worker-out", str(out),
               "--threads", str(args.threads), "--device", args.device, "--batch-size", str(args.batch_size),
               *extra]
        subprocess.run(cmd, check=True, env=_env(args.threads))
        return json.loads(out.read_text())


def run_command(args, input_path: str, model_dir: str, out_dir: Path) -> dict:
    """`ra detect` in a fresh process: wall time, CPU time and peak RSS (os.wait4)."""
    cli = ["detect", input_path, "--model", model_dir, "--out", str(out_dir), "--overwrite", "--quiet",
           "--device", args.device, "--batch-size", str(args.batch_size)]
    hwm = out_dir.parent / f".hwm_{out_dir.name}"
    # The process's own peak RSS (VmHWM) is written at exit: os.wait4's ru_maxrss would include this driver's peak.
    code = ("import atexit, sys\n"
            "def hwm(path=sys.argv[1]):\n"
            "    open(path, 'w').write([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])\n"
            "atexit.register(hwm)\n"
            "from ra_engine.cli import main\n"
            "sys.exit(main(sys.argv[2:]))\n")
    cmd = [sys.executable, "-c", code, str(hwm), *cli]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(args.threads), cwd=str(REPO))
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"ra detect failed with status {proc.returncode}: {' '.join(cmd)}")
    cpu = usage.ru_utime + usage.ru_stime
    return {"command": "ra " + " ".join(cli), "seconds": wall, "cpu_seconds": cpu,
            "cpu_share": cpu / (wall * args.threads), "peak_rss_bytes": int(hwm.read_text().split()[1]) * 1024}


def import_seconds(args) -> float:
    """Wall time of a fresh `python -c 'import ra_engine.cli, torch, ...'` (the fixed start-up of every command)."""
    code = ("import ra_engine.cli, torch, SimpleITK, skimage.exposure, lpips, ra_engine.detection.pipeline, ra_engine.io.images")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, env=_env(args.threads), cwd=str(REPO))
    return time.perf_counter() - start


def summarise(name: str, r: dict, conv: dict) -> None:
    """Adds the derived figures of one input (in place)."""
    s = r["stages"]["stages"]
    net = s["network"]["seconds"]
    overhead = sum(s[k]["seconds"] for k in ("read", "alignment_preprocess", "scoring", "map_back", "outputs"))
    r["network_seconds"] = net
    r["overhead_seconds"] = overhead
    r["overhead_fraction_of_network"] = overhead / net
    r["stages_total_seconds"] = net + overhead
    flops = r["stages"]["flops_per_slice"] * r["stages"]["slices_used"]
    r["network_flops"] = flops
    r["network_gflops_cold"] = flops / net / 1e9
    warm = r["stages"].get("warm")
    if warm:
        wn = warm["stages"]["network"]["seconds"]
        r["network_seconds_warm"] = wn
        r["network_gflops_warm"] = flops / wn / 1e9
        r["scoring_seconds_warm"] = warm["stages"]["scoring"]["seconds"]
        r["overhead_fraction_of_network_warm_network"] = overhead / wn
    best = conv["best_gflops"]
    r["network_fraction_of_conv_throughput"] = r.get("network_gflops_warm", r["network_gflops_cold"]) / best
    ref = r.get("reference")
    if ref and warm:
        n = r["stages"]["slices_used"]
        ours = (warm["stages"]["network"]["seconds"] + warm["stages"]["scoring"]["seconds"]) / n
        r["batched_seconds_per_slice_warm"] = ours
        r["speedup_vs_reference_loop"] = ref["seconds_per_slice"] / ours


def markdown(report: dict) -> str:
    m = report["machine"]
    gb = lambda b: f"{b / 1e9:.2f} GB"
    lines = [f"CPU: {m.get('cpu_model')} ({m.get('usable_cpus')} usable cores), {m['threads']} threads, torch "
             f"{m['torch']}, device {report['device']}, batch {report['batch_size']}; load average "
             f"{m['load_average_at_start'][0]:.2f} at start, {m['load_average_at_end'][0]:.2f} at end", ""]
    names = [n for n in ("t1_256", "xray_2048", "t1_512") if n in report["inputs"]]
    lines += ["| stage (s, cold, as in one `ra detect`) | " + " | ".join(names) + " |",
              "|---|" + "---|" * len(names)]
    rows = [("read", "read"), ("alignment / preprocess", "alignment_preprocess"), ("network (batched)", "network"),
            ("scoring", "scoring"), ("mapping back", "map_back"), ("outputs (regions, report, write)", "outputs")]
    for label, key in rows:
        cells = []
        for n in names:
            st = report["inputs"][n]["stages"]["stages"][key]
            cells.append(f"{st['seconds']:.2f} ({st['cpu_share']:.0%} CPU)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    def row(label, fn):
        lines.append(f"| {label} | " + " | ".join(fn(report["inputs"][n]) for n in names) + " |")
    row("stages total", lambda r: f"{r['stages_total_seconds']:.2f}")
    row("whole command `ra detect` (wall, incl. start-up)",
        lambda r: f"{r['command']['seconds']:.2f} ({r['command']['cpu_share']:.0%} CPU)" if "command" in r else "-")
    row("model slices used", lambda r: str(r["stages"]["slices_used"]))
    row("network warm (s)", lambda r: f"{r['network_seconds_warm']:.2f}" if "network_seconds_warm" in r else "-")
    row("network GFLOP/s (warm; cold)", lambda r: f"{r.get('network_gflops_warm', float('nan')):.0f}; "
                                                  f"{r['network_gflops_cold']:.0f}")
    row("of conv throughput", lambda r: f"{r['network_fraction_of_conv_throughput']:.0%}")
    row("alignment+scoring+I/O over network", lambda r: f"{r['overhead_fraction_of_network']:.0%}")
    row("reference loop s/slice", lambda r: f"{r['reference']['seconds_per_slice']:.3f}" if "reference" in r else "-")
    row("batched s/slice (warm)", lambda r: f"{r['batched_seconds_per_slice_warm']:.3f}"
        if "batched_seconds_per_slice_warm" in r else "-")
    row("speed-up vs reference loop", lambda r: f"{r['speedup_vs_reference_loop']:.1f}x"
        if "speedup_vs_reference_loop" in r else "-")
    row("peak RSS (stages worker)", lambda r: gb(r["stages"]["peak_rss_bytes"]))
    row("peak RSS (whole command)", lambda r: gb(r["command"]["peak_rss_bytes"]) if "command" in r else "-")
    row("input + output arrays", lambda r: gb(r["stages"]["input_array_bytes"] + r["stages"]["output_array_bytes"]))
    row("working memory", lambda r: gb(r["stages"]["working_memory_bytes"]))
    conv = report["conv_throughput"]
    lines += ["", f"Convolution throughput (in this run, {conv['threads']} threads, {conv['shape']}): "
                  f"{conv['best_gflops']:.0f} GFLOP/s best; bench_train.py's figure: "
                  f"{report.get('train_cpu_conv', {}).get('best_gflops', float('nan')):.0f} GFLOP/s best shape, "
                  f"{report.get('train_cpu_conv', {}).get('network_forward_gflops', float('nan')):.0f} GFLOP/s "
                  f"for the network's own convolution mix", f"Python + imports of a fresh process: "
                  f"{report['import_seconds']:.1f} s",
              "Network alone, s/slice (GFLOP/s) by batch size: " + ", ".join(
                  f"{b}: {t:.3f} ({report['batch_sweep']['gflops'][b]:.0f})"
                  for b, t in report["batch_sweep"]["seconds_per_slice"].items()), ""]
    for k, v in report["targets"].items():
        lines.append(f"- {k}: {'met' if v['met'] else 'NOT met'} ({v['value']})")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--work", type=Path, default=None, help="folder for inputs, models and outputs (default: temporary)")
    p.add_argument("--no-large", action="store_true", help="skip the 512x512x300 memory figure")
    p.add_argument("--reference-warmup", type=int, default=2, help="untimed slices of the reference loop first")
    p.add_argument("--reference-slices", type=int, default=0, help="time the reference loop on this many evenly "
                   "spaced slices of the scan's (0: all; the figure is per slice)")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "detect_cpu.json")
    p.add_argument("--worker", choices=("stages", "reference", "conv", "sweep"), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--out-dir", help=argparse.SUPPRESS)
    p.add_argument("--warm", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        if args.worker == "stages":
            result = stages_worker(args.input, args.model, args.out_dir, args.threads, args.device, args.batch_size,
                                   args.warm)
        elif args.worker == "reference":
            result = reference_worker(args.input, args.model, args.threads, args.device, args.reference_warmup,
                                      args.reference_slices)
        elif args.worker == "sweep":
            result = sweep_worker(args.model, args.threads, args.device)
        else:
            result = conv_worker(args.threads, args.device, args.batch_size)
        args.worker_out.write_text(json.dumps(result))
        return 0

    started = time.time()
    report = {
        "benchmark": "ra detect: untrained paper-configuration models (ArchConfig defaults, 128x128, widths "
                     "64-128-256-512-512), presets brain-mri and xray at 128 pixels, LPIPS AlexNet, float32",
        "command": " ".join(["python", "benchmarks/bench_detect.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "machine": machine_info(args.threads),
        "device": args.device,
        "batch_size": args.batch_size,
        "lpips_backbone": "alex",
        "reference_code_figures": REFERENCE_FIGURES,
        "targets_wanted": TARGETS,
        "inputs": {},
    }
    train_json = REPO / "benchmarks" / "results" / "train_cpu.json"
    if train_json.exists():
        c = json.loads(train_json.read_text()).get("conv_throughput") or {}
        report["train_cpu_conv"] = {k: c.get(k) for k in ("best_gflops", "network_forward_gflops", "best_at")}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        t = time.perf_counter()
        paths = prepare(work, not args.no_large)
        report["prepare_seconds"] = time.perf_counter() - t
        report["import_seconds"] = import_seconds(args)
        report["conv_throughput"] = run_worker(args, "conv")
        report["batch_sweep"] = run_worker(args, "sweep", "--model", paths["model_brain-mri"])
        names = ["t1_256", "xray_2048"] + ([] if args.no_large else ["t1_512"])
        for name in names:
            model = paths["model_" + INPUTS[name]["kind"]]
            entry = report["inputs"].setdefault(name, {"input": {**INPUTS[name], "path": Path(paths[name]).name}})
            print(f"[{name}] stages", file=sys.stderr, flush=True)
            entry["stages"] = run_worker(args, "stages", "--input", paths[name], "--model", model,
                                         "--out-dir", str(work / f"out_stages_{name}"),
                                         *(["--warm"] if name != "t1_512" else []))
            if name != "t1_512":
                print(f"[{name}] reference loop", file=sys.stderr, flush=True)
                entry["reference"] = run_worker(args, "reference", "--input", paths[name], "--model", model,
                                                "--reference-warmup", str(args.reference_warmup),
                                                "--reference-slices", str(args.reference_slices))
            print(f"[{name}] ra detect", file=sys.stderr, flush=True)
            entry["command"] = run_command(args, paths[name], model, work / f"out_cmd_{name}")
            summarise(name, entry, report["conv_throughput"])
            print(json.dumps({k: v for k, v in entry.items() if not isinstance(v, dict)}), file=sys.stderr,
                  flush=True)

    t1 = report["inputs"]["t1_256"]
    targets = {
        "network >= 70% of conv throughput (t1_256, warm)": {
            "met": t1["network_fraction_of_conv_throughput"] >= TARGETS["network_fraction_of_conv_throughput"],
            "value": f"{t1['network_fraction_of_conv_throughput']:.0%}"},
    }
    for name in ("t1_256", "xray_2048"):
        r = report["inputs"][name]
        targets[f"alignment+scoring+I/O <= 30% of network ({name})"] = {
            "met": r["overhead_fraction_of_network"] <= TARGETS["overhead_fraction_of_network"],
            "value": f"{r['overhead_fraction_of_network']:.0%}"}
        targets[f"batched beats the reference loop ({name})"] = {
            "met": r.get("speedup_vs_reference_loop", 0) > 1, "value": f"{r.get('speedup_vs_reference_loop', 0):.1f}x"}
    if "t1_512" in report["inputs"]:
        wm = report["inputs"]["t1_512"]["stages"]["working_memory_bytes"]
        targets["working memory < 1 GB (512x512x300)"] = {"met": wm < TARGETS["working_memory_bytes_512"],
                                                         "value": f"{wm / 1e9:.2f} GB"}
    report["targets"] = targets
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["wall_seconds"] = time.time() - started
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
