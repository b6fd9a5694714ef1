#!/usr/bin/env python
"""Training-speed benchmark of RA on CPU (paper configuration, batch 8, 128x128): seconds per iteration, peak memory,
FLOPs per iteration and how close that runs to this machine's measured convolution throughput.

    python benchmarks/bench_train.py [--iterations N] [--warmup K] [--threads T] [--mode ours|reference|both]
                                     [--out benchmarks/results/train_cpu.json]

Modes (each runs in its own subprocess, so each peak RSS is that mode's alone):
  ours       the project's `train_iteration`: frozen half with requires_grad off, x_r.detach() encoded once, each
             step's backward split in two (ra_engine/losses.py).
  reference  a re-creation, written here, of the reference implementation's iteration cost: the same network and
             losses computed the straightforward way (6 encoder and 8 decoder forward passes, x_r.detach() encoded
             twice, one loss.backward() per step with every parameter requiring grad: the frozen half's weight
             gradients are computed and then discarded by zero_grad).
Both modes start from the same weights (seed 2109) and get the same images, z_p and reparameterisation noise, and the
losses of their first iteration must agree to 1e-5 relative: that is the "identical losses" check.

A third subprocess times the network's own convolution shapes (forward, input gradient, weight gradient) with the
same thread count, giving the machine's convolution throughput; FLOPs of an iteration are counted with
`torch.utils.flop_counter.FlopCounterMode` (real ops, forward and backward), with an analytic model alongside.
See benchmarks/README.md.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

BATCH = 8
SEED = 2109
LOSS_RTOL = 1e-5
# The order in which ra_engine.losses draws the eps of its reparameterisations in one iteration (encoder step: the
# re-encoded x_f, x, the re-encoded x_r; decoder step: the re-encoded x_f, the re-encoded x_r).
NOISE_ROLES = ("enc_fake", "enc_real", "enc_rec", "dec_fake", "dec_rec")
REFERENCE_FIGURES = {
    "source": "docs/METHOD.md, 'Defects of the reference implementation', speed: reference code on 2 CPU cores, batch 8, 128x128",
    "seconds_per_iteration": [19.0, 20.0],
    "peak_memory_gb": 4.4,
}
PEAK_LIMIT_BYTES = 3e9  # the "peak under 3 GB"


# ----------------------------------------------------------------------------------------------------------------
# Shared set-up
# ----------------------------------------------------------------------------------------------------------------
def _torch(threads: int):
    import torch

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # as the Trainer does; both modes alike
    return torch


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return -1


def maxrss_bytes() -> int:
    """Peak RSS of this process's own memory (VmHWM). Not ru_maxrss: Linux carries the parent's high-water mark
    into a child across fork/vfork + exec, so a worker started by a big parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def build(threads: int):
    """The paper network and its two Adam optimisers (lr 5e-5) from the training seed, BatchNorm in reference mode."""
    torch = _torch(threads)
    from ra_engine.network.config import ArchConfig
    from ra_engine.network.model import set_batchnorm_mode
    from ra_engine.training.config import TrainConfig
    from ra_engine.training.trainer import build_model

    arch, config = ArchConfig(), TrainConfig()
    assert config.batch_size == BATCH and config.seed == SEED and config.batchnorm == "reference"
    model, opt_e, opt_d = build_model(arch, config, torch.device("cpu"))
    model.train()
    set_batchnorm_mode(model, config.batchnorm)
    return torch, arch, config, model, opt_e, opt_d


def step_inputs(arch, step: int):
    """The images, z_p and per-role eps of one iteration, a pure function of (seed, step) so that both modes get the
    same. The images are synthetic (uniform in [0, 1]): the cost does not depend on the content."""
    import torch
    from ra_engine.training.trainer import step_generator

    g = step_generator(SEED, step)
    x = torch.rand(BATCH, arch.in_channels, arch.image_size, arch.image_size, generator=g)
    z_p = torch.randn(BATCH, arch.latent_dim, generator=g)
    eps = {role: torch.randn(BATCH, arch.latent_dim, generator=g) for role in NOISE_ROLES}
    return x, z_p, eps


