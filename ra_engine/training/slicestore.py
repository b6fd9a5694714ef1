"""The on-disk cache of preprocessed 2D training slices, memory-mapped, so that no epoch repeats reading, alignment
or resampling of a scan.

A store is a folder holding `images.npy` ((N, H, W) float32 in [0, 1]), `masks.npy` ((N, H, W) bool, True on the
brain/body), `scan_index.npy` ((N,) int32: the position in `sources` of the scan each slice came from) and
`store.json` (the fingerprint of the data and preprocessing, the sources used with their slice counts, the files
skipped with the reason). `store.json` is written last, by a rename, and removed first when a store is rebuilt:
a folder without it holds no store, so a crash or a cancellation never leaves one that looks complete.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import shutil
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import SimpleITK as sitk

from ra_engine.core.errors import Cancelled, DataError, RAError, error_text
from ra_engine.core.files import WriteError
from ra_engine.core.image import Image
from ra_engine.core.progress import Progress
from ra_engine.io.images import read_image
from ra_engine.io.sources import Skipped, Source

STORE_VERSION = 1
ARRAYS = ("images.npy", "masks.npy", "scan_index.npy")
MANIFEST = "store.json"

# preprocess(image, mask) -> an object with `images` ((n, H, W) float32 in [0, 1]) and `masks` ((n, H, W) bool).
PreprocessFn = Callable[[Image, "Image | None"], object]


@dataclass(frozen=True)
class _Outcome:
    """What preprocessing one scan gave: its slice count and (H, W), or the error that made it unusable."""

    index: int
    dimension: int = 0
    slices: int = 0
    shape: tuple[int, int] | None = None
    error: str | None = None


class SliceStore:
    """A complete slice store in `folder`: `images` (N, H, W) float32 in [0, 1] and `masks` (N, H, W) bool, both
    read-only memory maps; `scan_index` (N,) int32 into `sources`; `skipped` the sources left out."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        manifest = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        self.fingerprint: dict = manifest["fingerprint"]
        self.images: np.ndarray = np.load(self.folder / "images.npy", mmap_mode="r")
        self.masks: np.ndarray = np.load(self.folder / "masks.npy", mmap_mode="r")
        self.scan_index: np.ndarray = np.load(self.folder / "scan_index.npy")
        self.sources = [Source(Path(s["image"]), Path(s["mask"]) if s["mask"] else None, s["label"], s["type"])
                        for s in manifest["sources"]]
        self.slice_counts: list[int] = [s["slices"] for s in manifest["sources"]]
        self.skipped = [Skipped(Path(s["image"]), s["error"]) for s in manifest["skipped"]]
        if not (manifest["version"] == STORE_VERSION and self.images.shape == self.masks.shape == tuple(
                manifest["shape"]) and self.scan_index.shape == self.images.shape[:1] == (sum(self.slice_counts),)):
            raise DataError(f"the slice store in {self.folder} is inconsistent: delete the folder to rebuild it")

    def __len__(self) -> int:
        return len(self.images)

    @property
    def n_scans(self) -> int:
        return len(self.sources)

    @classmethod
    def open(cls, cache_dir: str | Path, fingerprint: dict) -> SliceStore | None:
        """The complete store in `cache_dir` made with `fingerprint`, or None when there is none (or it differs)."""
        try:
            store = cls(cache_dir)
        except (OSError, ValueError, KeyError, TypeError):  # no store, an older layout, or damaged files
            return None
        return store if store.fingerprint == _normalised(fingerprint) else None

    @classmethod
    def build(cls, sources: Iterable[Source], preprocess: PreprocessFn, cache_dir: str | Path, fingerprint: dict,
              workers: int = 0, progress: Progress | None = None, min_fraction: float = 0.5) -> SliceStore:
        """Reads (`read_image` + `validate_image`) and preprocesses every source into a store in `cache_dir`, or
        reuses the store there when it was made with the same `fingerprint` (a JSON-able description of the
        sources and the preprocessing) without reading any image.

        `workers` > 0 preprocesses scans in that many processes (`preprocess` must then be picklable: a module-level
        function, a functools.partial or a dataclass instance). `progress` gets a "step" event after each scan
        ("preprocessing: <file name>"); cancelling it raises `Cancelled`. Unusable sources are skipped with a warning as
        long as at least `min_fraction` of them, and one at least, remain; otherwise DataError lists them all. Mixed 2D
        and 3D sources (unless `preprocess.mixed_dimensions` is true: a preset that puts both into one model space), or
        preprocessed slices of different sizes, raise DataError."""
        cache_dir = Path(cache_dir)
        existing = cls.open(cache_dir, fingerprint)
        if existing is not None:
            return existing
        sources = list(sources)
        if not sources:
            raise DataError("no sources to build a slice store from: give at least one scan")
        if workers > 0:
            try:
                pickle.dumps(preprocess)
            except (pickle.PicklingError, AttributeError, TypeError) as error:
                raise TypeError(f"workers > 0 needs a picklable preprocess function ({error}): use a module-level "
                                f"function or functools.partial") from error
        try:
            cache_dir.mkdir(parents=True, exist_ok=True)
            (cache_dir / MANIFEST).unlink(missing_ok=True)  # from here on the old store is no longer complete
            work = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
            try:
                outcomes = _preprocess_all(sources, preprocess, work, workers, progress)
                _assemble(sources, outcomes, work, cache_dir, _normalised(fingerprint), min_fraction)
            finally:
                shutil.rmtree(work, ignore_errors=True)
        except WriteError:
            raise
        except OSError as exc:  # a full disk or a read-only folder: no store is left that looks complete
            raise WriteError(f"could not write the slice cache in {cache_dir}: {error_text(exc)} (free disk space, "
                             f"or give a cache folder on another disk with --cache-dir)") from exc
        return cls(cache_dir)


