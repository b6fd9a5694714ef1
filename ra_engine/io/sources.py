"""Data sources: which scans (and optional masks, labels, anomaly types) a training or evaluation run reads.

A source specification is a folder (searched recursively), a glob pattern, a CSV file with the columns `image`
(required), `mask`, `label` and `type`, or a list of files and folders. In folders, globs and lists, a file named
`<stem>_mask.<ext>` or `<stem>_seg.<ext>` is not an image: it is the mask of the image `<stem>` beside it (for a
DICOM series folder `<stem>` is the folder's name). A folder of DICOM files is one source when it holds a series of
several files (a volume), and gives one source per file when every series in it is a single file (radiographs).
"""
from __future__ import annotations

import csv
import glob
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import SimpleITK as sitk

from ra_engine.core.errors import DataError
from ra_engine.io.images import file_format, kept_locale, split_extension

MASK_SUFFIXES = ("_mask", "_seg")


@dataclass(frozen=True)
class Source:
    """One scan: `image` (a file or a DICOM series folder), its `mask` (foreground or lesion mask on the image's
    grid, or None), `label` (0 normal, 1 abnormal, or None) and anomaly `type` (or None)."""

    image: Path
    mask: Path | None = None
    label: int | None = None
    type: str | None = None


def list_sources(spec: str | Path | Sequence[str | Path | Source]) -> list[Source]:
    """The sources named by `spec`: a folder, a glob pattern, a CSV file, a single image, or a list of any of these
    and of `Source`s (taken as they are). Paths are made absolute; folder and glob results are sorted.
    Raises DataError for a missing path, an empty result, or a CSV that lacks the `image` column or names missing
    files (all of them in one message)."""
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if path.is_file() and path.suffix.lower() == ".csv":
            return _from_csv(path)
        given: list[Source] = []
        if path.exists():
            paths, where = [path], f"in {path}"
        elif glob.has_magic(str(spec)):
            paths, where = sorted(Path(p) for p in glob.glob(str(spec), recursive=True)), f"match the pattern {spec}"
        else:
            raise DataError(f"{spec} does not exist: give a folder, a glob pattern, a CSV file or a list of files")
    else:
        given = [Source(s.image.absolute(), s.mask and s.mask.absolute(), s.label, s.type)
                 for s in spec if isinstance(s, Source)]
        paths, where = [], "in the list"
        for item in (s for s in spec if not isinstance(s, Source)):
            path = Path(item)
            if path.is_file() and path.suffix.lower() == ".csv":
                given += _from_csv(path)  # a CSV in a list (e.g. `ra train --data a.csv`) is read, not taken as an image
            elif not path.exists() and glob.has_magic(str(item)):
                paths += sorted(Path(p) for p in glob.glob(str(item), recursive=True))
            else:
                paths.append(path)
        missing = [str(p) for p in paths + [s.image for s in given] if not p.exists()]
        if missing:
            raise DataError(f"{len(missing)} listed source(s) do not exist: {', '.join(missing)}")
    sources = given + _pair_masks(_collect(paths))
    if not sources:
        raise DataError(f"no image files {where}: looked for NIfTI, NRRD, MetaImage, DICOM, PNG, JPEG, TIFF and BMP "
                        f"files (masks named *_mask / *_seg do not count)")
    return sources


def _collect(paths: Iterable[Path]) -> list[Path]:
    """Image files and DICOM series folders under `paths` (files are kept, folders searched recursively; hidden
    entries skipped), absolute, without duplicates, in order. Masks are included: `_pair_masks` sorts them out."""
    found: dict[Path, None] = {}
    for path in paths:
        path = path.absolute()
        if path.is_dir():
            found.update(dict.fromkeys(_walk(path)))
        elif not path.name.startswith(".") and file_format(path) is not None:
            found[path] = None
    return list(found)