class ReplayNoise:
    """A noise source for ra_engine's `reparameterize` that hands out pre-drawn eps in the engine's draw order."""

    def __init__(self, eps: dict):
        self.queue = [eps[role] for role in NOISE_ROLES]

    def __call__(self, shape):
        if not self.queue:
            raise AssertionError("the engine drew more eps than the benchmark's NOISE_ROLES list: update it")
        t = self.queue.pop(0)
        if tuple(t.shape) != tuple(shape):
            raise AssertionError(f"eps of shape {tuple(shape)} asked, {tuple(t.shape)} prepared")
        return t

    def check_used(self):
        if self.queue:
            raise AssertionError(f"the engine drew {len(NOISE_ROLES) - len(self.queue)} eps, not {len(NOISE_ROLES)}")


# ----------------------------------------------------------------------------------------------------------------
# The two iterations
# ----------------------------------------------------------------------------------------------------------------
def ours_iteration(model, opt_e, opt_d, x, z_p, eps, weights) -> dict:
    from ra_engine.training.trainer import train_iteration

    noise = ReplayNoise(eps)
    losses = train_iteration(model, opt_e, opt_d, x, z_p, weights, noise)
    noise.check_used()
    return losses


def reference_iteration(model, opt_e, opt_d, x, z_p, eps, w) -> dict:
    """The reference implementation's iteration, written out the straightforward way it is written there: no
    parameter is ever frozen (every weight gradient is computed, the other half's are thrown away by the next
    zero_grad), x_r.detach() is encoded once for its exp-ELBO term and again for the embedding loss, and each step is
    a single loss.backward(). The loss formulas are docs/METHOD.md's, written independently of ra_engine.losses."""
    import torch
    import torch.nn.functional as F

    E, D = model.encoder, model.decoder
    s = 1.0 / (x.shape[-2] * x.shape[-1])

    def sse_i(a, b):
        return (a - b).pow(2).flatten(1).sum(1)

    def kl_i(mu, logvar):
        return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)

    def reparam(mu, logvar, e):
        return mu + torch.exp(0.5 * logvar) * e

    # ---- encoder step (4 encoder, 4 decoder passes; all parameters require grad)
    x_f = D(z_p)  # its graph is built (the decoder is not frozen) although only x_f.detach() is used
    mu, logvar, feats_x = E(x)
    z = reparam(mu, logvar, eps["enc_real"])
    x_r = D(z)
    rec = sse_i(x, x_r).mean()
    kl = kl_i(mu, logvar).mean()
    mu_r, logvar_r, _ = E(x_r.detach())
    rec_r = D(reparam(mu_r, logvar_r, eps["enc_rec"]))
    mu_f, logvar_f, _ = E(x_f.detach())
    rec_f = D(reparam(mu_f, logvar_f, eps["enc_fake"]))
    exp_elbo_rec = torch.exp(-2 * s * (w.beta_rec * sse_i(rec_r, x_r.detach()) + w.beta_neg * kl_i(mu_r, logvar_r))).mean()
    exp_elbo_fake = torch.exp(-2 * s * (w.beta_rec * sse_i(rec_f, x_f.detach()) + w.beta_neg * kl_i(mu_f, logvar_f))).mean()
    _, _, feats_r = E(x_r.detach())  # the second encoding of x_r.detach(), for the embedding loss
    emb = sum(0.5 * F.mse_loss(a, b) + (1 - F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1)).mean()
              for a, b in zip(feats_x, feats_r))
    loss_e = s * (w.beta_rec * rec + w.beta_kl * kl) + w.exp_elbo * (exp_elbo_rec + exp_elbo_fake) + w.embedding * emb
    opt_e.zero_grad()
    loss_e.backward()
    opt_e.step()

    # ---- decoder step (2 encoder, 4 decoder passes; all parameters require grad)
    x_f = D(z_p)
    x_r = D(z.detach())
    rec_d = sse_i(x, x_r).mean()
    mu_r, logvar_r, _ = E(x_r)
    z_r = reparam(mu_r, logvar_r, eps["dec_rec"])
    mu_f, logvar_f, _ = E(x_f)
    z_f = reparam(mu_f, logvar_f, eps["dec_fake"])
    rec_r = D(z_r.detach())
    rec_f = D(z_f.detach())
    kl_rec = kl_i(mu_r, logvar_r).mean()
    kl_fake = kl_i(mu_f, logvar_f).mean()
    rec_rec = sse_i(x_r.detach(), rec_r).mean()
    rec_fake = sse_i(x_f.detach(), rec_f).mean()
    loss_d = s * (w.beta_rec * rec_d + 0.5 * w.beta_kl * (kl_rec + kl_fake)
                  + 0.5 * w.gamma_r * w.beta_rec * (rec_rec + rec_fake))
    opt_d.zero_grad()
    loss_d.backward()
    opt_d.step()

    terms = {"enc_rec": rec, "enc_kl": kl, "exp_elbo_rec": exp_elbo_rec, "exp_elbo_fake": exp_elbo_fake,
             "embedding": emb, "loss_e": loss_e, "dec_rec": rec_d, "dec_kl_rec": kl_rec, "dec_kl_fake": kl_fake,
             "dec_rec_rec": rec_rec, "dec_rec_fake": rec_fake, "loss_d": loss_d}
    return {k: float(v.detach()) for k, v in terms.items()}