def split_by_scan(store: SliceStore, val_fraction: float = 0.1, seed: int = 2109) -> tuple[np.ndarray, np.ndarray]:
    """Slice indices (sorted int64) for training and validation, holding out whole scans so that no scan is in
    both: round(val_fraction * scans), at least one, at most all but one. With a single scan, the same share of
    its slices is held out instead, with a warning. The same seed gives the same split."""
    if not 0 < val_fraction < 1:
        raise DataError(f"the validation fraction must be between 0 and 1, not {val_fraction}")
    rng = np.random.default_rng(seed)
    if store.n_scans > 1:
        n_val = min(max(1, round(val_fraction * store.n_scans)), store.n_scans - 1)
        held_out = np.isin(store.scan_index, rng.permutation(store.n_scans)[:n_val])
    else:
        if len(store) < 2:
            raise DataError("a single slice cannot be split into training and validation: add scans")
        warnings.warn("one scan only: validation holds out slices of the training scan, so it measures "
                      "memorisation rather than generalisation; add scans for a meaningful validation", stacklevel=2)
        n_val = min(max(1, round(val_fraction * len(store))), len(store) - 1)
        held_out = np.zeros(len(store), dtype=bool)
        held_out[rng.permutation(len(store))[:n_val]] = True
    return np.flatnonzero(~held_out), np.flatnonzero(held_out)


def split_by_sources(store: SliceStore, held_out: set[Path]) -> tuple[np.ndarray, np.ndarray]:
    """Slice indices (sorted int64) for training and validation: validation holds the slices of the scans whose
    image is in `held_out` (absolute paths). DataError when none of them, or all scans, are held out."""
    chosen = [i for i, source in enumerate(store.sources) if source.image in held_out]
    if not chosen:
        raise DataError("none of the validation scans could be used (see the skipped files): give usable ones")
    if len(chosen) == store.n_scans:
        raise DataError("every scan is a validation scan: give training scans too")
    mask = np.isin(store.scan_index, chosen)
    return np.flatnonzero(~mask), np.flatnonzero(mask)


def _normalised(fingerprint: dict) -> dict:
    """`fingerprint` as it reads back from JSON (tuples become lists, paths strings), so the two compare equal."""
    return json.loads(json.dumps(fingerprint, sort_keys=True, default=str))


def _preprocess_one(index: int, source: Source, preprocess: PreprocessFn, work: Path) -> _Outcome:
    """Reads and preprocesses one scan, saving its slices as `<index>_images.npy`/`<index>_masks.npy` in `work`
    (so that worker processes send back no arrays). Any failure of this scan becomes its outcome's error."""
    try:
        image = read_image(source.image)
        mask = read_image(source.mask, validate=False) if source.mask else None
        result = preprocess(image, mask)
        images = np.asarray(result.images, dtype=np.float32)
        masks = np.asarray(result.masks, dtype=bool)
        _check_slices(images, masks)
    except Exception as error:  # a bad scan must not stop the others; `_assemble` decides whether too many failed
        reason = str(error) if isinstance(error, RAError) else f"{type(error).__name__}: {error}"
        return _Outcome(index, error=reason)
    np.save(work / f"{index}_images.npy", images)
    np.save(work / f"{index}_masks.npy", masks)
    return _Outcome(index, image.array.ndim, len(images), images.shape[1:])


def _check_slices(images: np.ndarray, masks: np.ndarray) -> None:
    if images.ndim != 3 or len(images) == 0:
        raise DataError(f"preprocessing gave no slices (shape {images.shape})")
    if masks.shape != images.shape:
        raise DataError(f"preprocessing gave masks of shape {masks.shape} for slices of shape {images.shape}")
    if not (np.isfinite(images).all() and images.min() >= 0 and images.max() <= 1):
        raise DataError("preprocessing gave slice values outside [0, 1] or not finite")


