"""Engine jobs in child processes of their own, reported without blocking (no Qt): `TrainingProcess` runs `ra train`,
`DetectionProcess` one detection (`RALogic.detectjob`), both through `EngineProcess`.

Nothing of PyTorch runs in Slicer's own process. The child is `python -m RALogic.worker STATUS MODULE ARGS...` (inside
Slicer, `sys.executable` is PythonSlicer, a launcher that starts the real Python as its own child) in a process group
and session of its own. Its JSON-lines progress events (ARCHITECTURE.md, "Contracts") are read on background threads
and handed out by `poll()`, which a Qt timer of the Slicer panel can call; stderr is kept (bounded) for the log.

The launcher in between forwards no signal and its exit status is not the engine's, so: `cancel()` creates the job's
stop file (checked by the engine on every OS) and signals the whole process group (POSIX), which reaches the engine
itself; the job counts as finished when the engine's output has ended, not when the launcher has; its exit status is
the one the engine recorded in its status file (`RALogic.worker`); and the kill that follows a cancel the engine
does not obey in time ends the whole group (Windows: the tree of the launcher and of the engine's own pid).
"""
from __future__ import annotations

import collections
import json
import os
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
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
STATUS_FILE = "status.json"  # written by RALogic.worker in the process's private folder
# Environment variables that would make the child join a torchrun job it is not part of.
DISTRIBUTED_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
CANCELLED_RETURNCODE = 130  # what `ra train` and a detection return when they stopped cleanly on a cancel


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


def _packageRoots() -> list[str]:
    """The folders from which `-m RALogic.worker` and the engine's modules are found (one, when both packages are
    installed side by side, as in the extension)."""
    roots = [str(Path(__file__).resolve().parents[1]), str(Path(ra_engine.__file__).resolve().parents[1])]
    return list(dict.fromkeys(roots))


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