def _walk(folder: Path) -> list[Path]:
    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    formats = {p: file_format(p) for p in entries if p.is_file() and p.name.upper() != "DICOMDIR"}
    dicom = [p for p, fmt in formats.items() if fmt == "dicom"]
    found = [p for p, fmt in formats.items() if fmt not in (None, "dicom")]
    if dicom:
        with kept_locale():
            series_sizes = [len(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid))
                            for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))]
        found += [folder] if any(n > 1 for n in series_sizes) else dicom
    for sub in (p for p in entries if p.is_dir()):
        found += _walk(sub)
    return sorted(found)


def _pair_masks(paths: list[Path]) -> list[Source]:
    """Sources from image paths and mask files: each image gets the `<stem>_mask`/`<stem>_seg` file beside it."""
    masks = {p for p in paths if p.is_file() and _mask_stem(p) is not None}
    masks_by_folder: dict[Path, dict[str, list[Path]]] = {}
    sources, used = [], set()
    for image in (p for p in paths if p not in masks):
        if image.parent not in masks_by_folder:
            masks_by_folder[image.parent] = _masks_in(image.parent)
        stem = image.name if image.is_dir() else split_extension(image)[0]
        candidates = masks_by_folder[image.parent].get(stem, [])
        if len(candidates) > 1:
            raise DataError(f"{image} has {len(candidates)} masks ({', '.join(p.name for p in candidates)}): keep "
                            f"one")
        used.update(candidates)
        sources.append(Source(image, candidates[0] if candidates else None))
    orphans = sorted(str(p) for p in masks - used)
    if orphans:
        warnings.warn(f"{len(orphans)} mask file(s) have no image of the same name beside them and are ignored: "
                      f"{', '.join(orphans)}", stacklevel=2)
    return sources


def _masks_in(folder: Path) -> dict[str, list[Path]]:
    """The mask files in `folder`, grouped by the stem of the image they belong to."""
    grouped: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        stem = _mask_stem(path) if path.is_file() and not path.name.startswith(".") else None
        if stem is not None:
            grouped.setdefault(stem, []).append(path)
    return grouped


def _mask_stem(path: Path) -> str | None:
    """The image stem that a mask file `<stem>_mask.<ext>` / `<stem>_seg.<ext>` belongs to; None if not a mask."""
    stem = split_extension(path)[0]
    for suffix in MASK_SUFFIXES:
        if stem.lower().endswith(suffix) and len(stem) > len(suffix) and file_format(path) is not None:
            return stem[: -len(suffix)]
    return None


def _from_csv(path: Path) -> list[Source]:
    """Rows of a CSV with columns image (required), mask, label, type; relative paths start at the CSV's folder."""
    folder = path.absolute().parent
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = [c.strip().lower() for c in reader.fieldnames or []]
        if "image" not in columns:
            raise DataError(f"{path} has no 'image' column (its columns: {', '.join(columns) or 'none'}): the first "
                            f"line must name the columns, e.g. image,mask,label,type")
        rows = [{c: (v or "").strip() for c, v in zip(columns, row.values())} for row in reader]
    if not rows:
        raise DataError(f"{path} lists no images: add one row per scan below the header")
    sources, problems = [], []
    for line, row in enumerate(rows, start=2):
        image = folder / row["image"] if row["image"] else None
        mask = folder / row["mask"] if row.get("mask") else None
        if image is None:
            problems.append(f"line {line}: empty image")
        for kind, p in (("image", image), ("mask", mask)):
            if p is not None and not p.exists():
                problems.append(f"line {line}: {kind} {p} does not exist")
        label = row.get("label") or None
        if label is not None:
            try:
                number = float(label)
            except ValueError:
                number = float("nan")
            if not number.is_integer():
                problems.append(f"line {line}: label {label!r} is not a whole number (0 normal, 1 abnormal)")
            label = int(number) if number.is_integer() else None
        if image is not None:
            sources.append(Source(image, mask, label, row.get("type") or None))
    if problems:
        raise DataError(f"{path} has {len(problems)} problem(s); fix them and run again:\n  " + "\n  ".join(problems))
    return sources


@dataclass(frozen=True)
class Skipped:
    """A source that could not be used, and why."""

    image: Path
    error: str

    def __str__(self) -> str:
        return f"{self.image}: {self.error}"
