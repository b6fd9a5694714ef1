"""Runs `ra train` in a separate process and reports its progress events without blocking (no Qt).

Training never runs inside Slicer's own process: `TrainingProcess` starts `python -m ra_engine.cli train ...
--progress-json -` (inside Slicer, `sys.executable` is Slicer's own Python launcher, PythonSlicer) in a process group
and session of its own, reads the JSON-lines progress events (ARCHITECTURE.md, "Contracts") on a background thread,
and hands them out through `poll()`, which a Qt timer of the Slicer panel can call; stderr is kept (bounded) for the
panel's log. `cancel()` asks the engine to stop cleanly (it then writes a checkpoint that `resume=True` continues)
and kills the whole process tree only if it has not stopped within a timeout.
"""
from __future__ import annotations

import collections
import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ra_engine
from ra_engine import DataError, RAError

EventCallback = Callable[[dict], None]
# Arguments the launcher sets itself; `options` may not override them.
MANAGED_OPTIONS = ("data", "preset", "out", "epochs", "max_steps", "resume", "overwrite", "progress_json", "quiet",
                   "stop_file")
STOP_FILE = ".stop"  # in the run folder: its appearance stops `ra train` cleanly (`--stop-file`), on every OS
# Environment variables that would make the child join a torchrun job it is not part of.
DISTRIBUTED_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
CANCELLED_RETURNCODE = 130  # what `ra train` returns when it stopped cleanly on a signal


def defaultPython() -> str:
    """The Python that runs the engine: `sys.executable`, which inside Slicer is PythonSlicer (Slicer's Python with
    its packages). Should it be the Slicer application itself (older or custom builds), PythonSlicer beside it."""
    executable = Path(sys.executable)
    if executable.name.lower().startswith("slicer"):
        for candidate in ("PythonSlicer", "PythonSlicer.exe"):
            for folder in (executable.parent, executable.parent / "bin"):
                if (folder / candidate).is_file():
                    return str(folder / candidate)
    return str(executable)


def _optionArguments(options: dict[str, Any]) -> list[str]:
    """`ra train` arguments from {"image_size": 32, "widths": (8, 16), "amp": True, "calibrate": False, ...}: names
    with underscores become `--image-size`; True adds a flag, False drops it (`calibrate=False` becomes
    `--no-calibrate`), a list or tuple is joined with commas, None is left out."""
    arguments: list[str] = []
    for name, value in options.items():
        key = name.lstrip("-").replace("-", "_")
        if key in MANAGED_OPTIONS:
            raise ValueError(f"option {name!r} is set by TrainingProcess's own arguments (data, preset, out, epochs, "
                             f"maxSteps, resume, overwrite), not through options")
        flag = "--" + key.replace("_", "-")
        if value is None:
            continue
        if isinstance(value, bool):
            if key == "calibrate":
                arguments += [] if value else ["--no-calibrate"]
            elif value:
                arguments.append(flag)
        elif isinstance(value, (list, tuple)):
            arguments += [flag, ",".join(str(v) for v in value)]
        else:
            arguments += [flag, str(value)]
    return arguments


def _dataArguments(data) -> list[str]:
    if data is None or (isinstance(data, (str, Path)) and not str(data).strip()):
        return []
    if isinstance(data, (str, Path)):
        return [str(data)]
    return [str(d) for d in data if str(d).strip()]