class EngineProcess:
    """One engine job, `python -m MODULE ARGUMENTS` (as `command` shows it), in a child process of its own.

    stopFile: the file whose appearance asks the engine to stop cleanly (the engine checks it; it is created by
    `cancel()`); python: the Python executable (default `defaultPython()`); onEvent: called with each event from
    `poll()` (so on the thread that polls, e.g. Slicer's main thread); logLines: how many lines of the child's
    stderr (and any non-event stdout) to keep; killAfter: the seconds `cancel()` waits for a clean stop before it
    kills the job. `label` names the job in messages.
    """

    label = "the engine"

    def __init__(self, module: str, arguments: list[str], *, stopFile: Path, python: str | None = None,
                 onEvent: EventCallback | None = None, logLines: int = 2000, killAfter: float = 300.0):
        self.python = python or defaultPython()
        self.onEvent = onEvent
        self.killAfter = killAfter
        self._module, self._arguments = module, list(arguments)
        self._stopFile = Path(stopFile)
        self._events: queue.Queue[dict] = queue.Queue()
        self._log: collections.deque[str] = collections.deque(maxlen=logLines)
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._folder: Path | None = None  # private: the status file
        self._readers: list[threading.Thread] = []
        self._finished = threading.Event()
        self._returncode: int | None = None
        self._enginePid: int | None = None
        self._lastEvent: dict | None = None
        self._lastEventAt = 0.0
        self._lastProgress: dict | None = None
        self._cancelRequested = False
        self._killed = False
        self._killTimer: threading.Timer | None = None

    # -- the command -------------------------------------------------------------------------------------------
    @property
    def command(self) -> list[str]:
        """What the child runs, `python -m MODULE ARGUMENTS` (through RALogic.worker, which only records its pid
        and exit status): for the log, and to run the same job from a terminal."""
        return [self.python, "-m", self._module, *self._arguments]

    @property
    def commandLine(self) -> str:
        """`command` as one line a shell of this platform accepts."""
        return subprocess.list2cmdline(self.command) if os.name == "nt" else shlex.join(self.command)

    @property
    def stopFile(self) -> Path:
        """The file whose appearance makes the engine stop cleanly."""
        return self._stopFile

    # -- running -----------------------------------------------------------------------------------------------
    def start(self) -> EngineProcess:
        """Starts the child process and its reader threads; returns self."""
        if self._process is not None:
            raise RuntimeError(f"this {type(self).__name__} was already started: create a new one")
        env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_VARIABLES}
        env["PYTHONPATH"] = os.pathsep.join([*_packageRoots(), *filter(None, [env.get("PYTHONPATH")])])
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONIOENCODING"] = "utf-8"
        if os.name == "nt":
            flags = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
            platform = {"creationflags": flags}
        else:
            platform = {"start_new_session": True}  # its own session and process group: cancel reaches the tree
        self._folder = Path(tempfile.mkdtemp(prefix="ra-job-"))
        argv = [self.python, "-m", "RALogic.worker", str(self._folder / STATUS_FILE), self._module, *self._arguments]
        self._log.append("$ " + self.commandLine)
        self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, env=env, text=True, encoding="utf-8",
                                         errors="replace", bufsize=1, **platform)
        self._readers = [threading.Thread(target=self._readStdout, name="ra-engine-stdout", daemon=True),
                         threading.Thread(target=self._readStderr, name="ra-engine-stderr", daemon=True)]
        for reader in self._readers:
            reader.start()
        threading.Thread(target=self._watch, name="ra-engine-watch", daemon=True).start()
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
        """Waits for the child, then for the end of its output: the engine has exited then, even when a launcher in
        between died first. Takes the engine's exit status from its status file, and reports a failure that the
        engine could only print."""
        assert self._process is not None and self._folder is not None
        launcher = self._process.wait()
        for reader in self._readers:
            reader.join()
        if self._killTimer is not None:
            self._killTimer.cancel()
        status = self._readStatus()
        if self._cancelRequested and os.name != "nt":
            # Workers left behind by a killed engine. (Not on Windows: there a dead parent's PID may already belong
            # to an unrelated process, and taskkill /T would end that one's tree.)
            self._killGroup()
        returncode = status.get("returncode")
        returncode = launcher if returncode is None else int(returncode)
        failure = self._failureEvent(returncode)
        if failure is not None:
            self._receive(failure)
        with self._lock:
            self._returncode = returncode
        shutil.rmtree(self._folder, ignore_errors=True)
        self._finished.set()

    def _readStatus(self) -> dict:
        """The engine's status file ({} when it left none: it never started, or was killed before it ended)."""
        try:
            status = json.loads((self._folder / STATUS_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if isinstance(status, dict) and status.get("pid") is not None:
            with self._lock:
                self._enginePid = int(status["pid"])
        return status if isinstance(status, dict) else {}

    def _failureEvent(self, returncode: int) -> dict | None:
        if returncode == 0 or (self._cancelRequested and returncode == CANCELLED_RETURNCODE):
            return None
        if self._cancelRequested:
            message = self._cancelledMessage(returncode)
        else:
            lines = list(self._log)
            errors = [line for line in lines if "error:" in line]
            message = errors[-1] if errors else (lines[-1] if len(lines) > 1 else "")
            message = message or f"{self.label} exited with code {returncode}"
        return {"event": "error", "time": round(time.time(), 3), "message": message, "returncode": returncode}

    def _cancelledMessage(self, returncode: int) -> str:
        how = "killed" if self._killed else "cancelled"
        return f"{self.label} was {how} (exit code {returncode})"

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
        """Blocks until the engine has exited and all its output was read (at most `timeout` seconds); returns the
        return code, or None when it is still running. Events stay queued for `poll()`."""
        if self._process is None:
            raise RuntimeError(f"the {type(self).__name__} was not started")
        self._finished.wait(timeout)
        return self.returncode

    # -- stopping ----------------------------------------------------------------------------------------------
    def cancel(self, timeout: float | None = None) -> None:
        """Asks the engine to stop cleanly: creates the stop file (which the engine checks, on every OS) and, on
        POSIX, sends SIGTERM to the child's whole process group, which reaches the engine behind any launcher. If
        the engine is still running after `timeout` seconds (default `killAfter`), the whole group is killed. Does
        not block; calling it again (or on a finished or never-started process) does nothing."""
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
                os.killpg(self._process.pid, signal.SIGTERM)  # the group id is the child's pid (start_new_session)
            except OSError:  # the whole group has just exited
                pass
        self._killTimer = threading.Timer(self.killAfter if timeout is None else timeout, self.kill)
        self._killTimer.daemon = True
        self._killTimer.start()

    def kill(self) -> None:
        """Kills the engine and every process it started, at once (nothing is saved), while it is running."""
        if self._process is None:
            return
        with self._lock:
            self._cancelRequested = True
            self._killed = True
        if not self._finished.is_set():
            self._killGroup()

    def _killGroup(self) -> None:
        assert self._process is not None
        if os.name == "nt":
            self._readStatus()  # the engine's own pid, when it has written it
            for pid in dict.fromkeys(p for p in (self._enginePid, self._process.pid) if p is not None):
                subprocess.run(["taskkill", "/F", "/T", "/PID", str(pid)], capture_output=True, check=False)
            return
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> EngineProcess:
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
        """True from `start()` until the engine has exited and all its output was read."""
        return self._process is not None and not self._finished.is_set()

    @property
    def returncode(self) -> int | None:
        """The engine's exit code once `running` is False, from its status file: 0 done, 130 stopped by cancel, 2
        refused (see the log). When the engine left no status (killed), the child's: negative, killed by that
        signal (POSIX). None while running."""
        with self._lock:
            return self._returncode

    @property
    def cancelled(self) -> bool:
        """Whether `cancel()` or `kill()` was called."""
        return self._cancelRequested

    @property
    def pid(self) -> int | None:
        """The child's pid (inside Slicer: the launcher's; it leads the process group)."""
        return self._process.pid if self._process is not None else None

    @property
    def enginePid(self) -> int | None:
        """The engine's own pid, once it has recorded it (None before)."""
        if self._folder is not None and not self._finished.is_set():
            self._readStatus()
        with self._lock:
            return self._enginePid

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
        """step / total_steps of the latest event that has both, or None."""
        with self._lock:
            event = self._lastProgress
        return None if event is None else min(1.0, event["step"] / event["total_steps"])

    @property
    def log(self) -> str:
        """The command, then the child's stderr and any stdout line that is not an event (the latest `logLines`)."""
        return "\n".join(self._log)


class TrainingProcess(EngineProcess):
    """One `ra train` run in a child process (`EngineProcess`).

    data: the normal scans (a folder, a CSV with an `image` column, a glob, or a list of files and folders);
    preset: "brain-mri" or "xray"; out: the run folder (checkpoints, cache, train.log, then `model/`);
    epochs / maxSteps: the schedule (engine defaults when None); resume: continue the run in `out` from its latest
    checkpoint; overwrite: replace the checkpoints and model in `out`; options: further `ra train` options by name,
    e.g. {"image_size": 64, "batch_size": 8, "device": "cuda", "widths": (32, 64, 128), "calibrate": False};
    python, onEvent, logLines: as `EngineProcess`. The stop file is `out/.stop`.

    Usage: `process = TrainingProcess(folder, "brain-mri", runDir, epochs=100).start()`, then call
    `process.poll()` from a timer until `process.running` is False.
    """

    label = "training"

    def __init__(self, data, preset: str, out: str | Path, *, epochs: int | None = None, maxSteps: int | None = None,
                 resume: bool = False, overwrite: bool = False, options: dict[str, Any] | None = None,
                 python: str | None = None, onEvent: EventCallback | None = None, logLines: int = 2000):
        self.data = _dataArguments(data)
        self.preset = preset
        self.out = Path(out).expanduser()
        self.epochs, self.maxSteps = epochs, maxSteps
        self.resume, self.overwrite = resume, overwrite
        self.options = dict(options or {})
        self.sourceCount: int | None = None
        super().__init__("ra_engine.cli", self._trainArguments(), stopFile=self.out / STOP_FILE, python=python,
                         onEvent=onEvent, logLines=logLines)

    def _trainArguments(self) -> list[str]:
        arguments = ["train", "--data", *self.data, "--preset", str(self.preset), "--out", str(self.out)]
        if self.epochs is not None:
            arguments += ["--epochs", str(int(self.epochs))]
        if self.maxSteps is not None:
            arguments += ["--max-steps", str(int(self.maxSteps))]
        arguments += _optionArguments(self.options)
        if self.resume:
            arguments.append("--resume")
        if self.overwrite:
            arguments.append("--overwrite")
        return arguments + ["--progress-json", "-", "--stop-file", str(self.out / STOP_FILE)]

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

    def start(self) -> TrainingProcess:
        """Validates, then starts the child process and its reader threads; returns self."""
        if self.started:
            raise RuntimeError("this training process was already started: create a new TrainingProcess")
        self.validate()
        super().start()
        return self

    def cancel(self, timeout: float = 300.0) -> None:
        """Asks the training to stop cleanly (`EngineProcess.cancel`): the engine finishes the current step, writes
        `checkpoints/latest.pt` and exits with 130 (`resume=True` continues from there); killed after `timeout`
        seconds (the default leaves room for a paper-configuration step on a CPU, 10-30 s, and the checkpoint)."""
        super().cancel(timeout)

    def _cancelledMessage(self, returncode: int) -> str:
        latest = self.out / "checkpoints" / "latest.pt"
        return super()._cancelledMessage(returncode) + (
            f"; its last checkpoint ({latest}) can be resumed" if latest.is_file() else "")

    @property
    def modelPath(self) -> Path | None:
        """`out/model` once the run has finished and written it, else None."""
        model = self.out / "model"
        return model if self.returncode == 0 and (model / "model.json").is_file() else None


class DetectionProcess(EngineProcess):
    """One detection (`RALogic.detectjob`) in a child process: `job` holds its input and gets its result (see
    `detectjob`); model: the model directory; device: "auto", "cpu", "cuda", "cuda:N" or "mps"; force: run although
    the scan's DICOM modality is not the model's. A cancel that the job does not obey within `killAfter` seconds
    (a batch, or an alignment, which it cannot interrupt) kills it: nothing of a detection needs saving."""

    label = "detection"

    def __init__(self, job: Path, model: str | Path, device: str = "auto", force: bool = False, *,
                 python: str | None = None, onEvent: EventCallback | None = None, killAfter: float = 20.0):
        from .detectjob import STOP_FILE as JOB_STOP_FILE  # light: the job's own imports run in the child

        arguments = [str(job), "--model", str(model), "--device", device] + (["--force"] if force else [])
        super().__init__("RALogic.detectjob", arguments, stopFile=Path(job) / JOB_STOP_FILE, python=python,
                         onEvent=onEvent, killAfter=killAfter)


