"""`ra detect`: anomaly detection on scans or radiographs with a trained (and calibrated) model.

Writes, per input, into --out, in the input's format where it can hold them (NRRD stays NRRD, MetaImage stays
MetaImage, NIfTI, DICOM and 2D pictures give NIfTI), with the input's exact shape, spacing, origin and direction:
<name>_pseudo_healthy (the reconstruction, in the input's intensity units), <name>_anomaly_map (float32),
<name>_detections (uint8 label map, 1 = flagged), <name>_scores.json (whole-scan and per-slice scores,
percentiles of normal, threshold and flag rate used, detected regions with size and position) and
<name>_overlay.png. Under torchrun (torchrun --nproc-per-node N -m ra_engine.cli detect ...) the inputs are shared
among the processes, one GPU each, and each input's outputs are written once. Research use only, not for diagnosis.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from .cli_args import add_device_option, add_progress_options, flag_rate, positive, stop_on_signals
from .errors import DataError, ModelError, RAError

if TYPE_CHECKING:
    from .sources import Source

OUTPUTS = ("pseudo_healthy", "anomaly_map", "detections")


def _threshold(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"the threshold on the anomaly map must be 0 or more, got {text}")
    return value


def add_detect_parser(sub) -> None:
    p = sub.add_parser("detect", help="detect anomalies in scans or radiographs with a trained model",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="scans or radiographs: image files, DICOM series folders, folders (searched recursively; a "
                        "`<name>_mask.*` file beside an image is its brain/body mask) or a CSV with the columns "
                        "image[,mask]")
    p.add_argument("--model", required=True, help="model directory (or the name of a registered model)")
    p.add_argument("--out", required=True, type=Path, help="output folder (created if missing)")
    p.add_argument("--flag-rate", type=flag_rate, default=None, metavar="RATE",
                   help="share of normal brain/body pixels that would be flagged, 0.1%% to 20%% (0.001 to 0.2); the "
                        "model's calibration turns it into a threshold (default: the model card's, normally 5%%)")
    p.add_argument("--threshold", type=_threshold, default=None,
                   help="threshold on the anomaly map instead of a flag rate (needed for an uncalibrated model)")
    add_device_option(p)
    p.add_argument("--batch-size", type=positive(int), default=8, help="slices per network pass (default: 8; measured fastest on CPUs, see docs/BENCHMARKS.md)")
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist already")
    p.add_argument("--force", action="store_true",
                   help="run even when a DICOM's modality is not the model's (e.g. CT given to a brain MRI model)")
    add_progress_options(p, quiet_help="no progress bar and no per-input summary")
    p.set_defaults(run=cmd_detect)


@dataclass(frozen=True)
class _Job:
    """One input and the output files it gets."""

    source: Source
    name: str
    out: Path
    extension: str

    def suffix(self, kind: str) -> str:
        return {"scores": ".json", "overlay": ".png"}.get(kind, self.extension)

    def path(self, kind: str) -> Path:
        return self.out / f"{self.name}_{kind}{self.suffix(kind)}"

    def paths(self) -> list[Path]:
        return [self.path(kind) for kind in (*OUTPUTS, "scores", "overlay")]


def cmd_detect(args) -> int:
    """Under torchrun (WORLD_SIZE > 1) every process plans the same jobs and runs the checks, all refuse together,
    and process `rank` detects on the inputs i with i % world == rank: each output is written once, by one process."""
    group = _Group.join(args.device)
    try:
        return _detect_all(args, group)
    finally:
        group.leave()


def _detect_all(args, group: _Group) -> int:
    from .progress import Progress

    try:
        jobs, model, scorer, threshold, flag_rate = _prepare(args)
        refusal = None
    except RAError as exc:
        refusal = exc
    # All agree before any output is written: a process that wrote first would make the others' check of existing
    # outputs refuse, and one that refused alone would leave the others waiting for it.
    group.agree(refusal)
    args.out.mkdir(parents=True, exist_ok=True)
    lead = group.rank == 0
    progress = Progress(args.progress_json if lead else None,
                        bar=lead and not args.quiet and args.progress_json != "-")
    with stop_on_signals(progress):
        failed, cancelled = _run(jobs, model, scorer, threshold, flag_rate, args, progress, group)
    progress.close()
    group.barrier()
    if cancelled:
        if lead:
            print("ra detect: cancelled; the outputs of the inputs finished before were kept", file=sys.stderr)
        return 130
    if failed:
        if lead:
            print(f"ra detect: {len(failed)} of {len(jobs)} input(s) failed (no output written for them): "
                  f"{', '.join(failed)}", file=sys.stderr)
        return 2
    return 0


def _prepare(args):
    """The checks made before anything is written (options, calibration, input names, existing outputs), then the
    model on this process's device. Returns the jobs, the model, its scorer, the threshold and the flag rate."""
    from .calibration import threshold_for
    from .detect import NO_CALIBRATION, scorer_for
    from .devices import resolve_device
    from .card import read_card
    from .modeldir import load_model

    if args.flag_rate is not None and args.threshold is not None:
        raise RAError("--flag-rate and --threshold exclude each other: give one")
    model_dir = resolve_model(args.model)
    card = read_card(model_dir)
    calibration = card.get("calibration")
    if args.threshold is None and not calibration:
        raise ModelError(f"the model {model_dir} {NO_CALIBRATION} (--threshold)")
    threshold = args.threshold if args.threshold is not None else threshold_for(calibration, args.flag_rate)
    flag_rate = None if args.threshold is not None else (
        args.flag_rate if args.flag_rate is not None else float(calibration["default_flag_rate"]))
    jobs = plan_jobs(args.inputs, args.out)
    existing = [p for job in jobs for p in job.paths() if p.exists()]
    if existing and not args.overwrite:
        raise RAError(f"{len(existing)} output file(s) exist already ({', '.join(str(p) for p in existing[:3])}"
                      f"{', ...' if len(existing) > 3 else ''}): pass --overwrite to replace them, or choose another "
                      "--out")
    model = load_model(model_dir, device=resolve_device(args.device))
    return jobs, model, scorer_for(model), threshold, flag_rate