ITERATIONS = {"ours": ours_iteration, "reference": reference_iteration}


def count_flops(fn) -> tuple[int, dict, dict]:
    """FLOPs of everything `fn` runs (forward and backward), their split by aten op, and what `fn` returned."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        out = fn()
    by_op = {str(op): int(n) for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), by_op, out


def train_worker(mode: str, iterations: int, warmup: int, threads: int) -> dict:
    """Runs in its own process: builds the model, runs warm-up + timed iterations, reports times, losses and memory.
    The first warm-up iteration (or an extra one after the timed ones when there is no warm-up) runs under
    FlopCounterMode; it is never timed."""
    t0 = time.perf_counter()
    torch, arch, config, model, opt_e, opt_d = build(threads)
    iteration = ITERATIONS[mode]
    inputs = [step_inputs(arch, step) for step in range(warmup + iterations)]
    baseline_rss, baseline_maxrss = rss_bytes(), maxrss_bytes()
    setup_s = time.perf_counter() - t0

    losses, warmup_s, times, cpu_times, flops, flops_by_op = [], [], [], [], None, None
    for step, (x, z_p, eps) in enumerate(inputs):
        def run():
            return iteration(model, opt_e, opt_d, x, z_p, eps, config.weights)

        start, cpu_start = time.perf_counter(), time.process_time()
        if step == 0 and warmup > 0:
            flops, flops_by_op, out = count_flops(run)
        else:
            out = run()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        losses.append(out)
        (warmup_s if step < warmup else times).append(elapsed)
        if step >= warmup:
            cpu_times.append(cpu)
        print(f"[{mode}] iteration {step} ({'warm-up' if step < warmup else 'timed'}): {elapsed:.2f} s"
              f"{' (under FlopCounterMode)' if step == 0 and warmup > 0 else ''}", file=sys.stderr, flush=True)
        if not all(math.isfinite(v) for v in out.values()):
            raise SystemExit(f"[{mode}] non-finite losses at iteration {step}: {out}")
    peak = maxrss_bytes()
    if flops is None:
        x, z_p, eps = inputs[-1]
        flops, flops_by_op, _ = count_flops(lambda: iteration(model, opt_e, opt_d, x, z_p, eps, config.weights))
    return {
        "mode": mode,
        "threads": torch.get_num_threads(),
        "setup_s": setup_s,
        "warmup_s": warmup_s,
        "seconds_per_iteration": {
            "median": statistics.median(times) if times else None,
            "mean": statistics.fmean(times) if times else None,
            "min": min(times) if times else None,
            "max": max(times) if times else None,
            "all": times,
        },
        # CPU seconds of all the process's threads per timed iteration, and their share of threads x wall time:
        # well under 1 means the threads waited (another process on the cores, or a serial stretch of the code).
        "cpu_seconds_per_iteration": cpu_times,
        "cpu_utilisation_median": statistics.median(c / (t * torch.get_num_threads())
                                                    for c, t in zip(cpu_times, times)) if times else None,
        "baseline_rss_bytes": baseline_rss,
        "baseline_maxrss_bytes": baseline_maxrss,
        "peak_rss_bytes": peak,
        "flops_per_iteration": flops,
        "flops_by_op": flops_by_op,
        "losses": losses,
    }


# ----------------------------------------------------------------------------------------------------------------
# Convolution throughput of this machine, on the network's own convolution shapes
# ----------------------------------------------------------------------------------------------------------------
def conv_shapes(torch, model, arch) -> list[dict]:
    """Every Conv2d call of one encoder and one decoder forward pass at batch 8, with the pass it belongs to."""
    calls = []

    def hook(name, half):
        def record(module, inputs, output):
            calls.append({
                "name": name, "half": half, "input": list(inputs[0].shape), "out_channels": module.out_channels,
                "kernel": list(module.kernel_size), "stride": list(module.stride), "padding": list(module.padding),
                "bias": module.bias is not None, "output": list(output.shape),
            })
        return record

    handles = []
    for half, sub in (("encoder", model.encoder), ("decoder", model.decoder)):
        for name, m in sub.named_modules():
            if isinstance(m, torch.nn.Conv2d):
                handles.append(m.register_forward_hook(hook(f"{half}.{name}", half)))
    with torch.no_grad():
        mu, _, _ = model.encoder(torch.rand(BATCH, arch.in_channels, arch.image_size, arch.image_size))
        model.decoder(mu)
    for h in handles:
        h.remove()
    for c in calls:
        n, cin, _, _ = c["input"]
        _, cout, hout, wout = c["output"]
        c["macs"] = n * cout * hout * wout * cin * c["kernel"][0] * c["kernel"][1]
    return calls


def _time_block(fn, min_time: float) -> float:
    """Mean seconds per call over a block of calls lasting at least `min_time`."""
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_time:
            return elapsed / n


CONV_KINDS = ("forward", "grad_input", "grad_weight")


def conv_worker(threads: int, min_time: float, repeats: int) -> dict:
    """Times every distinct convolution of the network (forward, input gradient, weight gradient) in isolation.
    The shapes are measured round-robin, `repeats` rounds, and each keeps its best block, so that a burst of load
    from another process spoils one round of one shape rather than all of it."""
    torch, arch, config, model, _, _ = build(threads)
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    # Forward FLOPs of one pass of each half at batch 8 (all ops FlopCounterMode counts: convs and linears).
    x = torch.rand(BATCH, arch.in_channels, arch.image_size, arch.image_size)
    with torch.no_grad():
        with FlopCounterMode(display=False) as c:
            mu, _, _ = model.encoder(x)
        enc_fwd = c.get_total_flops()
        with FlopCounterMode(display=False) as c:
            model.decoder(mu)
        dec_fwd = c.get_total_flops()

    calls = conv_shapes(torch, model, arch)
    first_layer = calls[0]["name"]  # the encoder's stem conv: its input (an image) never needs a gradient
    assert calls[0]["half"] == "encoder" and calls[0]["input"][1] == arch.in_channels
    unique: dict[tuple, dict] = {}
    for c in calls:
        key = (tuple(c["input"]), c["out_channels"], tuple(c["kernel"]), tuple(c["stride"]), tuple(c["padding"]),
               c["bias"])
        u = unique.setdefault(key, {"input": c["input"], "out_channels": c["out_channels"], "kernel": c["kernel"],
                                    "stride": c["stride"], "padding": c["padding"], "bias": c["bias"],
                                    "flops": 2 * c["macs"], "calls_per_pass": {"encoder": 0, "decoder": 0},
                                    "used_by": []})
        u["calls_per_pass"][c["half"]] += 1
        u["used_by"].append(c["name"])
        u["first_layer"] = u.get("first_layer", False) or c["name"] == first_layer

    g = torch.Generator().manual_seed(0)
    jobs = []
    for u in unique.values():
        inp, cout, k, stride, pad = u["input"], u["out_channels"], u["kernel"], u["stride"], u["padding"]
        xin = torch.randn(*inp, generator=g)
        w = torch.randn(cout, inp[1], *k, generator=g) * 0.05
        b = torch.zeros(cout) if u["bias"] else None
        gy = torch.randn_like(F.conv2d(xin, w, b, stride, pad))

        def make(kind, xin=xin, w=w, b=b, gy=gy, stride=stride, pad=pad, bias_sizes=[cout] if u["bias"] else None):
            if kind == "forward":
                return lambda: F.conv2d(xin, w, b, stride, pad)
            mask = [kind == "grad_input", kind == "grad_weight", False]
            return lambda: torch.ops.aten.convolution_backward(gy, xin, w, bias_sizes, stride, pad, [1, 1], False,
                                                               [0, 0], 1, mask)

        for kind in CONV_KINDS:
            fn = make(kind)
            fn()  # first call: allocation and oneDNN primitive creation
            jobs.append((u, kind, fn))
        u["seconds"] = {kind: math.inf for kind in CONV_KINDS}

    for _ in range(repeats):
        for u, kind, fn in jobs:
            u["seconds"][kind] = min(u["seconds"][kind], _time_block(fn, min_time))
    results = list(unique.values())
    for u in results:
        u["gflops"] = {kind: u["flops"] / u["seconds"][kind] / 1e9 for kind in CONV_KINDS}
        print(f"[conv] {u['input']} -> {u['out_channels']} k{u['kernel'][0]}: "
              + ", ".join(f"{kind} {u['gflops'][kind]:.1f}" for kind in CONV_KINDS) + " GFLOP/s",
              file=sys.stderr, flush=True)

    best = max(((u["gflops"][kind], kind, u) for u in results for kind in CONV_KINDS), key=lambda t: t[0])
    per_half = {}
    for half in ("encoder", "decoder"):
        per_half[half] = {
            "conv_forward_flops": sum(u["flops"] * u["calls_per_pass"][half] for u in results),
            "first_layer_flops": sum(u["flops"] * u["calls_per_pass"][half] for u in results if u["first_layer"]),
            "seconds": {kind: sum(u["seconds"][kind] * u["calls_per_pass"][half] for u in results)
                        for kind in CONV_KINDS},
            "first_layer_grad_input_seconds": sum(u["seconds"]["grad_input"] * u["calls_per_pass"][half]
                                                  for u in results if u["first_layer"]),
        }
    all_flops = sum(h["conv_forward_flops"] for h in per_half.values())
    return {
        "threads": torch.get_num_threads(),
        "min_time_s": min_time,
        "repeats": repeats,
        "encoder_forward_flops": enc_fwd,
        "decoder_forward_flops": dec_fwd,
        "best_gflops": best[0],
        "best_at": {"kind": best[1], "input": best[2]["input"], "out_channels": best[2]["out_channels"],
                    "kernel": best[2]["kernel"]},
        "best_forward_gflops": max(u["gflops"]["forward"] for u in results),
        "network_forward_gflops": all_flops / sum(h["seconds"]["forward"] for h in per_half.values()) / 1e9,
        "per_pass": per_half,
        "shapes": results,
    }


# How each mode's iteration uses the two halves (docs/METHOD.md, "Training"): pass -> (half, how many, what its
# backward computes). "trained": input and weight gradients; "trained_no_input_grad": the pass's input carries no
# gradient (x, x_r.detach(), x_f.detach()), so its first layer's input gradient is skipped; "frozen": input gradients
# only, the weights have requires_grad off; "no_backward": forward only (outside every loss graph).
PASSES = {
    "ours": [
        ("encoder", 3, "trained_no_input_grad", "encoder step: E(x), E(x_r.detach()) (shared by its exp-ELBO term and "
                                                "the embedding loss), E(x_f.detach())"),
        ("decoder", 1, "no_backward", "encoder step: D(z_p), decoder frozen, z_p needs no grad: no graph"),
        ("decoder", 3, "frozen", "encoder step: D(z), D(z_r), D(z_f): gradients pass through into E"),
        ("encoder", 2, "frozen", "decoder step: E(x_r), E(x_f): gradients pass through into D"),
        ("decoder", 4, "trained", "decoder step: D(z_p), D(z.detach()), D(z_r.detach()), D(z_f.detach())"),
    ],
    "reference": [
        ("encoder", 4, "trained_no_input_grad", "encoder step: E(x), E(x_r.detach()) twice (exp-ELBO term, "
                                                "embedding loss), E(x_f.detach())"),
        ("decoder", 1, "no_backward", "encoder step: D(z_p): its graph is built but only x_f.detach() is used"),
        ("decoder", 3, "trained", "encoder step: D(z), D(z_r), D(z_f): not frozen, so their weight gradients are "
                                  "computed too (and discarded by the decoder step's zero_grad)"),
        ("encoder", 2, "trained", "decoder step: E(x_r), E(x_f): not frozen, weight gradients computed and discarded"),
        ("decoder", 4, "trained", "decoder step: D(z_p), D(z.detach()), D(z_r.detach()), D(z_f.detach())"),
    ],
}


def iteration_model(mode: str, conv: dict) -> dict:
    """Analytic FLOPs of one iteration and its conv-bound time: every pass's forward (all ops of the half, from
    FlopCounterMode), backward = input gradient (1x forward, less the first layer's where the input needs none) +
    weight gradient (1x) where trained; the conv-bound time sums the isolated timings of the same convolutions."""
    fwd = {"encoder": conv["encoder_forward_flops"], "decoder": conv["decoder_forward_flops"]}
    flops, seconds = 0, 0.0
    for half, n, kind, _ in PASSES[mode]:
        h = conv["per_pass"][half]
        t = h["seconds"]
        f, s = fwd[half], t["forward"]
        if kind != "no_backward":
            f += fwd[half]
            s += t["grad_input"]
            if kind == "trained_no_input_grad":
                f -= h["first_layer_flops"]
                s -= h["first_layer_grad_input_seconds"]
        if kind in ("trained", "trained_no_input_grad"):
            f += fwd[half]
            s += t["grad_weight"]
        flops += n * f
        seconds += n * s
    return {"passes": [{"half": h, "count": n, "backward": k, "what": w} for h, n, k, w in PASSES[mode]],
            "flops": flops, "conv_bound_seconds": seconds}


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------
def machine_info(threads: int) -> dict:
    import torch

    model = None
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and model is None:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return {
        "cpu_model": model or platform.processor(),
        "cpu_flags": sorted(flags & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16"}),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "threads": threads,
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_at_start": list(os.getloadavg()),
    }


def run_worker(args: argparse.Namespace, kind: str) -> dict:
    """Runs one worker in a fresh Python process and returns its JSON result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", kind, "--worker-out", str(out),
               "--iterations", str(args.iterations), "--warmup", str(args.warmup), "--threads", str(args.threads),
               "--conv-min-time", str(args.conv_min_time), "--conv-repeats", str(args.conv_repeats)]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        subprocess.run(cmd, check=True, env=env)
        return json.loads(out.read_text())


