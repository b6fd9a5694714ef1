"""One detection in a child process: `python -m RALogic.detectjob JOB --model DIR --device NAME [--force]`, started by
`RALogic.launcher.DetectionProcess` (through `RALogic.worker`), so that PyTorch, the model, LPIPS and the network
never load or run in Slicer's own process.

JOB is a private folder: `input.pickle` holds the scan (an `ra_engine.Image`, array (z, y, x), LPS geometry) as the
logic took it from its volume node; this writes `detection.pickle` there ({"detection": the engine's `Detection`,
its maps on the scan's exact grid; "model": the model directory; "device": where it ran}). Both ends are the same
installation, so pickle carries the engine's objects whole (numpy arrays and dataclasses: loading them imports no
torch). Progress goes to stdout as JSON lines (`ra_engine.Progress`): `start` for each phase, from the first second
(with a message), `step` after each batch of slices (step, total_steps), `done`, or `error` with the message and the
error's class in "error". The file `stop` appearing in JOB, SIGTERM or SIGINT cancel it at the next batch.
Exit status: 0 done, 130 cancelled, 2 refused (an RAError: the event says what to do), 1 a crash (traceback on
stderr).
"""
from __future__ import annotations

import argparse
import pickle
import signal
import sys
from pathlib import Path

import ra_engine
from ra_engine import Cancelled, RAError

INPUT_FILE = "input.pickle"
RESULT_FILE = "detection.pickle"
STOP_FILE = "stop"
CANCELLED_RETURNCODE = 130
REFUSED_RETURNCODE = 2


def run(job: Path, model: str, device: str, force: bool, progress: ra_engine.Progress) -> None:
    """The detection of JOB's scan; raises Cancelled as soon as a cancel is seen (`progress.cancelled` or the stop
    file), at the latest after the current batch."""
    stop = job / STOP_FILE

    def go_on() -> bool:
        return not (progress.cancelled or stop.exists())

    def checkpoint() -> None:
        if not go_on():
            raise Cancelled("detection cancelled")

    def on_batch(done: int, total: int) -> bool:
        event = "start" if done == 0 else "step"
        message = f"Reconstructing and scoring {total} slices." if done == 0 else None
        progress.emit(event, step=done, total_steps=total, **({"message": message} if message else {}))
        return go_on()

    from .dependencies import deviceInfo  # imports torch: here, never in Slicer's process

    progress.emit("start", message="Loading PyTorch and the model.")
    chosen, device_message = deviceInfo(device)
    checkpoint()
    loaded = ra_engine.load_model(model, chosen)
    with open(job / INPUT_FILE, "rb") as file:
        image = pickle.load(file)
    checkpoint()
    progress.emit("start", message=f"{device_message} Bringing the scan into the model space (alignment).")
    found = ra_engine.detect(loaded, image, progress=on_batch, force=force)
    checkpoint()
    result = {"detection": found, "model": str(loaded.path), "device": str(loaded.device)}
    temporary = job / f".{RESULT_FILE}.tmp"
    with open(temporary, "wb") as file:
        pickle.dump(result, file, protocol=pickle.HIGHEST_PROTOCOL)
    temporary.replace(job / RESULT_FILE)
    progress.emit("done", message="Detection finished.")


def main(argv: list | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m RALogic.detectjob", description=__doc__.split("\n\n")[0])
    parser.add_argument("job", type=Path, help="the job folder (input.pickle in, detection.pickle out)")
    parser.add_argument("--model", required=True, help="the model directory")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--force", action="store_true", help="run although the scan's DICOM modality is not the "
                                                             "model's")
    args = parser.parse_args(argv)
    progress = ra_engine.Progress("-")
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: progress.cancel())
    try:
        run(args.job, args.model, args.device, args.force, progress)
    except Cancelled:
        progress.emit("done", message="cancelled")
        return CANCELLED_RETURNCODE
    except RAError as error:
        progress.emit("error", message=str(error), error=type(error).__name__)
        return REFUSED_RETURNCODE
    return 0


if __name__ == "__main__":
    sys.exit(main())
