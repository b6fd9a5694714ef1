#!/usr/bin/env python
"""The prepared GPU run (issue 14): one command that, on one GPU machine lent for a few minutes, checks the CUDA paths
against the CPU, measures detection and training speed, and spends the time left training the bundled models'
configuration on the real cohorts, so that nothing of that short lease is lost to set-up or mistakes.

    python benchmarks/device_run.py prepare --run chest_ra=/work/runs/chest_ra --run brain_ra=/work/runs/brain_ra
    bash benchmarks/device_run.sh                      # on the GPU machine: the carried wheels, then `run --out $OUT`
    python benchmarks/device_run.py run --out DIR [--bundle .device_bundle] [--budget 480] [--dry-run]
    python benchmarks/device_run.py model --weights BACK/chest_ra.safetensors --out runs/chest_gpu/model

`prepare` (here, on the CPU machine) packs a compact bundle into `.device_bundle/` (ignored through
.git/info/exclude; the run's `carry` names it) from `ra train` run folders: each run's slice store as uint8 (xz),
its train/validation split, its exact options and architecture (from `checkpoints/latest.pt`), and its weights as
float16 safetensors (xz) when they fit. What travels to the machine (the working tree, the carried wheels and the
bundle) must stay under 64 MiB; `prepare` measures the tree and the wheels and leaves out what does not fit, saying
so. The optimiser states (twice the weights in float32) do not travel, only a summary of them (per parameter its
step count and the per-output-channel means of the second moment, 0.07 MB) from which a resumed run rebuilds Adam.

`run` writes everything worth keeping into `--out` (at most 8 files, 16 MiB each, 64 MiB together, names of letters,
digits, '.', '_' and '-'), phase by phase, each with a time budget inside `--budget` seconds; a phase that the time
left cannot hold is skipped with a note, and `summary.json` is rewritten after every phase, so that a run stopped at
its limit still returns what it did:

  a. correctness: CUDA against the CPU: CLAHE (identical, as Testing/test_clahe.py requires), LPIPS and the anomaly
     score (1e-4, Testing/test_scoring.py's tolerance), detection of the bundled scan with the bundled model
     (`ra_engine.detect(..., device=...)`), bfloat16 autocast training iterations against float32 from the same
     weights; then `pytest Testing/test_clahe.py Testing/test_scoring.py` (their CUDA tests skip without a GPU).
  b. speed: the stages of one `ra detect` input in this process (cold and warm, as bench_detect.py times them) and
     whole `ra detect` commands in a fresh process (bench_detect.run_command) on a 256x256x160 T1 volume
     (bench_detect.make_volume) and a 2048x2048 radiograph, with untrained paper-configuration models; iterations
     per second of the paper configuration and of the bundled models' configuration, float32 and bfloat16 autocast.
  c. training: each bundled cohort with the project's Trainer, resumed from the carried weights and Adam summary (or
     from the seed's initialisation when they did not travel), for an equal share of the time left; its weights (float16
     safetensors: the best validation epoch of this run, else the last step) and a JSON training log.
  d. `summary.json` and `summary.md`: the GPU, torch and CUDA versions, every figure, and what was skipped.

`--dry-run` rehearses the same command on the CPU with tiny inputs and networks and a few iterations (the CUDA
comparisons then report "skipped: no CUDA"); Testing/test_device_run.py runs it. `model` turns returned weights into
a model directory (weights in float32, a card saying where they were trained) for `ra calibrate` and `ra eval`.
See benchmarks/README.md, "The prepared GPU run".
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import datetime as _dt
import hashlib
import io
import json
import lzma
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

BUNDLE_FORMAT = 1
DEFAULT_BUNDLE = REPO / ".device_bundle"
DEFAULT_WHEELS = REPO / ".whl"
HEAD = REPO / "ra_engine" / "resources" / "reference" / "head.nii.gz"
DEMO_MODEL = "brain-t1-demo"
MIB = 2 ** 20
TRAVEL_LIMIT_MIB = 64           # the working tree that travels: tracked + untracked-not-ignored files + carried paths
EXPECTED_WHEELS_MIB = 29.3      # benchmarks/device_wheels.sh's output, assumed when .whl/ is not there yet
OUT_LIMITS = {"files": 8, "file_bytes": 16 * MIB, "total_bytes": 64 * MIB, "depth": 2}
OUT_NAME = re.compile(r"[A-Za-z0-9._-]+")
BUNDLE_SUFFIXES = (".slices.npy.xz", ".split.npz", ".weights.safetensors.xz")
SLICE_SCALE = 255               # slices travel as uint8: x = q / 255, an error of at most 1/510
LOSS_TRACE_POINTS = 400         # step losses kept per cohort in its training log
BUNDLED_ARCH = {"image_size": 64, "latent_dim": 128, "widths": (32, 64, 128, 256)}  # the bundled models' network
TOLERANCES = {
    "clahe_max_abs": 0.0,                 # Testing/test_clahe.py: identical to skimage on CPU and CUDA
    "score_anomaly_max_abs": 1e-4,        # Testing/test_scoring.py::test_gpu_scores_match_cpu
    "detect_scan_score_rel": 1e-2,
    "detect_pseudo_healthy_max_rel_range": 1e-2,
    "detect_dice_min": 0.95,
    "train_fp32_cpu_vs_cuda_rel": 1e-2,   # first iteration's loss_e and loss_d (TF32 convolutions on the GPU)
    "train_bf16_first_rel": 5e-2,         # first iteration's loss_e and loss_d, bf16 autocast vs float32
    "train_bf16_all_rel": 0.2,            # every iteration (the two trajectories drift apart slowly)
}


# ----------------------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------------------
def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _finite_or_none(value):
    """JSON has no infinities: inf and nan become None (a state read back turns a None best_val into inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value


def _error(exc: BaseException) -> dict:
    return {"status": "error", "error": f"{type(exc).__name__}: {exc}",
            "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-3000:]}


def _rel(a: float, b: float) -> float:
    """|a - b| / max(|b|, tiny): the relative difference of a against the reference b."""
    return abs(a - b) / max(abs(b), 1e-12)


def _say(message: str) -> None:
    print(f"[device_run {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _phase_status(result: dict) -> str:
    """"done" when every part of a phase ran (or was left out by design, as in a dry run), "partial" when a part
    was skipped for time, "error" when one failed."""
    parts = [v for v in result.values() if isinstance(v, dict) and "status" in v]
    if any(v["status"] in ("error", "timeout") for v in parts):
        return "error"
    if any(v["status"] == "skipped" and v.get("reason") == "out of time" for v in parts):
        return "partial"
    return "done"


class Budget:
    """Wall seconds since the run started against its total budget."""

    def __init__(self, total_s: float):
        self.start = time.monotonic()
        self.total = float(total_s)

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.total - self.elapsed()


# ----------------------------------------------------------------------------------------------------------------
# prepare: a run folder of `ra train` -> a compact bundle that travels
# ----------------------------------------------------------------------------------------------------------------
LOG_DATA = re.compile(r"ra_engine: data: (\{.*\}); held out: (\[.*\])\s*$")


def read_run_split(run: Path, store, config: dict) -> tuple[np.ndarray, np.ndarray, dict, list[str]]:
    """The run's train/validation slice indices as `ra train` made them, from the last "data: ...; held out: ..." line
    of its train.log (the only record of the held-out scans when `--val-data` was given), checked against the store:
    the same data fingerprint, slice counts and held-out scans."""
    from ra_engine.core.errors import DataError
    from ra_engine.training.slicestore import split_by_scan

    log = run / "train.log"
    if not log.is_file():
        raise DataError(f"{log} is missing: `prepare` reads the run's train/validation split from it; give the folder "
                        f"that `ra train --out` wrote")
    found = None
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        m = LOG_DATA.search(line)
        if m:
            found = m
    if found is None:
        raise DataError(f"{log} has no 'data: ...; held out: ...' line yet: wait until `ra train` has built its slice "
                        f"cache and started training, then prepare again")
    summary, held_out = ast.literal_eval(found.group(1)), ast.literal_eval(found.group(2))
    if summary.get("sha256") != cache_identity(store) or summary.get("slices") != len(store):
        raise DataError(f"the slice cache {store.folder} is not the one {log} describes (fingerprint or slice count "
                        f"differ): the cache was rebuilt for other data; prepare from a consistent run folder")
    if summary.get("val_fraction") is not None:
        train_idx, val_idx = split_by_scan(store, summary["val_fraction"], seed=config["seed"])
    else:
        held = set(held_out)
        chosen = [i for i, s in enumerate(store.sources) if str(s.image) in held]
        val_mask = np.isin(store.scan_index, chosen)
        train_idx, val_idx = np.flatnonzero(~val_mask), np.flatnonzero(val_mask)
    if (len(train_idx), len(val_idx)) != (summary.get("train_slices"), summary.get("val_slices")):
        raise DataError(f"the split recomputed from {store.folder} ({len(train_idx)} train, {len(val_idx)} validation "
                        f"slices) differs from {log} ({summary.get('train_slices')}, {summary.get('val_slices')})")
    return train_idx, val_idx, summary, held_out


def _npy_xz(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return lzma.compress(buffer.getvalue(), preset=6)


def _weights_blob(state: dict, dtype: str, metadata: dict, extra: dict | None = None) -> bytes:
    """The model's state dict as safetensors bytes, floating tensors in `dtype` (integer buffers kept), with the
    `extra` tensors (the Adam summary) as they are."""
    import torch
    from safetensors.torch import save

    target = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    tensors = {k: (v.to(target) if v.is_floating_point() else v).contiguous().cpu() for k, v in state.items()}
    tensors.update({k: v.contiguous().cpu() for k, v in (extra or {}).items()})
    return save(tensors, metadata={k: str(v) for k, v in metadata.items()})


ADAM_PREFIX = "adam."  # the Adam summary's keys in a carried weights file (the model's begin "encoder."/"decoder.")


def adam_summary(optimisers: dict) -> dict:
    """What travels of the two Adam states (`{"opt_e": state_dict, "opt_d": state_dict}`): per parameter, its step
    count and the mean of its second moment (exp_avg_sq) over each output channel (float32; 1D parameters whole), 17k
    numbers for the bundled network instead of two copies of the weights. `restore_adam` rebuilds an Adam state from
    it with the first moment at zero. Measured on the chest run resumed at step 2112 (validation loss 0.0340): three
    steps later 0.0364 with the real Adam states, 0.0358 with this summary, 0.0600 with fresh Adam states (whose first
    steps move every weight by about the learning rate, whatever its gradient)."""
    import torch

    out = {}
    for name, state in optimisers.items():
        for index, st in state["state"].items():
            v = st["exp_avg_sq"].float()
            channels = v.reshape(1) if v.dim() == 0 else v.reshape(v.shape[0], -1).mean(1)
            out[f"{ADAM_PREFIX}{name}.{index}.exp_avg_sq_channels"] = channels.contiguous()
            out[f"{ADAM_PREFIX}{name}.{index}.step"] = torch.as_tensor(st["step"], dtype=torch.float32).reshape(1)
    return out


def restore_adam(optimiser, name: str, summary: dict) -> int:
    """Loads into a fresh `optimiser` the state that `adam_summary` describes (first moments zero, second moments the
    per-channel means, the step counts kept, so that bias correction is that of a long run); returns how many
    parameters got one. A parameter whose shape does not fit its summary raises ValueError."""
    import torch

    state = optimiser.state_dict()
    params = [p for group in optimiser.param_groups for p in group["params"]]
    restored = 0
    for index, param in enumerate(params):
        key = f"{ADAM_PREFIX}{name}.{index}"
        if f"{key}.exp_avg_sq_channels" not in summary:
            continue
        channels = summary[f"{key}.exp_avg_sq_channels"].to(param.device, torch.float32)
        if param.dim() == 0:
            v = channels.reshape(()).clone()
        elif channels.numel() == param.shape[0]:
            v = channels.reshape((-1,) + (1,) * (param.dim() - 1)).expand_as(param).clone()
        else:
            raise ValueError(f"{key}: {channels.numel()} channel moments for a parameter of shape "
                             f"{tuple(param.shape)}: the bundle was made for another network")
        state["state"][index] = {"step": summary[f"{key}.step"].reshape(()).clone(),
                                 "exp_avg": torch.zeros_like(param), "exp_avg_sq": v.to(param.dtype)}
        restored += 1
    optimiser.load_state_dict(state)
    return restored


def cache_identity(store) -> str:
    """The data identity (what `ra train --resume` checks) of the sources a slice cache was built from, as they are
    on disk now."""
    from ra_engine.io.sources import Source
    from ra_engine.preprocess.presets import PresetConfig
    from ra_engine.training.pipeline import data_identity

    given = [Source(Path(image), Path(mask) if mask else None) for image, _, _, mask in store.fingerprint["sources"]]
    return data_identity(given, PresetConfig.from_dict(store.fingerprint["preset"]))


def pack_cohort(name: str, run: Path, weights_dtype: str) -> dict:
    """Everything one cohort needs on the GPU machine, as in-memory blobs plus its manifest entry (not yet written)."""
    from ra_engine.core.errors import DataError
    from ra_engine.network.config import ArchConfig
    from ra_engine.training.checkpoint import load_checkpoint
    from ra_engine.training.config import TrainConfig
    from ra_engine.training.slicestore import MANIFEST, SliceStore

    run = Path(run).expanduser().absolute()
    if not run.is_dir():
        raise DataError(f"run folder {run} does not exist: give the folder that `ra train --out` wrote")
    cache = run / "cache"
    if not (cache / MANIFEST).is_file():
        raise DataError(f"the slice cache {cache} is missing or not complete yet (no {MANIFEST}): wait until "
                        f"`ra train` has preprocessed the data (it writes {MANIFEST} last), then prepare again")
    latest = run / "checkpoints" / "latest.pt"
    if not latest.is_file():
        raise DataError(f"{latest} does not exist yet: the run's options and weights come from it; wait for its first "
                        f"checkpoint (every --checkpoint-every steps, and at each epoch's end), then prepare again")
    ckpt = load_checkpoint(latest)
    config = TrainConfig.from_dict({"method": "ra", **ckpt["config"]}).to_dict()
    arch = ArchConfig.from_dict(ckpt["arch"]).to_dict()
    store = SliceStore(cache)
    if ckpt.get("meta", {}).get("data") is not None:
        if ckpt["meta"]["data"] != cache_identity(store):
            raise DataError(f"{latest} was trained on other data than the cache {cache} holds: prepare from a "
                            f"consistent run folder")
    train_idx, val_idx, summary, held_out = read_run_split(run, store, config)

    images = np.asarray(store.images)
    quantised = np.rint(images * SLICE_SCALE).astype(np.uint8)
    error = float(np.abs(quantised.astype(np.float32) / SLICE_SCALE - images).max())
    slices_blob = _npy_xz(quantised)
    split_buffer = io.BytesIO()
    np.savez_compressed(split_buffer, train=train_idx.astype(np.int32), val=val_idx.astype(np.int32))
    split_blob = split_buffer.getvalue()
    state = dict(ckpt["state"])
    meta = {"cohort": name, "source": str(latest), "step": state["step"], "dtype": weights_dtype}
    adam = adam_summary({"opt_e": ckpt["opt_e"], "opt_d": ckpt["opt_d"]})
    weights_blob = lzma.compress(_weights_blob(ckpt["model"], weights_dtype, meta, adam), preset=6)
    common = Path(os.path.commonpath([str(s.image) for s in store.sources])) if store.sources else Path("/")
    entry = {
        "name": name,
        "run": str(run),
        "preset": store.fingerprint["preset"],
        "arch": arch,
        "config": config,
        "state": _finite_or_none(state),
        "data": {**{k: v for k, v in summary.items() if k != "skipped"}, "skipped": len(summary.get("skipped", [])),
                 "root": common.name,
                 "held_out": [os.path.relpath(p, common) if p.startswith(str(common)) else Path(p).name
                              for p in held_out]},
        "slices": {"file": f"{name}.slices.npy.xz", "shape": list(quantised.shape), "dtype": "uint8",
                   "scale": SLICE_SCALE, "max_quantisation_error": error, "bytes": len(slices_blob),
                   "sha256": _sha256(slices_blob),
                   "note": "the store's images only; the brain/body masks are not needed for training"},
        "split": {"file": f"{name}.split.npz", "train": int(len(train_idx)), "val": int(len(val_idx)),
                  "bytes": len(split_blob), "sha256": _sha256(split_blob)},
        "weights": None,
        "optimiser": "with the weights travels a summary of the two Adam states (per parameter its step count and "
                     "the per-output-channel means of its second moment; the states themselves are twice the weights "
                     "in float32): a resumed run rebuilds Adam from it, first moments at zero",
    }
    return {"entry": entry, "blobs": {entry["slices"]["file"]: slices_blob, entry["split"]["file"]: split_blob},
            "weights": {"file": f"{name}.weights.safetensors.xz", "blob": weights_blob, "dtype": weights_dtype,
                        "from": str(latest), "step": state["step"], "epoch": state["epoch"], "state": ckpt["model"]}}


def travelling_bytes(repo: Path) -> int:
    """What `run` sends besides the carried paths: tracked and untracked-but-not-ignored files of the checkout."""
    try:
        names = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others",
                                "--exclude-standard"], capture_output=True, check=True).stdout.split(b"\0")
    except (OSError, subprocess.CalledProcessError) as exc:
        raise SystemExit(f"cannot list the checkout's files with git ({exc}): run prepare inside the "
                         f"repository") from exc
    total = 0
    for name in {n for n in names if n}:
        path = repo / os.fsdecode(name)
        if path.is_file() and not path.is_symlink():
            total += path.stat().st_size
    return total


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).is_dir() else 0


def ensure_excluded(repo: Path, folder: Path) -> None:
    """Adds `/<folder>/` to .git/info/exclude when `folder` lies inside the checkout (so that it travels only when a
    call's `carry` names it, and never shows in `git status`)."""
    try:
        relative = Path(folder).absolute().relative_to(repo)
    except ValueError:
        return
    exclude = repo / ".git" / "info" / "exclude"
    line = f"/{relative.as_posix()}/"
    lines = exclude.read_text().splitlines() if exclude.is_file() else []
    if line not in lines:
        exclude.parent.mkdir(parents=True, exist_ok=True)
        with open(exclude, "a") as f:
            f.write(("" if not lines or exclude.read_text().endswith("\n") else "\n") + line + "\n")


def cmd_prepare(args) -> int:
    """Packs the bundle (see the module docstring) and prints its sizes against the travel limit."""
    from ra_engine.core.errors import RAError

    runs = []
    for spec in args.run:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).name, spec
        if not OUT_NAME.fullmatch(name):
            raise SystemExit(f"cohort name {name!r}: use letters, digits, '.', '_' and '-' (it names returned files)")
        runs.append((name, Path(path)))
    if len({n for n, _ in runs}) != len(runs):
        raise SystemExit("two --run options have the same cohort name: give NAME=RUN_DIR with distinct names")
    bundle = Path(args.bundle).absolute()
    limit = args.limit_mib * MIB
    margin = args.margin_mib * MIB
    tree = travelling_bytes(REPO)
    if Path(args.wheels).is_dir():
        wheels = folder_bytes(Path(args.wheels))
    else:
        wheels = int(EXPECTED_WHEELS_MIB * MIB)
        print(f"note: {args.wheels} does not exist yet; assuming {EXPECTED_WHEELS_MIB} MiB of wheels "
              f"(run benchmarks/device_wheels.sh first for the real figure)", file=sys.stderr)
    room = limit - margin - tree - wheels
    packed = []
    for name, run in runs:
        try:
            packed.append(pack_cohort(name, run, args.weights_dtype))
        except RAError as exc:
            raise SystemExit(f"prepare {name} ({run}): {exc}") from exc
    required = sum(len(b) for p in packed for b in p["blobs"].values()) + 64 * 1024  # + the manifest
    if required > room:
        raise SystemExit(f"the slices alone ({required / MIB:.1f} MiB) do not fit the {room / MIB:.1f} MiB left under "
                         f"the {args.limit_mib} MiB travel limit (tree {tree / MIB:.1f} MiB, wheels "
                         f"{wheels / MIB:.1f} MiB, margin {args.margin_mib} MiB): prepare fewer cohorts")
    used = required
    for p in packed:
        w, entry = p["weights"], p["entry"]
        size = len(w["blob"])
        fits = used + size <= room
        if args.weights == "all" and not fits:
            raise SystemExit(f"the weights of {entry['name']} ({size / MIB:.1f} MiB) do not fit "
                             f"({(room - used) / MIB:.1f} MiB left): use --weights auto (they are then left out) or "
                             f"prepare fewer cohorts")
        if args.weights != "none" and fits:
            p["blobs"][w["file"]] = w["blob"]
            entry["weights"] = {"file": w["file"], "dtype": w["dtype"], "from": w["from"], "step": w["step"],
                                "epoch": w["epoch"], "bytes": size, "sha256": _sha256(w["blob"])}
            used += size
        else:
            why = "--weights none" if args.weights == "none" else (
                f"their {size / MIB:.1f} MiB ({w['dtype']}, xz) exceed the {(room - used) / MIB:.1f} MiB left under "
                f"the travel limit")
            if args.weights != "none" and w["dtype"] == "float16":
                smaller = len(lzma.compress(_weights_blob(w["state"], "bfloat16", {}), preset=6))
                why += f"; as --weights-dtype bfloat16 they would take {smaller / MIB:.1f} MiB"
            entry["weights_note"] = f"left out: {why}"
    if bundle.exists():  # an earlier bundle's files (only those: the folder may hold others)
        for old in bundle.iterdir():
            if old.is_file() and (old.name == "manifest.json" or old.name.endswith(BUNDLE_SUFFIXES)):
                old.unlink()
    bundle.mkdir(parents=True, exist_ok=True)
    ensure_excluded(REPO, bundle)
    for p in packed:
        for file, blob in p["blobs"].items():
            (bundle / file).write_bytes(blob)
    manifest = {"format": BUNDLE_FORMAT, "created": _now(), "made_by": "benchmarks/device_run.py prepare",
                "command": sys.argv, "cohorts": [p["entry"] for p in packed],
                "sizes": {"limit_bytes": limit, "margin_bytes": margin, "tree_bytes": tree, "wheels_bytes": wheels,
                          "bundle_bytes": 0}}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))
    manifest["sizes"]["bundle_bytes"] = folder_bytes(bundle)
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=1))
    total = tree + wheels + manifest["sizes"]["bundle_bytes"]
    print(f"bundle {bundle}: {manifest['sizes']['bundle_bytes'] / MIB:.2f} MiB")
    for p in packed:
        e = p["entry"]
        w = e["weights"]
        print(f"  {e['name']}: {e['slices']['shape'][0]} slices {e['slices']['bytes'] / MIB:.2f} MiB, split "
              f"{e['split']['train']}/{e['split']['val']}, step {e['state']['step']}, weights "
              + (f"{w['bytes'] / MIB:.2f} MiB ({w['dtype']}, step {w['step']})" if w else
                 f"{e['weights_note']}; the GPU run trains it from the seed's initialisation"))
    print(f"travels: tree {tree / MIB:.2f} + wheels {wheels / MIB:.2f} + bundle "
          f"{manifest['sizes']['bundle_bytes'] / MIB:.2f} = {total / MIB:.2f} MiB of {args.limit_mib} MiB")
    return 0