class _Group:
    """The torchrun process group `ra detect` runs in (`ra_engine.training.init_distributed`), or a single process:
    rank 0 of 1, where every collective is a no-op."""

    def __init__(self, rank: int = 0, world: int = 1, owned: bool = False):
        self.rank, self.world, self._owned = rank, world, owned

    @classmethod
    def join(cls, device: str) -> _Group:
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return cls()
        import torch.distributed as dist

        from .training import init_distributed

        joined_before = dist.is_initialized()
        if not init_distributed(device):
            return cls()
        return cls(dist.get_rank(), dist.get_world_size(), owned=not joined_before)

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def leave(self) -> None:
        if self._owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._owned = False

    def gather(self, value) -> list:
        """`value` of every process, in rank order."""
        if not self.distributed:
            return [value]
        import torch.distributed as dist

        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def total(self, *counts: int) -> list[int]:
        """The sums over the processes of `counts`."""
        if not self.distributed:
            return list(counts)
        return [sum(column) for column in zip(*self.gather(list(counts)))]

    def agree(self, refusal: RAError | None) -> None:
        """Raises on every process when any refused (its own refusal, else the first other's)."""
        refusals = self.gather(None if refusal is None else str(refusal))
        if refusal is not None:
            raise refusal
        for rank, message in enumerate(refusals):
            if message is not None:
                raise RAError(f"process {rank} of {self.world} refused: {message}")

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()


def resolve_model(value: str) -> Path:
    """The model directory for --model: a registered name or a path (`registry.resolve_model`)."""
    try:
        from .registry import resolve_model as from_registry
    except ImportError:
        path = Path(value).expanduser()
        if not path.is_dir():
            raise ModelError(f"{value} is not a model directory (a folder holding model.json and model.safetensors)")
        return path
    return Path(from_registry(value))