def _worker_init(threads: int) -> None:
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _preprocess_all(sources: list[Source], preprocess: PreprocessFn, work: Path, workers: int,
                    progress: Progress | None) -> list[_Outcome]:
    """Outcomes of every source, in source order; raises Cancelled or the mixed-dimension DataError at once."""
    outcomes: dict[int, _Outcome] = {}
    names_by_dimension: dict[int, list[str]] = {}

    def record(outcome: _Outcome) -> None:
        outcomes[outcome.index] = outcome
        name = sources[outcome.index].image.name
        if outcome.error is None:
            names_by_dimension.setdefault(outcome.dimension, []).append(name)
            if len(names_by_dimension) > 1 and not getattr(preprocess, "mixed_dimensions", False):
                raise DataError(f"mixed dimensions: 2D images ({_some(names_by_dimension[2])}) and 3D volumes "
                                f"({_some(names_by_dimension[3])}): use one kind per data set")
        message = name if outcome.error is None else f"skipped {name}: {outcome.error}"
        if progress is not None and not progress.emit("step", step=len(outcomes), total_steps=len(sources),
                                                      message=f"preprocessing: {message}"):
            raise Cancelled("preprocessing was cancelled; no slice store was written")

    if workers > 0:
        threads = max(1, (os.cpu_count() or 1) // workers)
        # spawn, not fork: a forked copy of a process that already runs ITK or OpenMP threads can deadlock.
        pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"), _worker_init, (threads,))
        try:
            futures = [pool.submit(_preprocess_one, i, s, preprocess, work) for i, s in enumerate(sources)]
            for future in as_completed(futures):
                record(future.result())
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # no worker may still write into `work` after this
    else:
        for i, source in enumerate(sources):
            record(_preprocess_one(i, source, preprocess, work))
    return [outcomes[i] for i in range(len(sources))]


def _some(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _assemble(sources: list[Source], outcomes: list[_Outcome], work: Path, cache_dir: Path, fingerprint: dict,
              min_fraction: float) -> None:
    """Concatenates the per-scan slices into the store's arrays and moves them, then the manifest, into place."""
    used = [o for o in outcomes if o.error is None]
    skipped = [Skipped(sources[o.index].image, o.error) for o in outcomes if o.error is not None]
    listing = "\n  ".join(map(str, skipped))
    if not used or len(used) < min_fraction * len(sources):
        raise DataError(f"{len(skipped)} of {len(sources)} sources could not be used, too many to go on (at least "
                        f"{min_fraction:.0%} must be usable); fix or remove them:\n  {listing}")
    if skipped:
        warnings.warn(f"{len(skipped)} of {len(sources)} sources skipped:\n  {listing}", stacklevel=3)
    shapes: dict[tuple[int, int], list[str]] = {}
    for o in used:
        shapes.setdefault(o.shape, []).append(sources[o.index].image.name)
    if len(shapes) > 1:
        sizes = "; ".join(f"{h}x{w}: {_some(names)}" for (h, w), names in shapes.items())
        raise DataError(f"preprocessed slices differ in size ({sizes}): the preprocessing must give one size")

    total = sum(o.slices for o in used)
    shape = (total, *used[0].shape)
    images = np.lib.format.open_memmap(work / "images.npy", mode="w+", dtype=np.float32, shape=shape)
    masks = np.lib.format.open_memmap(work / "masks.npy", mode="w+", dtype=bool, shape=shape)
    scan_index = np.empty(total, dtype=np.int32)
    entries, start = [], 0
    for scan, o in enumerate(used):
        end = start + o.slices
        for name, target in (("images", images), ("masks", masks)):
            part = work / f"{o.index}_{name}.npy"
            target[start:end] = np.load(part)
            part.unlink()
        scan_index[start:end] = scan
        source = sources[o.index]
        entries.append({"image": str(source.image), "mask": str(source.mask) if source.mask else None,
                        "label": source.label, "type": source.type, "slices": o.slices, "first_slice": start})
        start = end
    images.flush()
    masks.flush()
    del images, masks  # close the maps before the files move (required on Windows)
    np.save(work / "scan_index.npy", scan_index)
    manifest = {"version": STORE_VERSION, "fingerprint": fingerprint, "shape": list(shape), "sources": entries,
                "skipped": [{"image": str(s.image), "error": s.error} for s in skipped]}
    (work / MANIFEST).write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    for name in (*ARRAYS, MANIFEST):
        os.replace(work / name, cache_dir / name)