class TrainingProcess:
    """One `ra train` run in a child process.

    data: the normal scans (a folder, a CSV with an `image` column, a glob, or a list of files and folders);
    preset: "brain-mri" or "xray"; out: the run folder (checkpoints, cache, train.log, then `model/`);
    epochs / maxSteps: the schedule (engine defaults when None); resume: continue the run in `out` from its latest
    checkpoint; overwrite: replace the checkpoints and model in `out`; options: further `ra train` options by name,
    e.g. {"image_size": 64, "batch_size": 8, "device": "cuda", "widths": (32, 64, 128), "calibrate": False};
    python: the Python executable to run the engine with (default `defaultPython()`); onEvent: called with each
    event from `poll()` (so on the thread that polls, e.g. Slicer's main thread); logLines: how many lines of the
    child's stderr (and any non-event stdout) to keep.

    Usage: `process = TrainingProcess(folder, "brain-mri", runDir, epochs=100).start()`, then call
    `process.poll()` from a timer until `process.running` is False.
    """

    def __init__(self, data, preset: str, out: str | Path, *, epochs: int | None = None, maxSteps: int | None = None,
                 resume: bool = False, overwrite: bool = False, options: dict[str, Any] | None = None,
                 python: str | None = None, onEvent: EventCallback | None = None, logLines: int = 2000):
        self.data = _dataArguments(data)
        self.preset = preset
        self.out = Path(out).expanduser()
        self.epochs, self.maxSteps = epochs, maxSteps
        self.resume, self.overwrite = resume, overwrite
        self.options = dict(options or {})
        self.python = python or defaultPython()
        self.onEvent = onEvent
        self._command = self._buildCommand()
        self._events: queue.Queue[dict] = queue.Queue()
        self._log: collections.deque[str] = collections.deque(maxlen=logLines)
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._readers: list[threading.Thread] = []
        self._finished = threading.Event()
        self._returncode: int | None = None
        self._lastEvent: dict | None = None
        self._lastEventAt = 0.0
        self._lastProgress: dict | None = None
        self._cancelRequested = False
        self._killTimer: threading.Timer | None = None
        self.sourceCount: int | None = None

    # -- the command -------------------------------------------------------------------------------------------
    def _buildCommand(self) -> list[str]:
        command = [self.python, "-m", "ra_engine.cli", "train", "--data", *self.data, "--preset", str(self.preset),
                   "--out", str(self.out)]
        if self.epochs is not None:
            command += ["--epochs", str(int(self.epochs))]
        if self.maxSteps is not None:
            command += ["--max-steps", str(int(self.maxSteps))]
        command += _optionArguments(self.options)
        if self.resume:
            command.append("--resume")
        if self.overwrite:
            command.append("--overwrite")
        return command + ["--progress-json", "-", "--stop-file", str(self.stopFile)]

    @property
    def stopFile(self) -> Path:
        """The file whose appearance makes the engine stop cleanly (`ra train --stop-file`)."""
        return self.out / STOP_FILE

    @property
    def command(self) -> list[str]:
        """The exact argv of the child (for the log, and to rerun the same training from a terminal)."""
        return list(self._command)

    @property
    def commandLine(self) -> str:
        """`command` as one line a shell of this platform accepts."""
        return subprocess.list2cmdline(self._command) if os.name == "nt" else shlex.join(self._command)

    # -- checks ------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raises DataError / RAError, with what to do, for a run that `ra train` would refuse: no data, data
        without usable scans, an unknown preset, an existing run folder without resume or overwrite, resume without
        a checkpoint. Sets `sourceCount`."""
        if not self.data:
            raise DataError("no training data given: choose a folder of normal scans, a CSV file with an 'image' "
                            "column, or a list of scan files")
        if self.preset not in ra_engine.PRESETS:
            raise DataError(f"unknown preset {self.preset!r}: choose one of {', '.join(ra_engine.PRESETS)}")
        if self.resume and self.overwrite:
            raise RAError("resume and overwrite exclude each other: choose one")
        if self.resume:
            if not (self.out / "checkpoints" / "latest.pt").is_file():
                raise RAError(f"nothing to resume in {self.out}: it has no checkpoints/latest.pt (start a new run "
                              f"instead of resuming)")
        elif self.out.is_dir() and any(self.out.iterdir()) and not self.overwrite:
            raise RAError(f"output folder {self.out} already exists and is not empty: resume that run, overwrite "
                          f"it, or choose another output folder")
        elif self.out.exists() and not self.out.is_dir():
            raise RAError(f"output folder {self.out} is a file: choose a folder")
        # One folder, CSV file or glob is a specification of its own; several are a list of files and folders.
        self.sourceCount = len(ra_engine.list_sources(self.data[0] if len(self.data) == 1 else list(self.data)))
        if not Path(self.python).is_file():
            raise RAError(f"the Python executable {self.python} does not exist")

    # -- running -----------------------------------------------------------------------------------------------
    def start(self) -> "TrainingProcess":
        """Validates, then starts the child process and its reader threads; returns self."""
        if self._process is not None:
            raise RuntimeError("this training process was already started: create a new TrainingProcess")
        self.validate()
        env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
        engineRoot = str(Path(ra_engine.__file__).resolve().parents[1])  # where `-m ra_engine.cli` is found
        env["PYTHONPATH"] = os.pathsep.join(p for p in (engineRoot, env.get("PYTHONPATH")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        if os.name == "nt":
            flags = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
            platform = {"creationflags": flags}
        else:
            platform = {"start_new_session": True}  # its own session and process group: cancel reaches the tree
        self._log.append("$ " + self.commandLine)
        self._process = subprocess.Popen(self._command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env, text=True, encoding="utf-8",
                                         errors="replace", bufsize=1, **platform)
        self._readers = [threading.Thread(target=self._readStdout, name="ra-train-stdout", daemon=True),
                         threading.Thread(target=self._readStderr, name="ra-train-stderr", daemon=True)]
        for reader in self._readers:
            reader.start()
        threading.Thread(target=self._watch, name="ra-train-watch", daemon=True).start()
        return self

    def _readStdout(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            line = line.rstrip("\r\n")
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                event = None
            if isinstance(event, dict) and "event" in event:
                self._receive(event)
            elif line:
                self._log.append(line)

    def _readStderr(self) -> None:
        assert self._process is not None and self._process.stderr is not None
        for line in self._process.stderr:
            line = line.rstrip("\r\n")
            if line:
                self._log.append(line)

    def _receive(self, event: dict) -> None:
        with self._lock:
            self._lastEvent, self._lastEventAt = event, time.monotonic()
            if event.get("total_steps") and event.get("step") is not None:
                self._lastProgress = event
        self._events.put(event)

    def _watch(self) -> None:
        """Waits for the child and its output; then reports a failure that the engine could only print."""
        assert self._process is not None
        returncode = self._process.wait()
        for reader in self._readers:
            reader.join()
        if self._killTimer is not None:
            self._killTimer.cancel()
        if self._cancelRequested and os.name != "nt":
            # Preprocessing workers left behind by a killed parent. (Not on Windows: there a dead parent's PID may
            # already belong to an unrelated process, and taskkill /T would end that one's tree.)
            self._killGroup()
        failure = self._failureEvent(returncode)
        if failure is not None:
            self._receive(failure)
        with self._lock:
            self._returncode = returncode
        self._finished.set()

    def _failureEvent(self, returncode: int) -> dict | None:
        if returncode == 0 or (self._cancelRequested and returncode == CANCELLED_RETURNCODE):
            return None
        if self._cancelRequested:
            latest = self.out / "checkpoints" / "latest.pt"
            message = f"training was cancelled (exit code {returncode})" + (
                f"; its last checkpoint ({latest}) can be resumed" if latest.is_file() else "")
        else:
            lines = list(self._log)
            errors = [line for line in lines if "error:" in line]
            message = errors[-1] if errors else (lines[-1] if len(lines) > 1 else "")
            message = message or f"ra train exited with code {returncode}"
        return {"event": "error", "time": round(time.time(), 3), "message": message, "returncode": returncode}

    def poll(self) -> list[dict]:
        """The events received since the last call (never blocks); `onEvent` is called with each, in order."""
        events = []
        while True:
            try:
                events.append(self._events.get_nowait())
            except queue.Empty:
                break
        if self.onEvent is not None:
            for event in events:
                self.onEvent(event)
        return events

    def wait(self, timeout: float | None = None) -> int | None:
        """Blocks until the child has exited and all its output was read (at most `timeout` seconds); returns the
        return code, or None when it is still running. Events stay queued for `poll()`."""
        if self._process is None:
            raise RuntimeError("the training process was not started")
        self._finished.wait(timeout)
        return self.returncode

    # -- stopping ----------------------------------------------------------------------------------------------
    def cancel(self, timeout: float = 300.0) -> None:
        """Asks the training to stop cleanly: creates the run's stop file (`stopFile`, which the engine checks at
        every step, on every OS) and, on POSIX, also sends SIGTERM; the engine finishes the current step, writes
        `checkpoints/latest.pt` and exits with 130 (`resume=True` continues from there). If it is still running
        after `timeout` seconds, its whole process tree is killed (the default leaves room for a paper-configuration
        step on a CPU, 10-30 s, and the checkpoint). Does not block; calling it again (or on a finished or
        never-started process) does nothing."""
        with self._lock:
            if self._cancelRequested or self._process is None or self._finished.is_set():
                return
            self._cancelRequested = True
        try:
            self.stopFile.parent.mkdir(parents=True, exist_ok=True)
            self.stopFile.touch()
        except OSError:
            pass  # the signal (POSIX) or the kill timer still stops it
        if os.name != "nt":
            try:
                os.kill(self._process.pid, signal.SIGTERM)
            except OSError:  # it has just exited
                pass
        self._killTimer = threading.Timer(timeout, self.kill)
        self._killTimer.daemon = True
        self._killTimer.start()

    def kill(self) -> None:
        """Kills the child and every process it started, at once (no checkpoint is written)."""
        if self._process is None:
            return
        with self._lock:
            self._cancelRequested = True
        if self._process.poll() is None:
            self._killGroup()

    def _killGroup(self) -> None:
        assert self._process is not None
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self._process.pid)], capture_output=True, check=False)
            if self._process.poll() is None:
                self._process.kill()
            return
        try:
            os.killpg(self._process.pid, signal.SIGKILL)  # the group id is the child's pid (start_new_session)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "TrainingProcess":
        return self

    def __exit__(self, *exc) -> None:
        if self.running:
            self.kill()
            self.wait(10)

    # -- state -------------------------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def running(self) -> bool:
        """True from `start()` until the child has exited and all its output was read."""
        return self._process is not None and not self._finished.is_set()

    @property
    def returncode(self) -> int | None:
        """The child's exit code once `running` is False: 0 done, 130 stopped by cancel, 2 refused (see the log),
        negative: killed by that signal (POSIX). None while running."""
        with self._lock:
            return self._returncode

    @property
    def cancelled(self) -> bool:
        """Whether `cancel()` or `kill()` was called."""
        return self._cancelRequested

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def lastEvent(self) -> dict | None:
        """The latest event received (whether or not polled yet)."""
        with self._lock:
            return self._lastEvent

    @property
    def eta(self) -> float | None:
        """Seconds until the current phase ends: the engine's latest estimate less the time since it came; None
        before the first estimate and once finished."""
        with self._lock:
            event, at = self._lastEvent, self._lastEventAt
        if not self.running or event is None or event.get("eta_s") is None:
            return None
        return max(0.0, float(event["eta_s"]) - (time.monotonic() - at))

    @property
    def fraction(self) -> float | None:
        """step / total_steps of the latest event that has both (the preprocessing phase counts scans), or None."""
        with self._lock:
            event = self._lastProgress
        return None if event is None else min(1.0, event["step"] / event["total_steps"])

    @property
    def log(self) -> str:
        """The command, then the child's stderr and any stdout line that is not an event (the latest `logLines`)."""
        return "\n".join(self._log)

    @property
    def modelPath(self) -> Path | None:
        """`out/model` once the run has finished and written it, else None."""
        model = self.out / "model"
        return model if self.returncode == 0 and (model / "model.json").is_file() else None