def compare_losses(ours: dict, ref: dict) -> dict:
    """First iteration: every named term must agree to LOSS_RTOL relative. Later iterations are recorded for
    information (they drift apart by float rounding through the Adam updates)."""
    first_o, first_r = ours["losses"][0], ref["losses"][0]
    terms = {}
    for k in first_o:
        a, b = first_o[k], first_r[k]
        rel = abs(a - b) / max(abs(a), abs(b)) if max(abs(a), abs(b)) > 0 else 0.0
        terms[k] = {"ours": a, "reference": b, "relative_difference": rel}
    later = []
    for i, (lo, lr) in enumerate(zip(ours["losses"][1:], ref["losses"][1:]), start=1):
        later.append({"iteration": i, "max_relative_difference": max(
            abs(lo[k] - lr[k]) / max(abs(lo[k]), abs(lr[k]), 1e-300) for k in lo)})
    ok = set(first_o) == set(first_r) and all(t["relative_difference"] <= LOSS_RTOL for t in terms.values())
    return {"tolerance_relative": LOSS_RTOL, "iteration": 0, "identical": ok,
            "max_relative_difference": max(t["relative_difference"] for t in terms.values()),
            "terms": terms, "later_iterations": later}


def markdown(report: dict) -> str:
    rows = ["| mode | s/iteration (median) | mean | peak RSS | GFLOP/iteration | achieved GFLOP/s | of best conv "
            "GFLOP/s | conv-bound s/iteration | conv share of the time |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["modes"].items():
        spi = r["seconds_per_iteration"]
        def fmt(key, spec):
            return format(r[key], spec) if key in r else "-"

        rows.append(f"| {name} | {spi['median']:.2f} | {spi['mean']:.2f} | {r['peak_rss_bytes'] / 1e9:.2f} GB "
                    f"| {r['flops_per_iteration'] / 1e9:.0f} | {r['achieved_gflops']:.0f} "
                    f"| {fmt('fraction_of_best_conv_gflops', '.0%')} | {fmt('conv_bound_seconds_per_iteration', '.2f')} "
                    f"| {fmt('conv_bound_fraction', '.0%')} |")
    ref = report["reference_code_figures"]
    rows.append(f"| reference code (docs/METHOD.md) | {ref['seconds_per_iteration'][0]:.0f}-"
                f"{ref['seconds_per_iteration'][1]:.0f} | | {ref['peak_memory_gb']} GB | | | | | |")
    m = report["machine"]
    lines = [f"CPU: {m['cpu_model']} ({m['usable_cpus']} usable cores; {', '.join(m['cpu_flags'])}), "
             f"{m['threads']} threads, torch {m['torch']} ({m['torch_cpu_capability']}); load average "
             f"{m['load_average_at_start'][0]:.2f} at start, {m['load_average_at_end'][0]:.2f} at end", ""] + rows
    conv = report.get("conv_throughput")
    if conv:
        lines += ["", f"Convolution throughput on the network's shapes ({conv['threads']} threads): best "
                      f"{conv['best_gflops']:.0f} GFLOP/s ({conv['best_at']['kind']} of {conv['best_at']['input']} -> "
                      f"{conv['best_at']['out_channels']}, k{conv['best_at']['kernel'][0]}); one forward pass's "
                      f"convolutions together {conv['network_forward_gflops']:.0f} GFLOP/s"]
    for name, r in report["modes"].items():
        u = r.get("cpu_utilisation_median")
        if u is not None and u < 0.9:
            lines += [f"Warning: {name} used {u:.0%} of {m['threads']} threads' CPU time per iteration (median): "
                      f"the machine was busy or the threads stalled; timings are pessimistic"]
    chk = report.get("loss_check")
    if chk:
        lines += [f"Identical losses (first iteration, all {len(chk['terms'])} terms, rtol {chk['tolerance_relative']:g}):"
                  f" {'yes' if chk['identical'] else 'NO'} (max relative difference {chk['max_relative_difference']:.1e})"]
    if "speedup_vs_reference" in report:
        lines += [f"Ours vs the reference re-creation (median s/iteration): {report['speedup_vs_reference']:.2f}x faster"]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=10, help="timed iterations per mode (default 10)")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2; the first one is "
                                                          "counted by FlopCounterMode)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads (default: "
                                                                                     "the usable cores)")
    p.add_argument("--mode", choices=("ours", "reference", "both"), default="both")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "train_cpu.json")
    p.add_argument("--no-conv", action="store_true", help="skip the convolution-throughput measurement")
    p.add_argument("--conv-min-time", type=float, default=0.2, help="seconds per timing block of a conv shape")
    p.add_argument("--conv-repeats", type=int, default=3, help="timing blocks per conv shape (the best counts)")
    p.add_argument("--worker", choices=("ours", "reference", "conv"), help=argparse.SUPPRESS)
    p.add_argument("--worker-out", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0:
        p.error("--iterations must be >= 1 and --warmup >= 0")

    if args.worker:
        if args.worker == "conv":
            result = conv_worker(args.threads, args.conv_min_time, args.conv_repeats)
        else:
            result = train_worker(args.worker, args.iterations, args.warmup, args.threads)
        args.worker_out.write_text(json.dumps(result))
        return 0

    started = time.time()
    report = {
        "benchmark": "RA training iteration, paper configuration (ArchConfig defaults), batch 8, 128x128, "
                     "BatchNorm 'reference' mode, two Adam optimisers lr 5e-5, seed 2109, float32 on CPU",
        "command": " ".join(["python", "benchmarks/bench_train.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "machine": machine_info(args.threads),
        "iterations": args.iterations,
        "warmup": args.warmup,
        "reference_code_figures": REFERENCE_FIGURES,
        "modes": {},
    }
    if not args.no_conv:
        report["conv_throughput"] = run_worker(args, "conv")
    for mode in (("ours", "reference") if args.mode == "both" else (args.mode,)):
        report["modes"][mode] = run_worker(args, mode)

    conv = report.get("conv_throughput")
    for mode, r in report["modes"].items():
        spi = r["seconds_per_iteration"]["median"]
        r["achieved_gflops"] = r["flops_per_iteration"] / spi / 1e9
        r["peak_rss_under_3gb"] = r["peak_rss_bytes"] < PEAK_LIMIT_BYTES
        if conv:
            model = iteration_model(mode, conv)
            r["analytic"] = model
            r["analytic_over_counted_flops"] = model["flops"] / r["flops_per_iteration"]
            r["fraction_of_best_conv_gflops"] = r["achieved_gflops"] / conv["best_gflops"]
            r["conv_bound_seconds_per_iteration"] = model["conv_bound_seconds"]
            r["conv_bound_fraction"] = model["conv_bound_seconds"] / spi
    if len(report["modes"]) == 2:
        ours, ref = report["modes"]["ours"], report["modes"]["reference"]
        report["loss_check"] = compare_losses(ours, ref)
        report["speedup_vs_reference"] = (ref["seconds_per_iteration"]["median"]
                                          / ours["seconds_per_iteration"]["median"])
    ours = report["modes"].get("ours")
    if ours:
        report["ours_vs_reference_code_figures"] = {
            "no_slower_than_19_s": ours["seconds_per_iteration"]["median"] <= REFERENCE_FIGURES["seconds_per_iteration"][0],
            "peak_under_3_gb": ours["peak_rss_under_3gb"],
        }
    report["machine"]["load_average_at_end"] = list(os.getloadavg())
    report["wall_seconds"] = time.time() - started

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(markdown(report))
    print(f"\nwritten {args.out}")
    if report.get("loss_check") and not report["loss_check"]["identical"]:
        print("FAILED: the two modes' first-iteration losses differ by more than "
              f"{LOSS_RTOL:g} relative", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
