"""Detection on image files (`ra detect`): each input read, detected and its outputs written into a folder, in the
input's format where it can hold them (NRRD stays NRRD, MetaImage stays MetaImage, NIfTI, DICOM and 2D pictures
give NIfTI), with the input's exact shape, spacing, origin and direction (`detection.outputs`).

An input that cannot be used is reported and skipped; the others go on. Under torchrun (WORLD_SIZE > 1) every
process plans the same jobs and runs the checks, all refuse together, and process `rank` detects on the inputs i
with i % world == rank: each output is written once, by one process.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from ra_engine.core.errors import DataError, RAError
from ra_engine.core.image import Image
from ra_engine.core.progress import Progress
from ra_engine.detection.outputs import OutputJob, plan_jobs, write_outputs
from ra_engine.detection.pipeline import scorer_for
from ra_engine.detection.result import Detection
from ra_engine.detection.scans import detect_source
from ra_engine.io.sources import Source, list_sources
from ra_engine.models.card import read_card
from ra_engine.models.modeldir import RAModel, load_model
from ra_engine.models.registry import resolve_model
from ra_engine.preprocess.reference import model_grid
from ra_engine.runtime.devices import resolve_device
from ra_engine.runtime.distributed import ProcessGroup
from ra_engine.thresholds.table import resolve_threshold

# How `ra detect` finds brain/body masks: "none", the preset's own (the reference brain, the whole radiograph;
# masks named in a CSV's `mask` column are used all the same); "auto", also a `<name>_mask.*` / `<name>_seg.*` file
# beside an input.
MASK_MODES = ("none", "auto")


@dataclass
class FilesResult:
    """What a run of `detect_files` did: the inputs done, the inputs that failed (no output written for them, in
    input order, with the reason), and whether it was cancelled (the outputs of inputs finished before are kept)."""

    total: int
    done: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    cancelled: bool = False
    unused_masks: int = 0


def input_sources(inputs: Sequence[str | Path], masks: str = "none") -> tuple[list[Source], int]:
    """The sources of `ra detect`'s inputs (files, folders, globs, CSVs) and the number of `<name>_mask` files
    beside them that are not used (`masks` "none"; "auto" uses them as brain/body masks)."""
    if masks not in MASK_MODES:
        raise DataError(f"unknown mask mode {masks!r}: choose one of {', '.join(MASK_MODES)}")
    inputs = [str(a) for a in inputs]
    csvs = [a for a in inputs if Path(a).suffix.lower() == ".csv" and Path(a).is_file()]
    others = [a for a in inputs if a not in csvs]
    sources = [s for c in csvs for s in list_sources(c)]
    unused = 0
    if others:
        found = list_sources(others[0] if len(others) == 1 else others)
        if masks == "none":
            unused = sum(s.mask is not None for s in found)
            found = [Source(s.image, None, s.label, s.type) for s in found]
        sources += found
    return sources, unused


def detect_files(model: str | Path, inputs: Sequence[str | Path], out: str | Path, *, flag_rate: float | None = None,
                 threshold: float | None = None, masks: str = "none", device: str = "auto", amp: bool = False,
                 batch_size: int = 8,
                 overwrite: bool = False, force: bool = False, progress: Progress | None = None,
                 say: Callable[[str], None] | None = None,
                 complain: Callable[[str], None] | None = None) -> FilesResult:
    """Detects anomalies in each input with `model` (a model directory, run folder or registered name) and writes
    its outputs into `out`. The threshold: `threshold` on the anomaly map, else the model's calibrated threshold at
    `flag_rate` (the card's default when None). `masks`: one of MASK_MODES. `amp`: the network under bfloat16
    autocast. Everything is checked before anything
    is written (options, calibration, input names, existing outputs unless `overwrite`); then inputs that fail are
    skipped and listed. progress: events for the whole run (it is cancelled through it). say(line): a summary line
    per input (scores, flagged pixels, regions, mask used); complain(line): the error of each input that failed."""
    say = say or (lambda line: None)
    complain = complain or (lambda line: None)
    progress = progress or Progress()
    group = ProcessGroup.join(device)
    try:
        try:
            jobs, loaded, scorer, chosen, unused = _prepare(model, inputs, Path(out), flag_rate, threshold, masks,
                                                            device, amp, overwrite)
            refusal = None
        except RAError as exc:
            refusal = exc
        # All agree before any output is written: a process that wrote first would make the others' check of
        # existing outputs refuse, and one that refused alone would leave the others waiting for it.
        group.agree(refusal)
        Path(out).mkdir(parents=True, exist_ok=True)
        result = _run(jobs, loaded, scorer, chosen, batch_size, force, progress, group, say, complain)
        result.unused_masks = unused
        group.barrier()
        return result
    finally:
        group.leave()


def _prepare(model, inputs, out: Path, flag_rate, threshold, masks: str, device: str, amp: bool, overwrite: bool):
    """The checks made before anything is written, then the model on this process's device. Returns the jobs, the
    model, its scorer, (threshold, flag rate) and the number of unused mask files."""
    model_dir = resolve_model(model)
    card = read_card(model_dir)
    chosen = resolve_threshold(card.calibration, flag_rate, threshold, model=str(model_dir), option="--threshold")
    sources, unused = input_sources(inputs, masks)
    jobs = plan_jobs(sources, out)
    existing = [p for job in jobs for p in job.paths() if p.exists()]
    if existing and not overwrite:
        raise RAError(f"{len(existing)} output file(s) exist already ({', '.join(str(p) for p in existing[:3])}"
                      f"{', ...' if len(existing) > 3 else ''}): pass --overwrite to replace them, or choose another "
                      "--out")
    loaded = load_model(model_dir, device=resolve_device(device), amp=amp)
    return jobs, loaded, scorer_for(loaded), chosen, unused


def _run(jobs: list[OutputJob], model: RAModel, scorer, chosen: tuple[float, float | None], batch_size: int,
         force: bool, progress: Progress, group: ProcessGroup, say: Callable[[str], None],
         complain: Callable[[str], None]) -> FilesResult:
    """Detects on each input of this process in turn (all of them in a single process; under torchrun the inputs i
    with i % world == rank, in rounds of one input per process); an input that fails is reported and skipped."""
    threshold, flag_rate = chosen
    world = group.world
    preset = model.card.preset
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
                report = _detect_one(job, model, scorer, threshold, flag_rate, batch_size, force, batch_done)
            except RAError as exc:
                if progress.cancelled:
                    cancelled = True
                else:
                    failed.append((i, str(job.source.image), str(exc)))
                    complain(f"ra detect: error: {job.source.image}: {exc}")
                    outcome = "failed"
            else:
                done += 1
                outcome = "done"
                percentile = report["scan_percentile_of_normal"]
                say(f"{job.name}: scan score {report['scan_score']:.4g}"
                    f"{f' (percentile of normal {percentile:.0f})' if percentile is not None else ''}, "
                    f"{report['flagged_voxels']} pixels flagged at threshold {threshold:.4g} in "
                    f"{report['regions_total']} region(s), mask: {report['mask']} -> {job.out / job.name}_*")
        if cancelled and not group.distributed:
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
    failed = [(image, reason) for _, image, reason in sorted(t for ts in group.gather(failed) for t in ts)]
    progress.emit("error" if failed or cancelled else "done", step=total, total_steps=total,
                  message=f"{done} of {len(jobs)} input(s) done; research use only, not for diagnosis")
    return FilesResult(len(jobs), done, failed, cancelled > 0)


def _detect_one(job: OutputJob, model: RAModel, scorer, threshold: float, flag_rate: float | None, batch_size: int,
                force: bool, progress) -> dict:
    """Detection on one input, all its outputs written; returns its scores report."""
    image, found = detect_source(model, job.source, scorer, batch_size=batch_size, progress=progress, force=force)
    return save_detection(job, model, image, found, threshold, flag_rate)


def save_detection(job: OutputJob, model: RAModel, image: Image, found: Detection, threshold: float,
                   flag_rate: float | None) -> dict:
    """Writes the outputs of one detection (`image`, the input, and `found`, its result) as `job` names them, with
    the detections at `threshold` (from `flag_rate`, or None for a threshold given directly); returns the report."""
    detections = found.detections_at(threshold)
    header = {"input": str(job.source.image),
              "model": {"path": str(model.path), "name": model.card.name, "preset": model.card.preset.name,
                        "weights_sha256": model.card.weights_sha256}}
    # The report (its regions) is made while the maps are being compressed and written (`write_outputs`).
    return write_outputs(job, image, found, detections,
                         lambda: {**header, **found.report(detections, threshold, flag_rate)})