def plan_jobs(inputs: list[str], out: Path) -> list[_Job]:
    """The inputs as jobs: CSV files are read as lists of images (and masks); the other arguments are paths, folders
    or a glob, with `<name>_mask` files paired. Two inputs with the same name would write the same outputs: refused."""
    from .imageio import output_format_for, split_extension
    from .sources import list_sources

    csvs = [a for a in inputs if Path(a).suffix.lower() == ".csv" and Path(a).is_file()]
    others = [a for a in inputs if a not in csvs]
    sources = [s for c in csvs for s in list_sources(c)]
    if others:
        sources += list_sources(others[0] if len(others) == 1 else others)
    jobs, seen = [], {}
    for source in sources:
        name = source.image.name if source.image.is_dir() else split_extension(source.image)[0]
        if name in seen:
            raise DataError(f"two inputs are named {name!r} ({seen[name]} and {source.image}) and would write the "
                            "same outputs: rename one, or detect them in separate runs with different --out")
        seen[name] = source.image
        jobs.append(_Job(source, name, Path(out), output_format_for(source.image)))
    return jobs


def _run(jobs: list[_Job], model, scorer, threshold: float, flag_rate: float | None, args, progress,
         group: _Group | None = None) -> tuple[list[str], bool]:
    """Detects on each input of this process in turn (all of them in a single process; under torchrun the inputs i
    with i % world == rank, in rounds of one input per process); an input that fails is reported and skipped.
    Returns the failed inputs of all processes and whether the run was cancelled (on any process)."""
    from .preprocess import PresetConfig, model_grid

    group = group or _Group()
    world = group.world
    preset = PresetConfig.from_dict(model.card["preset"])
    # Progress counts model slices: a fixed number per input (the model space's) whatever the input's size.
    # Under torchrun, rank 0 reports: within a round its own input's slices, after each round all processes' inputs.
    per_input = model_grid(preset)[0][0] if preset.name == "brain-mri" else 1
    total = per_input * len(jobs)
    processes = f" on {world} processes" if group.distributed else ""
    progress.emit("start", step=0, total_steps=total, message=f"ra detect: {len(jobs)} input(s){processes}")
    done, failed, cancelled = 0, [], False
    for first in range(0, len(jobs), world):
        i = first + group.rank
        job = jobs[i] if i < len(jobs) else None
        outcome = "idle"
        if job is not None and not cancelled:
            def batch_done(scored: int, of: int, before=first * per_input, name=job.name) -> bool:
                return progress.emit("step", step=before + round(per_input * scored / of), total_steps=total,
                                     message=f"{name}: {scored}/{of} slices")

            try:
                report = _detect_one(job, model, scorer, threshold, flag_rate, args, batch_done)
            except RAError as exc:
                if progress.cancelled:
                    cancelled = True
                else:
                    failed.append((i, str(job.source.image)))
                    print(f"ra detect: error: {job.source.image}: {exc}", file=sys.stderr)
                    outcome = "failed"
            else:
                done += 1
                outcome = "done"
                if not args.quiet:
                    percentile = report["scan_percentile_of_normal"]
                    print(f"{job.name}: scan score {report['scan_score']:.4g}"
                          f"{f' (percentile of normal {percentile:.0f})' if percentile is not None else ''}, "
                          f"{report['flagged_voxels']} pixels flagged at threshold {threshold:.4g} in "
                          f"{report['regions_total']} region(s) -> {job.out / job.name}_*", file=sys.stderr)
        if cancelled:
            if not group.distributed:
                break
        finished = min(first + world, len(jobs))
        message = f"{job.name}: {outcome}" if not group.distributed else f"{finished} of {len(jobs)} input(s)"
        if not progress.emit("step", step=finished * per_input, total_steps=total, message=message):
            cancelled = True
        if group.distributed:  # every process takes part in every round, so that all stop at the same one
            cancelled = group.total(int(cancelled))[0] > 0
        if cancelled:
            break
    done, cancelled = group.total(done, int(cancelled or progress.cancelled))  # a signal after the last round too
    cancelled = cancelled > 0
    failed = [image for _, image in sorted(pair for pairs in group.gather(failed) for pair in pairs)]
    progress.emit("error" if failed or cancelled else "done", step=total, total_steps=total,
                  message=f"{done} of {len(jobs)} input(s) done; research use only, not for diagnosis")
    return failed, cancelled


