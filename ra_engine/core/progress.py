"""Progress of long jobs: one JSON object per line (the schema of ARCHITECTURE.md, read by the Slicer panel), a
terminal progress bar, and an optional callback whose False return asks the job to stop cleanly."""
from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from ra_engine.core.errors import error_text
from ra_engine.core.files import WriteError

EVENTS = ("start", "step", "epoch", "checkpoint", "warning", "done", "error")
ProgressCallback = Callable[[dict], "bool | None"]
"""callback(event): one progress event (a dict of the schema above); returning False asks the job to stop."""
ProgressFn = Callable[[int, "int | None"], "bool | None"]
"""progress(done, total): how far one step of a job is (slices of a scan, bytes of a download; total None when
unknown); returning False asks the job to stop."""


class Progress:
    """Emits progress events. `json_path`: a file to append JSON lines to, "-" for stdout, None for none.
    `bar`: show a tqdm bar on stderr. `callback(event) -> False` requests cancellation (`cancelled` becomes True).
    `stop_file`: a path whose appearance requests cancellation too (checked at every event): the way another process
    stops the job cleanly on every OS (Windows has no SIGTERM); a file already there at the start is removed."""

    def __init__(self, json_path: str | Path | None = None, bar: bool = False,
                 callback: ProgressCallback | None = None, stop_file: str | Path | None = None):
        self._stream: TextIO | None = None
        self._owns_stream = False
        if json_path == "-":
            self._stream = sys.stdout
        elif json_path is not None:
            try:
                Path(json_path).parent.mkdir(parents=True, exist_ok=True)
                self._stream = open(json_path, "a", encoding="utf-8")
            except OSError as exc:
                raise WriteError(f"cannot write the progress file {json_path}: {error_text(exc)} (give a path in a "
                                 f"writable folder)") from exc
            self._owns_stream = True
        self._bar_wanted = bar
        self._bar = None
        self._callback = callback
        self._stop_file = None if stop_file is None else Path(stop_file)
        if self._stop_file is not None:
            self._stop_file.unlink(missing_ok=True)  # a leftover of an earlier stop must not stop this job
        self.cancelled = False

    def emit(self, event: str, **fields) -> bool:
        """Sends one event; returns False once cancellation was requested."""
        if event not in EVENTS:
            raise ValueError(f"unknown progress event {event!r}")
        record = {"event": event, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in fields.items()}}
        if self._stream is not None:
            self._stream.write(json.dumps(record) + "\n")
            self._stream.flush()
        self._update_bar(record)
        if self._callback is not None and self._callback(record) is False:
            self.cancelled = True
        if self._stop_file is not None and self._stop_file.exists():
            self.cancelled = True
        return not self.cancelled

    def cancel(self) -> None:
        self.cancelled = True

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._owns_stream and self._stream is not None:
            self._stream.close()
        self._stream = None

    def _update_bar(self, record: dict) -> None:
        if not self._bar_wanted or "total_steps" not in record or "step" not in record:
            if self._bar is not None and record["event"] in ("done", "error"):
                self._bar.close()
                self._bar = None
            return
        if self._bar is not None and (self._bar.total != record["total_steps"] or record["event"] == "start"):
            self._bar.close()  # a new phase (preprocessing, then training) gets a bar of its own
            self._bar = None
        if self._bar is None:
            from tqdm import tqdm

            self._bar = tqdm(total=record["total_steps"], initial=record["step"], file=sys.stderr, dynamic_ncols=True,
                             desc=record.get("message", "") or "")
        self._bar.n = record["step"]
        losses = record.get("losses") or {}
        shown = {k: f"{v:.4g}" for k, v in losses.items() if k in ("loss_e", "loss_d", "loss")}
        if record.get("val_loss") is not None:
            shown["val"] = f"{record['val_loss']:.4g}"
        self._bar.set_postfix(shown, refresh=False)
        self._bar.refresh()


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if hasattr(value, "item"):
        return value.item()
    return value