# ----------------------------------------------------------------------------------------------------------------
# Inputs shared by the checks
# ----------------------------------------------------------------------------------------------------------------
_HEAD_CACHE: dict = {}


def head_volume() -> np.ndarray:
    """The bundled reference head (z, y, x) scaled to [0, 1] by its range."""
    if "head" not in _HEAD_CACHE:
        import ra_engine

        v = ra_engine.read_image(HEAD).array.astype(np.float32)
        _HEAD_CACHE["head"] = (v - v.min()) / (v.max() - v.min())
    return _HEAD_CACHE["head"]


def head_slices(size: int | None, count: int, step: int = 3):
    """`count` axial slices of the bundled head (every `step`-th from the middle third on), resized bilinearly to
    size x size (None: their own size): a float32 torch tensor (count, H, W) in [0, 1]."""
    import torch
    import torch.nn.functional as F

    v = head_volume()
    start = len(v) // 4
    picks = [start + (i * step) % max(1, len(v) // 2) for i in range(count)]
    stack = torch.from_numpy(np.ascontiguousarray(v[picks]))
    if size is not None:
        stack = F.interpolate(stack[:, None], size=(size, size), mode="bilinear", align_corners=False)[:, 0]
    return stack.clamp(0, 1).contiguous()


@contextlib.contextmanager
def strict_fp32():
    """CUDA convolutions and matrix products in full float32 (no TF32) inside the block."""
    import torch

    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def _max_abs(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max()) if a.size else 0.0


# ----------------------------------------------------------------------------------------------------------------
# Phase a: CUDA against the CPU
# ----------------------------------------------------------------------------------------------------------------
def check_clahe(device: str) -> dict:
    """`clahe_torch` on `device` against the CPU: real head slices at 64, 128 and their own size (kernels that are not
    powers of two take the float64 path) and noise; Testing/test_clahe.py asks for identical results."""
    import torch
    from ra_engine.scoring.clahe import clahe_torch

    cases = {"head_64": head_slices(64, 16), "head_128": head_slices(128, 16), "head_native": head_slices(None, 8),
             "noise_100x130": torch.from_numpy(np.random.default_rng(9).random((4, 100, 130), dtype=np.float32))}
    out = {}
    for name, images in cases.items():
        cpu = clahe_torch(images)
        gpu = clahe_torch(images.to(device)).cpu()
        out[name] = {"shape": list(images.shape), "max_abs_diff": _max_abs(gpu, cpu)}
    worst = max(c["max_abs_diff"] for c in out.values())
    return {"status": "pass" if worst <= TOLERANCES["clahe_max_abs"] else "fail", "max_abs_diff": worst,
            "tolerance": TOLERANCES["clahe_max_abs"], "cases": out}


def check_scoring(device: str, scorers: dict) -> dict:
    """The anomaly score (CLAHE, LPIPS-alex with the bundled weights, blur, product) on `device` against the CPU, on
    8 real head slices at 128 and stand-in reconstructions (blurred, noisy, partly outside [0, 1]); with TF32 as
    PyTorch sets it and with strict float32."""
    import torch
    from ra_engine.scoring.scorer import gaussian_blur

    x = head_slices(128, 8)[:, None]
    noise = torch.from_numpy(np.random.default_rng(1).normal(0, 0.03, x.shape).astype(np.float32))
    x_ph = gaussian_blur(x, 1.5) + noise
    cpu = scorers["cpu"].score(x, x_ph)
    gpu = scorers["gpu"].score(x, x_ph)
    diffs = {k: _max_abs(getattr(gpu, k), getattr(cpu, k)) for k in ("anomaly", "s1", "s2", "clahe_x", "clahe_ph")}
    with strict_fp32():
        strict = scorers["gpu"].score(x, x_ph)
    strict_diff = _max_abs(strict.anomaly, cpu.anomaly)
    ok = diffs["anomaly"] <= TOLERANCES["score_anomaly_max_abs"] and diffs["clahe_x"] == diffs["clahe_ph"] == 0
    return {"status": "pass" if ok else "fail", "tolerance_anomaly_max_abs": TOLERANCES["score_anomaly_max_abs"],
            "max_abs_diff": diffs, "anomaly_max_abs_diff_strict_fp32": strict_diff,
            "anomaly_cpu_max": float(cpu.anomaly.max()), "lpips_backbone_source":
                getattr(scorers["cpu"].lpips, "backbone_source", None)}


def _compare_detections(a, b) -> dict:
    """Differences of detection b against the reference a (same scan): maps, scores, the detections at the default
    flag rate (Dice), the alignment."""
    ph_a, ph_b = a.pseudo_healthy.array.astype(np.float64), b.pseudo_healthy.array.astype(np.float64)
    span = float(ph_a.max() - ph_a.min()) or 1.0
    an_a, an_b = a.anomaly.array.astype(np.float64), b.anomaly.array.astype(np.float64)
    det_a = a.detections_at().array > 0 if a.calibration is not None else None
    det_b = b.detections_at().array > 0 if b.calibration is not None else None
    dice = None
    if det_a is not None and det_b is not None:
        total = int(det_a.sum() + det_b.sum())
        dice = 1.0 if total == 0 else float(2 * np.logical_and(det_a, det_b).sum() / total)
    slice_rel = [_rel(sb["score"], sa["score"]) for sa, sb in zip(a.slice_scores, b.slice_scores)]
    timing = lambda alignment: {k: v for k, v in alignment.items() if "seconds" not in k}
    align_a, align_b = timing(a.slices.space.alignment), timing(b.slices.space.alignment)
    return {
        "pseudo_healthy_max_abs": float(np.abs(ph_b - ph_a).max()),
        "pseudo_healthy_max_rel_range": float(np.abs(ph_b - ph_a).max() / span),
        "anomaly_max_abs": float(np.abs(an_b - an_a).max()),
        "anomaly_mean_abs": float(np.abs(an_b - an_a).mean()),
        "anomaly_reference_max": float(an_a.max()),
        "scan_score": [a.scan_score, b.scan_score],
        "scan_score_rel": _rel(b.scan_score, a.scan_score),
        "slice_score_max_rel": max(slice_rel) if slice_rel else None,
        "dice_at_default_flag_rate": dice,
        "alignment_identical": json.dumps(align_a, sort_keys=True, default=str) ==
                               json.dumps(align_b, sort_keys=True, default=str),
    }


def check_detect(device: str, scorers: dict) -> dict:
    """`ra_engine.detect` of the bundled scan with the bundled model on `device` against the CPU (the alignment
    runs on the CPU in both), with TF32 as PyTorch sets it and with strict float32; and, for the record, bfloat16
    autocast detection (`ra detect --amp`) against float32 on the GPU."""
    import ra_engine

    image = ra_engine.read_image(HEAD)
    t = time.perf_counter()
    cpu = ra_engine.detect(DEMO_MODEL, image, device="cpu", scorer=scorers["cpu"])
    cpu_s = time.perf_counter() - t
    t = time.perf_counter()
    gpu = ra_engine.detect(DEMO_MODEL, image, device=device, scorer=scorers["gpu"])
    gpu_s = time.perf_counter() - t
    with strict_fp32():
        strict = ra_engine.detect(DEMO_MODEL, image, device=device, scorer=scorers["gpu"])
    amp_model = ra_engine.load_model(DEMO_MODEL, device=device, amp=True)
    amp = ra_engine.detect(amp_model, image, scorer=scorers["gpu"])
    default = _compare_detections(cpu, gpu)
    ok = (default["scan_score_rel"] <= TOLERANCES["detect_scan_score_rel"]
          and default["pseudo_healthy_max_rel_range"] <= TOLERANCES["detect_pseudo_healthy_max_rel_range"]
          and (default["dice_at_default_flag_rate"] is None
               or default["dice_at_default_flag_rate"] >= TOLERANCES["detect_dice_min"]))
    return {"status": "pass" if ok else "fail", "model": DEMO_MODEL, "scan": str(HEAD.relative_to(REPO)),
            "tolerances": {k: v for k, v in TOLERANCES.items() if k.startswith("detect_")},
            "cuda_vs_cpu": default, "cuda_strict_fp32_vs_cpu": _compare_detections(cpu, strict),
            "cuda_bf16_autocast_vs_cuda_fp32": _compare_detections(gpu, amp),
            "seconds": {"cpu": cpu_s, "cuda_first_call": gpu_s}}


def train_losses(arch, config, device: str, batches: list, amp: bool) -> list[dict]:
    """The named losses of `len(batches)` RA iterations (`train_iteration`) from the seed's weights on `device`;
    z_p and every eps of iteration k come from the Trainer's (seed, k) generator, so runs on two devices or in two
    precisions draw the same numbers."""
    import torch
    from ra_engine.network.model import set_batchnorm_mode
    from ra_engine.runtime.distributed import ProcessGroup
    from ra_engine.training.trainer import build_model, sharded_noise, step_generator, train_iteration

    model, opt_e, opt_d = build_model(arch, config, torch.device(device))
    model.train()
    set_batchnorm_mode(model, config.batchnorm)
    out = []
    for k, x in enumerate(batches):
        g = step_generator(config.seed, k)
        z_p = torch.randn(config.batch_size, arch.latent_dim, generator=g).to(device)
        out.append(train_iteration(model, opt_e, opt_d, x[:, None].to(device), z_p, config.weights,
                                   sharded_noise(g, ProcessGroup.current()), amp=amp))
    return out


def _loss_rel(runs: list[dict], reference: list[dict]) -> list[float]:
    return [max(_rel(r["loss_e"], f["loss_e"]), _rel(r["loss_d"], f["loss_d"])) for r, f in zip(runs, reference)]


def check_amp_training(device: str, iterations: int = 5, configs: tuple = ("bundled_64", "paper_128")) -> dict:
    """bfloat16 autocast RA iterations against float32 from the same weights and draws, on real head slices (8 a
    batch): every loss finite, the losses close; and float32 on the GPU against the CPU for the bundled
    configuration."""
    from ra_engine.network.config import ArchConfig
    from ra_engine.training.config import TrainConfig

    archs = {"bundled_64": (ArchConfig(**BUNDLED_ARCH), 2e-4), "paper_128": (ArchConfig(), 5e-5)}
    result, ok = {}, True
    for label in configs:
        arch, lr = archs[label]
        config = TrainConfig(lr=lr)
        pool = head_slices(arch.image_size, config.batch_size * iterations, step=1)
        batches = [pool[k * config.batch_size:(k + 1) * config.batch_size] for k in range(iterations)]
        fp32 = train_losses(arch, config, device, batches, amp=False)
        bf16 = train_losses(arch, config, device, batches, amp=True)
        finite = all(math.isfinite(v) for run in (fp32, bf16) for it in run for v in it.values())
        rel = _loss_rel(bf16, fp32)
        entry = {"arch": arch.to_dict(), "lr": lr, "batchnorm": config.batchnorm, "iterations": iterations,
                 "all_finite": finite, "bf16_vs_fp32_rel_per_iteration": rel,
                 "losses_fp32": fp32, "losses_bf16": bf16}
        good = finite and rel[0] <= TOLERANCES["train_bf16_first_rel"] and max(rel) <= TOLERANCES["train_bf16_all_rel"]
        if label == "bundled_64":
            cpu = train_losses(arch, config, "cpu", batches[:2], amp=False)
            entry["cuda_fp32_vs_cpu_fp32_rel_per_iteration"] = _loss_rel(fp32[:2], cpu)
            entry["losses_cpu_fp32"] = cpu
            first = entry["cuda_fp32_vs_cpu_fp32_rel_per_iteration"][0]
            good = good and first <= TOLERANCES["train_fp32_cpu_vs_cuda_rel"]
        entry["status"] = "pass" if good else "fail"
        ok = ok and good
        result[label] = entry
    return {"status": "pass" if ok else "fail",
            "tolerances": {k: v for k, v in TOLERANCES.items() if k.startswith("train_")}, "configs": result}


def run_pytest(timeout_s: float) -> dict:
    """`pytest Testing/test_clahe.py Testing/test_scoring.py` in a subprocess (PIP_NO_INDEX: the tests that fetch
    registry data skip at once instead of waiting on a network that is not there); per-test outcomes of the CUDA
    tests from its JUnit XML."""
    import xml.etree.ElementTree as ET

    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        cmd = [sys.executable, "-m", "pytest", "Testing/test_clahe.py", "Testing/test_scoring.py", "-q",
               "-p", "no:cacheprovider", f"--junitxml={junit}"]
        env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
        t = time.perf_counter()
        try:
            done = subprocess.run(cmd, cwd=str(REPO), env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            tail = (exc.stdout or "")[-2000:] if isinstance(exc.stdout, str) else ""
            return {"status": "timeout", "timeout_s": timeout_s, "output_tail": tail}
        seconds = time.perf_counter() - t
        outcomes = {}
        if junit.is_file():
            for case in ET.parse(junit).getroot().iter("testcase"):
                name = f"{case.get('classname', '')}::{case.get('name', '')}"
                kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
                outcomes[name] = kind
    counts = {k: sum(1 for v in outcomes.values() if v == k) for k in ("passed", "failure", "error", "skipped")}
    cuda = {n: v for n, v in outcomes.items() if "cuda" in n.lower() or "gpu" in n.lower()}
    lines = (done.stdout or "").strip().splitlines()
    return {"status": "pass" if done.returncode == 0 else "fail", "returncode": done.returncode,
            "command": " ".join(cmd[2:5]), "seconds": seconds, "counts": counts, "cuda_tests": cuda,
            "summary_line": lines[-1] if lines else "",
            "output_tail": ((done.stdout or "") + (done.stderr or ""))[-3000:]}


def phase_correctness(ctx) -> dict:
    device = ctx.device
    if not ctx.cuda:
        reason = "skipped: no CUDA"
        return {"status": "skipped", "reason": reason, "clahe": reason, "scoring": reason, "detect": reason,
                "amp_training": reason,
                "pytest": "skipped: the dry run has no GPU; these files run in the normal test suite, where their "
                          "CUDA tests skip"}
    import ra_engine

    result = {}
    scorers = {"cpu": ra_engine.make_scorer(ra_engine.load_model(DEMO_MODEL, device="cpu")),
               "gpu": ra_engine.make_scorer(ra_engine.load_model(DEMO_MODEL, device=device))}
    steps = [("clahe", lambda: check_clahe(device), 5), ("scoring", lambda: check_scoring(device, scorers), 5),
             ("detect", lambda: check_detect(device, scorers), 10),
             ("amp_training", lambda: check_amp_training(device), 15),
             ("pytest", lambda: run_pytest(max(10.0, min(100.0, ctx.phase_left() - 3))), 20)]
    for name, fn, minimum in steps:
        result[name] = ctx.step(name, fn, minimum)
    states = [v.get("status") for v in result.values() if isinstance(v, dict)]
    if states and all(s == "pass" for s in states):
        result["status"] = "pass"
    elif any(s in ("fail", "error", "timeout") for s in states):
        result["status"] = "fail"
    else:
        result["status"] = "partial"  # some checks skipped for time, none failed
    return result


# ----------------------------------------------------------------------------------------------------------------
# Phase b: speed
# ----------------------------------------------------------------------------------------------------------------
def make_radiograph(path: Path, side: int) -> None:
    """A radiograph-like 2D image from bundled real anatomy: the reference head projected front to back (a skull
    radiograph's geometry, the sum of its attenuation), top of the head up, resized bilinearly to side x side and
    stored as a 12-bit value in a 16-bit PNG. Nothing is downloaded (bench_detect.py's radiograph needs pydicom-data,
    which the GPU machine lacks); for timing, only the size matters."""
    import torch
    import torch.nn.functional as F
    import ra_engine

    projection = head_volume().sum(axis=1)[::-1].copy()  # (z, x), superior row first
    image = F.interpolate(torch.from_numpy(projection)[None, None], size=(side, side), mode="bilinear",
                          align_corners=False)[0, 0].numpy()
    image = np.rint(image / image.max() * 4095).astype(np.float32)
    ra_engine.write_image(ra_engine.Image(image, ra_engine.Geometry.identity(2, (400 / side, 400 / side))), path,
                          dtype="uint16")


def make_speed_model(directory: Path, preset_name: str, arch, calibrate_on: Path, device: str, scorer=None) -> None:
    """An untrained model of `arch` with the `preset_name` preset at its image size and a speed-only calibration (the
    quantiles of its own anomaly map on `calibrate_on`, as bench_detect.make_model does, so that the default flag
    rate flags about 5% of the mask)."""
    import torch
    import ra_engine
    from ra_engine.models.card import ModelCard, write_card
    from ra_engine.models.modeldir import save_model_dir
    from ra_engine.network.model import ReversedAutoEncoder
    from ra_engine.thresholds.table import calibration_table

    preset = ra_engine.preset_config(preset_name, image_size=arch.image_size)
    torch.manual_seed(2109)
    card = ModelCard(name=f"speed-{preset_name}-untrained", architecture=arch, preset=preset,
                     method_description="UNTRAINED weights, calibrated on one benchmark input: for timing `ra detect` "
                                        "only; its anomaly maps and detections mean nothing")
    save_model_dir(directory, ReversedAutoEncoder(arch).state_dict(), card)
    found = ra_engine.detect(ra_engine.load_model(directory, device=device), calibrate_on, scorer=scorer)
    card = ra_engine.read_card(directory)
    card.calibration = calibration_table(found.anomaly_stack[found.slices.masks])
    write_card(directory, card)


def detect_stages(input_path: Path, model_dir: Path, out_dir: Path, device: str, batch_size: int) -> dict:
    """The stages of one `ra detect` input timed in this process, as bench_detect.py's "stages" worker times them
    (which cannot run here: it reads the card's preset as a dict, and cards now hold a PresetConfig): read,
    alignment/preprocessing, the network and the scorer inside the real `detect_slices` (their calls timed in place,
    with a device sync around the network), mapping back (the rest of `detect_slices`), and the outputs
    (`detections_at`, `write_outputs` with the report); then `detect_slices` a second, warm time."""
    import torch
    from ra_engine.detection.outputs import plan_jobs, write_outputs
    from ra_engine.detection.pipeline import check_input, detect_slices, scorer_for
    from ra_engine.io.images import read_image, validate_image
    from ra_engine.io.sources import Source
    from ra_engine.models.modeldir import load_model
    from ra_engine.preprocess.pipeline import preprocess

    cuda = str(device).startswith("cuda")
    sync = (lambda: torch.cuda.synchronize()) if cuda else (lambda: None)
    model = load_model(model_dir, device=device)
    scorer = scorer_for(model)
    times: dict[str, float] = {}

    def timed(name: str, fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        times[name] = time.perf_counter() - t
        return out

    image = timed("read", lambda: read_image(input_path))

    def align():
        validate_image(image)
        check_input(model, image)
        return preprocess(image, model.card.preset)

    slices = timed("alignment_preprocess", align)
    network = model.inference_network
    reconstruct, score = network.reconstruct, scorer.score
    inner = {"network": 0.0, "scoring": 0.0}

    def timed_reconstruct(x):
        sync()
        t = time.perf_counter()
        out = reconstruct(x)
        sync()
        inner["network"] += time.perf_counter() - t
        return out

    def timed_score(x, rec):
        t = time.perf_counter()
        out = score(x, rec)  # returns numpy maps: the device is synchronised
        inner["scoring"] += time.perf_counter() - t
        return out

    def run_slices():
        inner.update(network=0.0, scoring=0.0)
        return timed("detect_slices", lambda: detect_slices(model, slices, scorer, image.geometry,
                                                            batch_size=batch_size, source=image.source))

    network.reconstruct, scorer.score = timed_reconstruct, timed_score
    try:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        found = run_slices()
        times.update(network=inner["network"], scoring=inner["scoring"],
                     map_back=times.pop("detect_slices") - inner["network"] - inner["scoring"])
        run_slices()
        warm = {"detect_slices_seconds": times.pop("detect_slices"), "network": inner["network"],
                "scoring": inner["scoring"]}
    finally:
        network.reconstruct, scorer.score = reconstruct, score

    def outputs():
        threshold = float(found.threshold_at())
        detections = found.detections_at(threshold)
        job = plan_jobs([Source(Path(input_path).absolute())], Path(out_dir))[0]
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        flag_rate = float(model.card.calibration.default_flag_rate)
        write_outputs(job, image, found, detections, lambda: found.report(detections, threshold, flag_rate))

    timed("outputs", outputs)
    cold = sum(times[k] for k in ("read", "alignment_preprocess", "network", "scoring", "map_back"))
    per_volume_warm = times["read"] + times["alignment_preprocess"] + warm["detect_slices_seconds"]
    used = int(np.count_nonzero(slices.masks.reshape(len(slices), -1).any(1)))
    out = {"status": "done", "input_shape": list(image.array.shape), "model_slices": len(slices),
           "slices_used": used, "batch_size": batch_size, "stage_seconds_cold": times,
           "network_scoring_mapback_seconds_warm": warm["detect_slices_seconds"],
           "network_seconds_warm": warm["network"], "scoring_seconds_warm": warm["scoring"],
           "detect_seconds_cold": cold, "detect_seconds_warm_network": per_volume_warm,
           "under_1s_warm": per_volume_warm < 1.0,
           "network_and_scoring_under_1s_warm": warm["detect_slices_seconds"] < 1.0,
           "alignment": dict(slices.space.alignment)}
    if cuda:
        out["cuda_max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
    return out


def train_speed(arch, amp: bool, device: str, min_seconds: float, warmup: int, min_iterations: int) -> dict:
    """Iterations per second of `train_iteration` (both steps and both Adam updates) at batch 8 on random images in
    [0, 1] (the cost does not depend on them), z_p and eps drawn per step as the Trainer draws them."""
    import torch
    from ra_engine.network.model import set_batchnorm_mode
    from ra_engine.runtime.distributed import ProcessGroup
    from ra_engine.training.config import TrainConfig
    from ra_engine.training.trainer import build_model, sharded_noise, step_generator, train_iteration

    config = TrainConfig()
    dev = torch.device(device)
    model, opt_e, opt_d = build_model(arch, config, dev)
    model.train()
    set_batchnorm_mode(model, config.batchnorm)
    x = torch.rand(config.batch_size, 1, arch.image_size, arch.image_size, generator=torch.Generator().manual_seed(0))
    x = x.to(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)

    def one(k: int) -> None:
        g = step_generator(config.seed, k)
        z_p = torch.randn(config.batch_size, arch.latent_dim, generator=g).to(dev)
        train_iteration(model, opt_e, opt_d, x, z_p, config.weights, sharded_noise(g, ProcessGroup.current()), amp=amp)

    for k in range(warmup):
        one(k)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    n, start = 0, time.perf_counter()
    while n < min_iterations or time.perf_counter() - start < min_seconds:
        one(warmup + n)
        n += 1
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - start
    out = {"arch": arch.to_dict(), "batch_size": config.batch_size, "amp_bf16": amp, "warmup": warmup,
           "iterations": n, "seconds": seconds, "iterations_per_second": n / seconds,
           "seconds_per_iteration": seconds / n}
    if dev.type == "cuda":
        out["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
    return out


def phase_speed(ctx) -> dict:
    """Detection stages (in this process) and whole commands (bench_detect.run_command), and training iterations
    per second."""
    import torch
    import ra_engine
    import bench_detect

    dry, device, work = ctx.dry, ctx.device, ctx.work
    threads = torch.get_num_threads()
    if dry:
        arch = ra_engine.ArchConfig(image_size=32, latent_dim=16, widths=(8, 16))
        volume = {"shape": (40, 64, 64), "spacing": (3.6, 3.6, 4.8)}
        side, batch = 256, 8
    else:
        arch = ra_engine.ArchConfig()  # the paper's network, as bench_detect.py times it
        volume = {"shape": bench_detect.INPUTS["t1_256"]["shape"], "spacing": bench_detect.INPUTS["t1_256"]["spacing"]}
        side, batch = bench_detect.INPUTS["xray_2048"]["shape"][0], 32
    result: dict = {"device": device, "threads": threads, "batch_size": batch,
                    "models": f"untrained, {arch.to_dict()}, presets brain-mri and xray at {arch.image_size} px, "
                              f"LPIPS alex, speed-only calibrations"}
    paths = {"t1": work / "t1.nii.gz", "radiograph": work / "radiograph.png",
             "model_brain": work / "model_brain", "model_xray": work / "model_xray"}

    def inputs():
        t = time.perf_counter()
        bench_detect.make_volume(paths["t1"], volume["shape"], volume["spacing"])
        make_radiograph(paths["radiograph"], side)
        scorer = ra_engine.make_scorer(ra_engine.load_model(DEMO_MODEL, device=device))
        make_speed_model(paths["model_brain"], "brain-mri", arch, paths["t1"], device, scorer)
        make_speed_model(paths["model_xray"], "xray", arch, paths["radiograph"], device, scorer)
        return {"status": "done", "seconds": time.perf_counter() - t,
                "t1": {"shape_zyx": list(volume["shape"]), "spacing_xyz": list(volume["spacing"]),
                       "made_by": "bench_detect.make_volume (the bundled head resampled)"},
                "radiograph": {"shape": [side, side], "made_by": "make_radiograph (the bundled head projected; "
                                                                 "16-bit PNG)"}}

    result["inputs"] = ctx.step("inputs", inputs, 10)
    if result["inputs"].get("status") != "done":
        return {**result, "status": "error"}
    for name, model in (("t1", "model_brain"), ("radiograph", "model_xray")):
        result[f"stages_{name}"] = ctx.step(
            f"stages_{name}", lambda name=name, model=model: detect_stages(
                paths[name], paths[model], work / f"out_stages_{name}", device, batch), 10)
    options = SimpleNamespace(threads=threads, device=device, batch_size=batch)
    for name, model in (("t1", "model_brain"), ("radiograph", "model_xray")):
        if dry and name == "t1":
            result["command_t1"] = {"status": "skipped", "reason": "dry run: one fresh-process `ra detect` (the "
                                                                   "radiograph) is enough to rehearse it"}
            continue
        result[f"command_{name}"] = ctx.step(
            f"command_{name}", lambda name=name, model=model: {"status": "done", **bench_detect.run_command(
                options, str(paths[name]), str(paths[model]), work / f"out_cmd_{name}")}, 15)
    if not dry:
        result["import_seconds"] = ctx.step("import_seconds", lambda: bench_detect.import_seconds(options), 10)
    archs = ({"tiny_16": ra_engine.ArchConfig(image_size=16, latent_dim=4, widths=(4, 8))} if dry else
             {"paper_128": ra_engine.ArchConfig(), "bundled_64": ra_engine.ArchConfig(**BUNDLED_ARCH)})
    timing = dict(min_seconds=0.0, warmup=1, min_iterations=2) if dry else dict(min_seconds=3.0, warmup=5,
                                                                                 min_iterations=20)
    for label, a in archs.items():
        for amp in (False, True):
            key = f"train_{label}_{'bf16' if amp else 'fp32'}"
            result[key] = ctx.step(
                key, lambda a=a, amp=amp: {"status": "done", **train_speed(a, amp, device, **timing)}, 8)
    result["status"] = _phase_status(result)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Phase c: training on the bundled cohorts
# ----------------------------------------------------------------------------------------------------------------
def read_bundle(bundle: Path) -> dict:
    manifest_path = Path(bundle) / "manifest.json"
    if not manifest_path.is_file():
        raise FileNotFoundError(f"no bundle at {bundle} (no manifest.json): run `python benchmarks/device_run.py "
                                f"prepare --run NAME=RUN_DIR ...` on the CPU machine and name the folder in `carry`")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"{manifest_path} has bundle format {manifest.get('format')}, this script reads "
                         f"{BUNDLE_FORMAT}: prepare the bundle again")
    return manifest


def _bundle_file(bundle: Path, spec: dict) -> bytes:
    data = (Path(bundle) / spec["file"]).read_bytes()
    if _sha256(data) != spec["sha256"]:
        raise ValueError(f"{spec['file']} in {bundle} does not match its manifest (sha256): prepare the bundle again")
    return data


def unpack_cohort(bundle: Path, entry: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict | None]:
    """The cohort's slices as float32 (N, H, W) in [0, 1], its train and validation indices, and its carried weights
    as a float32 state dict (None when they did not travel)."""
    images = np.load(io.BytesIO(lzma.decompress(_bundle_file(bundle, entry["slices"]))), allow_pickle=False)
    images = images.astype(np.float32) / float(entry["slices"]["scale"])
    split = np.load(io.BytesIO(_bundle_file(bundle, entry["split"])))
    weights = None
    if entry.get("weights"):
        from safetensors.torch import load

        tensors = load(lzma.decompress(_bundle_file(bundle, entry["weights"])))
        weights = {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}  # Adam summary too
    return images, split["train"].astype(np.int64), split["val"].astype(np.int64), weights


def _downsample(trace: list, points: int) -> list:
    if len(trace) <= points:
        return trace
    keep = np.unique(np.linspace(0, len(trace) - 1, points).round().astype(int))
    return [trace[i] for i in keep]


def train_cohort(ctx, bundle: Path, entry: dict, seconds: float) -> dict:
    """Trains one cohort with the project's Trainer for `seconds` (resumed from the carried weights and the CPU run's
    position, with Adam rebuilt from the carried summary; or from the seed's initialisation), then writes
    `<name>.safetensors` (float16) and `<name>_train.json` into the output folder."""
    import torch
    from ra_engine.network.config import ArchConfig
    from ra_engine.core.progress import Progress
    from ra_engine.training.config import TrainConfig
    from ra_engine.training.pipeline import SliceSubset
    from ra_engine.training.trainer import Trainer, TrainState, validation_loss
    from ra_engine.training.checkpoint import load_checkpoint

    name = entry["name"]
    t0 = time.perf_counter()
    images, train_idx, val_idx, weights = unpack_cohort(bundle, entry)
    arch = ArchConfig.from_dict(entry["arch"])
    saved = TrainConfig.from_dict(entry["config"])
    # The run's options, except when it stops: by this run's time (and in a dry run after a few steps).
    config = replace(saved, max_steps=None)
    run_dir = ctx.work / f"train_{name}"
    deadline = time.monotonic() + seconds
    trace, epochs, warnings_seen = [], [], []

    def on_event(event: dict):
        if event["event"] == "step" and event.get("losses"):
            trace.append({"step": event["step"], **{k: event["losses"][k] for k in ("loss_e", "loss_d", "loss")
                                                    if k in event["losses"]}})
        elif event["event"] == "epoch":
            epochs.append({"epoch": event.get("epoch"), "step": event.get("step"), "val_loss": event.get("val_loss")})
        elif event["event"] == "warning":
            warnings_seen.append(event.get("message"))
        return time.monotonic() < deadline

    trainer = Trainer(SliceSubset(images, train_idx), SliceSubset(images, val_idx), arch, config, run_dir,
                      torch.device(ctx.device), Progress(callback=on_event),
                      meta={"data": entry["data"].get("sha256")})
    if weights is not None:
        summary = {k: v for k, v in weights.items() if k.startswith(ADAM_PREFIX)}
        trainer.model.load_state_dict({k: v for k, v in weights.items() if not k.startswith(ADAM_PREFIX)})
        restored = {"opt_e": restore_adam(trainer.opt_e, "opt_e", summary),
                    "opt_d": restore_adam(trainer.opt_d, "opt_d", summary)}
        state = dict(entry["state"])
        state["best_val"] = math.inf if state.get("best_val") is None else state["best_val"]
        trainer.state = TrainState(**state)
        init = (f"resumed from the CPU run's weights at step {entry['weights']['step']} ({entry['weights']['dtype']} "
                f"on the way), its position (epoch {state['epoch']}, step in epoch {state['step_in_epoch']}) and its "
                f"best validation loss; Adam rebuilt from the carried summary ({restored['opt_e']} + "
                f"{restored['opt_d']} parameters: per-channel second moments, first moments zero)")
    else:
        init = (f"the seed's initialisation with the run's options (its CPU weights did not travel; "
                f"{entry.get('weights_note', 'the bundle holds none')})")
    if ctx.dry:
        trainer.config = config = replace(config, max_steps=trainer.state.step + 3)
    start_state = {k: v for k, v in vars(trainer.state).items() if k != "history"}
    start_best = trainer.state.best_val
    unpack_s = time.perf_counter() - t0
    _say(f"training {name} for {seconds:.0f} s from step {trainer.state.step} on {ctx.device}")
    t = time.perf_counter()
    fitted = trainer.fit()
    train_s = time.perf_counter() - t
    steps = fitted.state.step - start_state["step"]
    final_val = validation_loss(trainer.model, trainer.val_images, trainer.device)
    # best.pt exists in this fresh run folder only if an epoch of this run beat the validation loss it started from.
    improved = fitted.best_checkpoint is not None and fitted.state.best_val < start_best
    if improved and fitted.state.best_val <= final_val:
        state_dict = load_checkpoint(fitted.best_checkpoint)["model"]
        chosen = {"from": f"the best validation epoch of this run (epoch {fitted.state.best_epoch})",
                  "val_loss": fitted.state.best_val}
    else:
        state_dict = trainer.model.state_dict()
        why = "" if improved or weights is None else " (no epoch of this run beat the CPU run's best validation loss)"
        chosen = {"from": "the last step of this run" + why, "val_loss": final_val}
    gpu = ctx.gpu_name or "CPU (dry run)"
    meta = {"cohort": name, "arch": json.dumps(arch.to_dict()), "preset": json.dumps(entry["preset"]),
            "config": json.dumps(saved.to_dict()), "data": json.dumps(entry["data"]),
            "step": fitted.state.step, "epoch": fitted.state.epoch, "weights_from": chosen["from"],
            "val_loss": chosen["val_loss"], "best_val": _finite_or_none(fitted.state.best_val),
            "best_epoch": fitted.state.best_epoch, "stopped_by": fitted.stopped_by,
            "history": json.dumps(_finite_or_none(fitted.state.history)),
            "trained_on": f"{gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}; benchmarks/device_run.py",
            "init": init, "created": _now()}
    weights_file = ctx.out / f"{name}.safetensors"
    blob = _weights_blob(state_dict, "float16", meta)
    weights_file.write_bytes(blob)
    log = {"cohort": name, "device": ctx.device, "gpu": ctx.gpu_name, "init": init,
           "optimiser": (f"Adam (lr {config.lr:g}) rebuilt from the CPU run's per-channel second moments and step "
                         f"counts (first moments zero); the full states do not travel" if weights is not None else
                         f"fresh Adam (lr {config.lr:g}), as a new run starts"),
           "options": saved.to_dict(), "options_changed": {"max_steps": [saved.max_steps, config.max_steps],
                                                           "why": "this run stops by its time budget"},
           "arch": arch.to_dict(), "train_slices": int(len(train_idx)), "val_slices": int(len(val_idx)),
           "seconds_budget": seconds, "seconds_unpack": unpack_s, "seconds_training": train_s,
           "steps": steps, "iterations_per_second": steps / train_s if train_s > 0 else None,
           "start": _finite_or_none(start_state),
           "end": _finite_or_none({k: v for k, v in vars(fitted.state).items() if k != "history"}),
           "stopped_by": fitted.stopped_by, "final_val_loss": final_val, "epochs_this_run": epochs,
           "warnings": warnings_seen, "weights": {"file": weights_file.name, "dtype": "float16", "bytes": len(blob),
                                                  **chosen},
           "loss_trace": _downsample(trace, LOSS_TRACE_POINTS)}
    (ctx.out / f"{name}_train.json").write_text(json.dumps(_finite_or_none(log), indent=1))
    return {"status": "done", **{k: log[k] for k in ("init", "steps", "iterations_per_second", "seconds_training",
                                                     "stopped_by", "final_val_loss", "start", "end")},
            "weights": log["weights"], "epochs_this_run": len(epochs), "warnings": len(warnings_seen)}


def phase_training(ctx) -> dict:
    if ctx.bundle is None or not (Path(ctx.bundle) / "manifest.json").is_file():
        return {"status": "skipped", "reason": f"no bundle at {ctx.bundle}: run `device_run.py prepare` first and "
                                               f"carry the folder"}
    manifest = read_bundle(ctx.bundle)
    cohorts = manifest["cohorts"]
    result = {"bundle": {"created": manifest.get("created"), "sizes": manifest.get("sizes"),
                         "cohorts": [c["name"] for c in cohorts]}}
    for i, entry in enumerate(cohorts):
        share = ctx.phase_left() / (len(cohorts) - i)
        name = entry["name"]
        if share < ctx.min_train_s:
            result[name] = {"status": "skipped", "reason": "out of time", "seconds_left": share}
            ctx.note(f"training {name} skipped: out of time")
            continue
        result[name] = ctx.step(name, lambda e=entry, s=share: train_cohort(ctx, ctx.bundle, e, s - 5), 0)
    result["status"] = _phase_status(result)
    return result


# ----------------------------------------------------------------------------------------------------------------
# run: the phases, the summary, the output limits
# ----------------------------------------------------------------------------------------------------------------
def check_out_limits(out: Path) -> dict:
    """What comes back from the machine's $OUT: at most 8 files of 16 MiB, 64 MiB together, no deeper than two folders,
    names of letters, digits, '.', '_' and '-'."""
    files, problems = [], []
    for path in sorted(Path(out).rglob("*")):
        rel = path.relative_to(out)
        if any(not OUT_NAME.fullmatch(part) for part in rel.parts):
            problems.append(f"{rel}: name outside [A-Za-z0-9._-]")
        if path.is_file():
            size = path.stat().st_size
            files.append({"file": rel.as_posix(), "bytes": size})
            if size > OUT_LIMITS["file_bytes"]:
                problems.append(f"{rel}: {size / MIB:.1f} MiB > 16 MiB")
            if len(rel.parts) - 1 > OUT_LIMITS["depth"]:
                problems.append(f"{rel}: more than {OUT_LIMITS['depth']} folders down")
    total = sum(f["bytes"] for f in files)
    if len(files) > OUT_LIMITS["files"]:
        problems.append(f"{len(files)} files > {OUT_LIMITS['files']}")
    if total > OUT_LIMITS["total_bytes"]:
        problems.append(f"{total / MIB:.1f} MiB together > 64 MiB")
    return {"ok": not problems, "files": files, "total_bytes": total, "problems": problems, "limits": OUT_LIMITS}


class Context:
    """What the phases share: device, folders, the budget, the current phase's deadline, notes of what was skipped."""

    def __init__(self, args, out: Path, work: Path, budget: Budget, cuda: bool, gpu_name: str | None):
        self.dry, self.device, self.out, self.work, self.budget = args.dry_run, args.device, out, work, budget
        self.bundle = Path(args.bundle) if args.bundle else None
        self.cuda, self.gpu_name = cuda, gpu_name
        self.min_train_s = 2.0 if args.dry_run else 20.0
        self.reserve = args.reserve
        self.deadline = time.monotonic()
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(text)
        _say(text)

    def phase_left(self) -> float:
        return self.deadline - time.monotonic()

    def step(self, name: str, fn, minimum: float) -> dict:
        """Runs one part of a phase when the phase has `minimum` seconds left, else records it as skipped."""
        if self.phase_left() < minimum:
            self.note(f"{name} skipped: out of time ({self.phase_left():.0f} s left in the phase, {minimum} s needed)")
            return {"status": "skipped", "reason": "out of time"}
        _say(f"{name} ...")
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as exc:  # one failed check must not cost the others
            out = _error(exc)
            _say(f"{name} failed: {out['error']}")
        if isinstance(out, dict):
            out.setdefault("seconds", time.perf_counter() - t)
        return out


def environment(device: str) -> dict:
    """The machine: GPU, torch, CUDA, cuDNN, Python, the engine's packages and where they were imported from."""
    import torch

    env = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
           "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
           "torch": torch.__version__, "cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "device": device, "install_seconds": os.environ.get("RA_DEVICE_INSTALL_SECONDS")}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(gpu_name=torch.cuda.get_device_name(0), gpu_memory_bytes=props.total_memory,
                   gpu_capability=f"{props.major}.{props.minor}", gpu_multiprocessors=props.multi_processor_count)
        try:
            env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                                "--format=csv,noheader"], capture_output=True, text=True,
                                               timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    packages = {}
    for module in ("ra_engine", "numpy", "SimpleITK", "lpips", "pydicom", "platformdirs", "skimage", "safetensors",
                   "scipy", "PIL", "sklearn", "matplotlib", "tqdm", "torchvision"):
        try:
            m = __import__(module)
            packages[module] = {"version": str(getattr(m, "__version__", "?")),
                                "from": str(Path(getattr(m, "__file__", "") or "?").parent)}
        except Exception as exc:
            packages[module] = {"error": f"{type(exc).__name__}: {exc}"}
    env["packages"] = packages
    return env


def markdown(summary: dict) -> str:
    """The short human-readable summary."""
    env = summary.get("environment", {})
    lines = [f"# device_run {'(dry run) ' if summary.get('dry_run') else ''}{summary.get('started')}", "",
             f"GPU: {env.get('gpu_name', 'none')} ({env.get('nvidia_smi', '')}); torch {env.get('torch')}, CUDA "
             f"{env.get('cuda')}, cuDNN {env.get('cudnn')}; Python {env.get('python')}; {env.get('cpus')} CPUs; "
             f"wall {summary.get('wall_seconds', 0):.0f} s of a {summary.get('budget_seconds')} s budget", ""]
    phases = summary.get("phases", {})
    a = phases.get("a_correctness", {})
    lines += ["## a. CUDA against the CPU", ""]
    for key in ("clahe", "scoring", "detect", "amp_training", "pytest"):
        v = a.get(key)
        if isinstance(v, dict):
            detail = ""
            if key == "clahe":
                detail = f"max abs diff {v.get('max_abs_diff')}"
            elif key == "scoring":
                detail = f"anomaly max abs diff {v.get('max_abs_diff', {}).get('anomaly')} (strict fp32 " \
                         f"{v.get('anomaly_max_abs_diff_strict_fp32')})"
            elif key == "detect" and "cuda_vs_cpu" in v:
                c = v["cuda_vs_cpu"]
                detail = (f"scan score rel {c['scan_score_rel']:.2e}, pseudo-healthy max "
                          f"{c['pseudo_healthy_max_rel_range']:.2e} of range, anomaly max abs "
                          f"{c['anomaly_max_abs']:.2e}, Dice {c['dice_at_default_flag_rate']}")
            elif key == "amp_training" and "configs" in v:
                detail = "; ".join(f"{k}: bf16/fp32 rel {max(c['bf16_vs_fp32_rel_per_iteration']):.2e}"
                                   for k, c in v["configs"].items())
            elif key == "pytest":
                detail = f"{v.get('summary_line', '')}; CUDA tests {v.get('cuda_tests')}"
            lines.append(f"- {key}: **{v.get('status')}** {detail} {v.get('error', '')}")
        elif v is not None:
            lines.append(f"- {key}: {v}")
    b = phases.get("b_speed", {})
    lines += ["", "## b. Speed", ""]
    for name in ("t1", "radiograph"):
        s = b.get(f"stages_{name}", {})
        c = b.get(f"command_{name}", {})
        if s.get("status") == "done":
            stages = {k: round(v, 3) for k, v in s["stage_seconds_cold"].items()}
            lines.append(f"- {name}: in process {s['detect_seconds_cold']:.2f} s cold, "
                         f"{s['detect_seconds_warm_network']:.2f} s warm network "
                         f"(network+scoring+mapping back {s['network_scoring_mapback_seconds_warm']:.3f} s; under "
                         f"1 s: {s['under_1s_warm']}); stages {json.dumps(stages)}")
        if c.get("status") == "done":
            lines.append(f"- `ra detect` {name}, whole command: {c['seconds']:.2f} s")
    for key, v in b.items():
        if key.startswith("train_") and isinstance(v, dict) and v.get("status") == "done":
            lines.append(f"- {key}: {v['iterations_per_second']:.1f} it/s ({v['seconds_per_iteration'] * 1000:.1f} ms)")
    c = phases.get("c_training", {})
    lines += ["", "## c. Training", ""]
    for key, v in c.items():
        if key in ("bundle", "status", "seconds") or not isinstance(v, dict):
            continue
        if v.get("status") == "done":
            lines.append(f"- {key}: {v['steps']} steps at {v['iterations_per_second'] or 0:.1f} it/s, stopped by "
                         f"{v['stopped_by']}, final val loss {v['final_val_loss']:.6g}; weights: {v['weights']['from']}"
                         f"; init: {v['init']}")
        else:
            lines.append(f"- {key}: {v.get('status')} {v.get('reason', v.get('error', ''))}")
    limits = summary.get("out_limits", {})
    lines += ["", "## Skipped and notes", ""] + [f"- {n}" for n in summary.get("notes", [])] + [
        "", f"Output limits: {'ok' if limits.get('ok') else limits.get('problems')}"]
    return "\n".join(lines) + "\n"


def write_summary(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(_finite_or_none(summary), indent=1, default=str))
    (out / "summary.md").write_text(markdown(summary))


PHASES = (("a_correctness", "a", phase_correctness), ("b_speed", "b", phase_speed), ("c_training", "c", phase_training))


def cmd_run(args) -> int:
    """The phases in order, each inside its budget, the summary after each."""
    budget = Budget(args.budget)
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"started": _now(), "dry_run": args.dry_run, "budget_seconds": args.budget, "command": sys.argv,
                     "phases": {}, "notes": []}
    try:
        import torch
        import ra_engine  # noqa: F401  (the carried packages are importable, else say which is missing)
    except Exception as exc:
        summary["environment_error"] = _error(exc)
        summary["notes"].append("the engine cannot be imported: check that the wheels were installed "
                                "(benchmarks/device_run.sh, carry .whl)")
        write_summary(out, summary)
        print(summary["environment_error"]["traceback"], file=sys.stderr)
        return 2
    cuda = torch.cuda.is_available()
    if args.device == "auto":
        args.device = "cpu" if args.dry_run or not cuda else "cuda"
    if not args.dry_run and not (cuda and args.device.startswith("cuda")):
        raise SystemExit("no CUDA GPU is available (or --device is not cuda): rehearse on the CPU with --dry-run")
    threads = torch.get_num_threads()
    if args.dry_run:
        torch.set_num_threads(1)
    summary["environment"] = environment(args.device)
    gpu_name = summary["environment"].get("gpu_name") if args.device.startswith("cuda") else None
    budgets = {"a": args.budget_a, "b": args.budget_b}
    wanted = set(args.phases.split(","))
    try:
        with tempfile.TemporaryDirectory(prefix="device_run_") as tmp:
            ctx = Context(args, out, Path(tmp), budget, cuda and args.device.startswith("cuda"), gpu_name)
            for key, letter, fn in PHASES:
                if letter not in wanted:
                    summary["phases"][key] = {"status": "skipped", "reason": "not asked for (--phases)"}
                    continue
                left = budget.left() - ctx.reserve
                allowed = left if letter == "c" else min(budgets[letter], left)
                if allowed < (ctx.min_train_s if letter == "c" else 5):
                    summary["phases"][key] = {"status": "skipped", "reason": f"out of time ({left:.0f} s left)"}
                    ctx.note(f"phase {key} skipped: out of time")
                    continue
                ctx.deadline = time.monotonic() + allowed
                _say(f"phase {key}: {allowed:.0f} s")
                t = time.perf_counter()
                try:
                    result = fn(ctx)
                except Exception as exc:
                    result = _error(exc)
                    _say(f"phase {key} failed: {result['error']}")
                result["seconds"] = time.perf_counter() - t
                summary["phases"][key] = result
                summary["notes"] = ctx.notes
                summary["wall_seconds"] = budget.elapsed()
                write_summary(out, summary)
    finally:
        torch.set_num_threads(threads)
    summary["wall_seconds"] = budget.elapsed()
    write_summary(out, summary)
    summary["out_limits"] = check_out_limits(out)
    write_summary(out, summary)
    summary["out_limits"] = check_out_limits(out)  # again, with the summary's final size
    write_summary(out, summary)
    _say(f"done in {budget.elapsed():.0f} s; outputs in {out}: "
         + ", ".join(f"{f['file']} ({f['bytes'] / MIB:.2f} MiB)" for f in summary["out_limits"]["files"]))
    return 0 if summary["out_limits"]["ok"] else 1


# ----------------------------------------------------------------------------------------------------------------
# model: returned weights -> a model directory
# ----------------------------------------------------------------------------------------------------------------
def cmd_model(args) -> int:
    """A model directory from weights that `run` returned: float32 weights, a card whose training record says they
    were trained on the GPU machine (`weights_from`, `data.trained_on`) and from what (`data.init`)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file
    from ra_engine.models.card import ModelCard, TrainingRecord
    from ra_engine.models.modeldir import save_model_dir
    from ra_engine.network.config import ArchConfig
    from ra_engine.preprocess.presets import PresetConfig
    from ra_engine.training.config import METHODS

    weights = Path(args.weights)
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata() or {}
    if "arch" not in meta or "preset" not in meta:
        raise SystemExit(f"{weights} has no device_run metadata (arch, preset): give a <cohort>.safetensors that "
                         f"`device_run.py run` wrote")
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in load_file(str(weights)).items()}
    config = json.loads(meta["config"])
    data = {**json.loads(meta.get("data", "{}")), "trained_on": meta.get("trained_on"), "init": meta.get("init")}
    best_val = None if meta.get("best_val") in (None, "None") else float(meta["best_val"])
    training = TrainingRecord(
        config=config, data=data, command=["benchmarks/device_run.py", "run", f"(cohort {meta.get('cohort')})"],
        steps=int(meta["step"]), epochs=int(meta["epoch"]),
        weights_from=f"{meta.get('weights_from')}, trained on {meta.get('trained_on')}", weights_step=int(meta["step"]),
        stopped_by=meta.get("stopped_by", "cancelled"), best_val_loss=best_val,
        best_epoch=int(meta["best_epoch"]) if best_val is not None else None,
        history=json.loads(meta.get("history", "[]")))
    card = ModelCard(name=args.name or weights.stem, architecture=ArchConfig.from_dict(json.loads(meta["arch"])),
                     preset=PresetConfig.from_dict(json.loads(meta["preset"])), method=config.get("method", "ra"),
                     method_description=METHODS[config.get("method", "ra")], training=training)
    save_model_dir(Path(args.out), state, card)
    print(f"model directory {args.out} (torch {torch.__version__}); calibrate it before detection: "
          f"ra calibrate --model {args.out} --data NORMAL_SCANS")
    return 0


# ----------------------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("prepare", help="pack the bundle that travels, from `ra train` run folders")
    pp.add_argument("--run", action="append", required=True, metavar="NAME=RUN_DIR",
                    help="a cohort: its name (names the returned files) and its run folder; repeat for each")
    pp.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="where to write it (default .device_bundle/)")
    pp.add_argument("--wheels", default=str(DEFAULT_WHEELS), help="the carried wheels' folder, counted in the limit")
    pp.add_argument("--limit-mib", type=float, default=TRAVEL_LIMIT_MIB, help="what may travel (default 64 MiB)")
    pp.add_argument("--margin-mib", type=float, default=2.0, help="kept free for files added later (default 2)")
    pp.add_argument("--weights", choices=("auto", "all", "none"), default="auto",
                    help="auto: each cohort's weights when they fit, in --run order; all: fail unless all fit")
    pp.add_argument("--weights-dtype", choices=("float16", "bfloat16"), default="float16")
    pr = sub.add_parser("run", help="the GPU run (or --dry-run on the CPU)")
    pr.add_argument("--out", required=True, help="output folder ($OUT on the GPU machine)")
    pr.add_argument("--bundle", default=str(DEFAULT_BUNDLE), help="the prepared bundle (default .device_bundle/)")
    pr.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    pr.add_argument("--budget-a", type=float, default=130.0, help="seconds for the correctness phase (default 130)")
    pr.add_argument("--budget-b", type=float, default=150.0, help="seconds for the speed phase (default 150)")
    pr.add_argument("--reserve", type=float, default=15.0, help="seconds kept for the summary (default 15)")
    pr.add_argument("--phases", default="a,b,c", help="which phases (default a,b,c)")
    pr.add_argument("--device", default="auto", help="cuda (default on a GPU machine) or cpu (the dry run)")
    pr.add_argument("--dry-run", action="store_true", help="rehearse on the CPU: tiny inputs, a few iterations")
    pm = sub.add_parser("model", help="a model directory from weights that `run` returned")
    pm.add_argument("--weights", required=True, help="<cohort>.safetensors from the run's output")
    pm.add_argument("--out", required=True, help="the model directory to write")
    pm.add_argument("--name", default=None, help="the model's name in its card (default: the file's stem)")
    args = p.parse_args(argv)
    if args.command == "prepare":
        return cmd_prepare(args)
    if args.command == "model":
        return cmd_model(args)
    if args.dry_run and args.budget == 480.0:
        args.budget, args.budget_a, args.budget_b, args.reserve = 120.0, 20.0, 60.0, 2.0
    return cmd_run(args)


if __name__ == "__main__":
    sys.exit(main())