def _detect_one(job: _Job, model, scorer, threshold: float, flag_rate: float | None, args, progress) -> dict:
    """Detection on one input, all its outputs written; returns its scores report."""
    from .detect import detect
    from .imageio import read_image

    image = read_image(job.source.image)
    mask = read_image(job.source.mask, validate=False) if job.source.mask else None
    found = detect(model, image, scorer, mask, batch_size=args.batch_size, progress=progress, force=args.force)
    detections = found.detections_at(threshold)
    header = {"input": str(job.source.image), "mask": str(job.source.mask) if job.source.mask else None,
              "model": {"path": str(model.path), "name": model.card.get("name"),
                        "preset": model.card["preset"]["name"], "weights_sha256": model.card.get("weights_sha256")}}
    # The report (its regions) is made while the maps are being compressed and written (`_write_outputs`).
    return _write_outputs(job, image, found, detections,
                          lambda: {**header, **found.report(detections, threshold, flag_rate)})


# Threads that write one input's files: SimpleITK compresses and writes with Python's GIL released, so the maps
# (gzip is single-threaded) are written side by side and beside the report's regions. Each writer holds a copy of
# its map (SimpleITK's image) while it writes, and the regions their label volume: above PARALLEL_WRITE_MAX_BYTES of
# float maps (a 512x512x300 volume's are 630 MB) the outputs are made one after the other, so that working memory
# stays bounded as before.
WRITER_THREADS = 2
PARALLEL_WRITE_MAX_BYTES = 256 * 2**20


def _write_outputs(job: _Job, image, found, detections, report: dict | Callable[[], dict]) -> dict:
    """Writes the outputs of one input under temporary names and renames them only once all are written, so that
    an input gets all its outputs or none. The three maps and the overlay are written by WRITER_THREADS threads
    while this thread makes the report (`report`: the report, or a function that makes it) and writes it (one
    after the other for maps over PARALLEL_WRITE_MAX_BYTES); a failure of any writer removes every temporary file
    and is raised once all have stopped. Returns the report."""
    from concurrent.futures import ThreadPoolExecutor

    import numpy as np

    from .imageio import write_image
    from .overlay import overlay_png

    plane = max(image.array.shape[-2:])
    made: dict = {}
    writers: dict[str, Callable[[Path], object]] = {  # largest first: the pseudo-healthy map compresses worst
        "pseudo_healthy": lambda p: write_image(found.pseudo_healthy, p, dtype=np.float32),
        "anomaly_map": lambda p: write_image(found.anomaly, p, dtype=np.float32),
        "detections": lambda p: write_image(detections, p, dtype=np.uint8),
        "overlay": lambda p: overlay_png(image, found.anomaly, detections, p, scale=max(1, min(3, 768 // plane))),
        "scores": lambda p: p.write_text(json.dumps(made["report"], indent=2) + "\n", encoding="utf-8"),
    }
    token = uuid.uuid4().hex[:8]
    temporaries = {kind: job.path(kind).with_name(f".{job.name}_{kind}.partial-{token}{job.suffix(kind)}")
                   for kind in writers}
    parallel = found.pseudo_healthy.array.nbytes + found.anomaly.array.nbytes <= PARALLEL_WRITE_MAX_BYTES
    try:
        if not parallel:
            made["report"] = report() if callable(report) else report
            for kind, write in writers.items():
                write(temporaries[kind])
        else:
            with ThreadPoolExecutor(WRITER_THREADS, thread_name_prefix="ra-write") as pool:
                futures = [pool.submit(writers[kind], temporaries[kind]) for kind in writers if kind != "scores"]
                try:
                    made["report"] = report() if callable(report) else report
                    writers["scores"](temporaries["scores"])
                finally:
                    for future in futures:  # every writer has stopped before anything is renamed or removed
                        future.exception()
                for future in futures:
                    future.result()  # the first failure, if any
        for kind in writers:
            os.replace(temporaries[kind], job.path(kind))
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)
    return made["report"]
