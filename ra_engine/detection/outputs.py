"""The output files of one input of `ra detect`, written all or none: `<name>_pseudo_healthy`, `<name>_anomaly_map`,
`<name>_detections` (in the input's format where it can hold them, on its exact grid), `<name>_scores.json` and
`<name>_overlay.png`."""
from __future__ import annotations

import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ra_engine.core.errors import DataError, error_text
from ra_engine.core.files import WriteError
from ra_engine.core.image import Image
from ra_engine.detection.overlay import overlay_png
from ra_engine.detection.result import Detection
from ra_engine.io.images import output_format_for, split_extension, write_image
from ra_engine.io.sources import Source

OUTPUTS = ("pseudo_healthy", "anomaly_map", "detections")


@dataclass(frozen=True)
class OutputJob:
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


def plan_jobs(sources: list[Source], out: Path) -> list[OutputJob]:
    """The sources as jobs writing into `out`. Two inputs with the same name would write the same outputs:
    refused."""
    jobs, seen = [], {}
    for source in sources:
        name = source.image.name if source.image.is_dir() else split_extension(source.image)[0]
        if name in seen:
            raise DataError(f"two inputs are named {name!r} ({seen[name]} and {source.image}) and would write the "
                            "same outputs: rename one, or detect them in separate runs with different --out")
        seen[name] = source.image
        jobs.append(OutputJob(source, name, Path(out), output_format_for(source.image)))
    return jobs


# Threads that write one input's files: SimpleITK compresses and writes with Python's GIL released, so the maps
# (gzip is single-threaded) are written side by side and beside the report's regions. Each writer holds a copy of
# its map (SimpleITK's image) while it writes, and the regions their label volume: above PARALLEL_WRITE_MAX_BYTES of
# float maps (a 512x512x300 volume's are 630 MB) the outputs are made one after the other, so that working memory
# stays bounded as before.
WRITER_THREADS = 2
PARALLEL_WRITE_MAX_BYTES = 256 * 2**20


def write_outputs(job: OutputJob, image: Image, found: Detection, detections: Image,
                  report: dict | Callable[[], dict]) -> dict:
    """Writes the outputs of one input under temporary names and renames them only once all are written, so that
    an input gets all its outputs or none. The three maps and the overlay are written by WRITER_THREADS threads
    while this thread makes the report (`report`: the report, or a function that makes it) and writes it (one
    after the other for maps over PARALLEL_WRITE_MAX_BYTES); a failure of any writer removes every temporary file
    and is raised once all have stopped (a `WriteError` for a full disk or a read-only folder). Returns the report."""
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
    except WriteError:
        raise
    except OSError as exc:  # the report's write, a rename: a full disk, a read-only folder
        raise WriteError(f"could not write the outputs of {job.name} into {job.out}: {error_text(exc)} (check free "
                         "disk space and write permission); none of its outputs was written") from exc
    finally:
        for temporary in temporaries.values():
            try:
                temporary.unlink(missing_ok=True)
            except OSError:  # a read-only folder holds no temporary file to remove
                pass
    return made["report"]
