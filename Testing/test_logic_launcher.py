"""RALogic.launcher: a real `ra train` in a child process, its progress events, cancel, kill, resume, refusals; and
cancel through a launcher that forwards no signal (as Slicer's PythonSlicer): the engine itself stops, its own exit
status is reported, and a kill reaches it."""
import os
import signal
import time
from pathlib import Path

import pytest

from fixtures_io import write_radiographs
from fixtures_processes import group_exists, process_exists, write_standin_launcher
from RALogic.launcher import EngineProcess, TrainingProcess
from ra_engine.core.errors import DataError, RAError

OPTIONS = {"image_size": 32, "widths": (8, 16), "latent_dim": 8, "batch_size": 2, "lr": 1e-3, "device": "cpu",
           "calibrate": False}
TIMEOUT_S = 60  # two slow shared cores: starting the child (importing torch) alone can take several seconds


def pump(process, until, timeout=TIMEOUT_S):
    """Polls like the panel's timer until `until(events so far)` holds or the process ends; returns the events."""
    events, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        events += process.poll()
        if until(events) or not process.running:
            events += process.poll()
            return events
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"timed out; events {[e['event'] for e in events]}; log:\n{process.log}")


def training_steps(events):
    return [e for e in events if e["event"] == "step" and "losses" in e]


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """A stand-in for PythonSlicer, and the test folder on the child's path (for `engine_standins`)."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parent))
    return write_standin_launcher(tmp_path / "launcher")


@pytest.fixture(scope="module")
def cancelled_run(tmp_path_factory):
    """A run started with a long schedule and cancelled after two training steps: (data, out, process, events,
    callback events)."""
    root = tmp_path_factory.mktemp("launcher")
    data, out = write_radiographs(root / "normals"), root / "run"
    seen = []
    process = TrainingProcess(data, "xray", out, epochs=1000, options=OPTIONS, onEvent=seen.append).start()
    with process:
        events = pump(process, lambda ev: len(training_steps(ev)) >= 2)
        running_eta = process.eta
        pgid = os.getpgid(process.pid)
        process.cancel(timeout=TIMEOUT_S)
        process.cancel(timeout=TIMEOUT_S)  # pressed twice: no second signal, no error
        assert process.wait(TIMEOUT_S) is not None, process.log
        events += process.poll()
        process.cancel()  # after the end: nothing happens
    return {"data": data, "out": out, "process": process, "events": events, "seen": seen, "eta": running_eta,
            "pgid": pgid}


@pytest.mark.slow
def test_progress_events_arrive_through_poll_and_on_event(cancelled_run):
    process, events = cancelled_run["process"], cancelled_run["events"]
    kinds = [e["event"] for e in events]
    assert "start" in kinds and kinds.index("start") < kinds.index("step", kinds.index("start"))
    start = next(e for e in events if e["event"] == "start")
    assert start["step"] == 0 and start["total_steps"] == 1000 * 3  # 7 training slices // batch 2 = 3 a epoch
    step = training_steps(events)[0]
    assert step["step"] == 1 and step["total_steps"] == 3000 and step["epoch"] == 0
    assert {"loss_e", "loss_d"} <= set(step["losses"]) and step["eta_s"] > 0
    assert cancelled_run["eta"] is not None and cancelled_run["eta"] > 0
    assert cancelled_run["seen"] == events, "onEvent gets every polled event, in order"
    assert process.command[1:4] == ["-m", "ra_engine.cli", "train"]
    assert process.command[-4:-2] == ["--progress-json", "-"] and "--no-calibrate" in process.command
    assert process.command[process.command.index("--widths") + 1] == "8,16"
    assert process.log.startswith("$ ") and process.lastEvent == events[-1]


@pytest.mark.slow
def test_cancel_stops_cleanly_with_a_valid_checkpoint_and_no_process_left(cancelled_run):
    import torch

    from ra_engine.training.checkpoint import load_checkpoint
    from ra_engine.network.config import ArchConfig
    from ra_engine.network.model import ReversedAutoEncoder

    process, out = cancelled_run["process"], cancelled_run["out"]
    assert cancelled_run["pgid"] == process.pid != os.getpgid(0), "the child leads a process group of its own"
    assert process.returncode == 130 and process.cancelled and not process.running
    assert not group_exists(cancelled_run["pgid"]), "nothing of the run's process tree is left"
    done = cancelled_run["events"][-1]
    assert done["event"] == "done" and done["message"] == "stopped by cancelled"
    assert not any(e["event"] == "error" for e in cancelled_run["events"])
    checkpoint = load_checkpoint(out / "checkpoints" / "latest.pt")
    assert checkpoint["state"]["step"] == done["step"] >= 2
    network = ReversedAutoEncoder(ArchConfig.from_dict(checkpoint["arch"]))
    network.load_state_dict(checkpoint["model"], strict=True)
    assert all(torch.isfinite(p).all() for p in network.parameters())
    assert process.modelPath is None and not (out / "model").exists()


@pytest.mark.slow
def test_resume_continues_the_cancelled_run_to_a_model(cancelled_run):
    import ra_engine

    stopped_at = cancelled_run["events"][-1]["step"]
    process = TrainingProcess(cancelled_run["data"], "xray", cancelled_run["out"], epochs=1000,
                              maxSteps=stopped_at + 2, resume=True, options=OPTIONS)
    assert "--resume" in process.command
    with process.start():
        events = pump(process, lambda ev: False)
    assert process.returncode == 0, process.log
    start = next(e for e in events if e["event"] == "start")
    assert start["step"] == stopped_at and events[-1]["event"] == "done"
    card = ra_engine.load_model(process.modelPath).card
    assert card.training.steps == stopped_at + 2 and card.training.stopped_by == "max_steps"


@pytest.mark.slow
def test_kill_ends_the_whole_process_group_at_once(tmp_path):
    process = TrainingProcess(write_radiographs(tmp_path / "normals"), "xray", tmp_path / "run", epochs=1000,
                              options=OPTIONS).start()
    pgid = process.pid
    process.kill()
    process.kill()
    assert process.wait(TIMEOUT_S) == -signal.SIGKILL
    assert not group_exists(pgid)
    [error] = [e for e in process.poll() if e["event"] == "error"]
    assert "killed" in error["message"] and error["returncode"] == -signal.SIGKILL


@pytest.mark.slow
def test_a_run_the_engine_refuses_ends_with_an_error_event(tmp_path):
    options = {**OPTIONS, "batch_size": 64}  # more than the 7 training slices
    process = TrainingProcess(write_radiographs(tmp_path / "normals"), "xray", tmp_path / "run", maxSteps=1,
                              options=options).start()
    assert process.wait(TIMEOUT_S) == 2, process.log
    errors = [e for e in process.poll() if e["event"] == "error"]
    assert errors and "ra train: error:" in errors[-1]["message"] and "batch" in errors[-1]["message"]
    assert not process.cancelled and process.modelPath is None


def test_empty_or_missing_data_is_refused_before_starting(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no image files"):
        TrainingProcess(empty, "xray", tmp_path / "run").start()
    with pytest.raises(DataError, match="no training data given"):
        TrainingProcess([], "xray", tmp_path / "run").start()
    with pytest.raises(DataError, match="does not exist"):
        TrainingProcess([tmp_path / "missing"], "xray", tmp_path / "run").validate()
    with pytest.raises(DataError, match="1 listed source"):
        TrainingProcess([empty, tmp_path / "missing"], "xray", tmp_path / "run").validate()
    with pytest.raises(DataError, match="unknown preset"):
        TrainingProcess(empty, "ct", tmp_path / "run").validate()
    assert not (tmp_path / "run").exists()


def test_resume_without_a_checkpoint_and_an_existing_run_folder_are_refused(tmp_path):
    data = write_radiographs(tmp_path / "normals")
    with pytest.raises(RAError, match="nothing to resume"):
        TrainingProcess(data, "xray", tmp_path / "run", resume=True).start()
    out = tmp_path / "run"
    (out / "checkpoints").mkdir(parents=True)
    with pytest.raises(RAError, match="already exists"):
        TrainingProcess(data, "xray", out).validate()
    with pytest.raises(RAError, match="exclude each other"):
        TrainingProcess(data, "xray", out, resume=True, overwrite=True).validate()
    TrainingProcess(data, "xray", out, overwrite=True).validate()
    assert TrainingProcess(data, "xray", out, overwrite=True).sourceCount is None  # only set by validate


def test_a_csv_of_scans_passes_the_checks(tmp_path):
    data = write_radiographs(tmp_path / "normals")
    csv = tmp_path / "normals.csv"
    csv.write_text("image\n" + "".join(f"normals/{p.name}\n" for p in sorted(data.iterdir())[:5]))
    process = TrainingProcess(csv, "xray", tmp_path / "run")
    process.validate()
    assert process.sourceCount == 5 and process.command[process.command.index("--data") + 1] == str(csv)


def test_options_become_ra_train_arguments(tmp_path):
    process = TrainingProcess(["a.png", "b.png"], "xray", tmp_path / "run", epochs=5, maxSteps=7,
                              options={"image_size": 64, "widths": [8, 16, 32], "amp": True, "sync_batchnorm": False,
                                       "calibrate": True, "cache_dir": None}, python="/usr/bin/python3")
    assert process.command == ["/usr/bin/python3", "-m", "ra_engine.cli", "train", "--data", "a.png", "b.png",
                               "--preset", "xray", "--out", str(tmp_path / "run"), "--epochs", "5", "--max-steps",
                               "7", "--image-size", "64", "--widths", "8,16,32", "--amp", "--progress-json", "-",
                               "--stop-file", str(tmp_path / "run" / ".stop")]
    with pytest.raises(ValueError, match="set by TrainingProcess"):
        TrainingProcess("a", "xray", tmp_path, options={"out": "elsewhere"})
    never_started = TrainingProcess("a", "xray", tmp_path)
    never_started.cancel()
    assert not never_started.running and never_started.returncode is None and never_started.poll() == []


@pytest.mark.slow
def test_cancel_by_stop_file_alone_checkpoints_as_on_windows(tmp_path, monkeypatch):
    """Without any signal (Windows: no SIGTERM, maybe no shared console), the stop file stops the engine cleanly."""
    import RALogic.launcher as launcher

    signals = []
    monkeypatch.setattr(launcher.os, "killpg", lambda pgid, sig: signals.append(sig))
    data, out = write_radiographs(tmp_path / "normals"), tmp_path / "run"
    (out).mkdir()
    (out / launcher.STOP_FILE).touch()  # a leftover of an earlier stop does not stop the new run
    process = TrainingProcess(data, "xray", out, epochs=1000, options=OPTIONS, overwrite=True).start()
    with process:
        pump(process, lambda ev: len(training_steps(ev)) >= 2)
        process.cancel(timeout=TIMEOUT_S)
        assert process.wait(TIMEOUT_S) == 130, process.log
    # The SIGTERM went nowhere (patched; so did the SIGKILL for leftovers after the end): the stop file stopped it.
    assert signals[0] == signal.SIGTERM and set(signals) <= {signal.SIGTERM, signal.SIGKILL}
    assert "--stop-file" in process.command and process.stopFile.exists()
    assert (out / "checkpoints" / "latest.pt").is_file() and not (out / "model").exists()


@pytest.mark.slow
def test_cancel_through_a_launcher_that_forwards_no_signal_stops_the_training_resumable(tmp_path, standin):
    """PythonSlicer dies of SIGTERM and passes nothing on: the engine behind it still stops cleanly (130, a
    checkpoint), and that is what is reported, not the launcher's -15."""
    data, out = write_radiographs(tmp_path / "normals"), tmp_path / "run"
    process = TrainingProcess(data, "xray", out, epochs=1000, options=OPTIONS, python=str(standin)).start()
    with process:
        events = pump(process, lambda ev: len(training_steps(ev)) >= 2)
        engine = process.enginePid
        assert engine is not None and engine != process.pid, "the engine runs behind the launcher"
        process.cancel(timeout=TIMEOUT_S)
        assert process.wait(TIMEOUT_S) == 130, process.log
        events += process.poll()
    assert not any(e["event"] == "error" for e in events), [e for e in events if e["event"] == "error"]
    assert events[-1]["event"] == "done" and events[-1]["message"] == "stopped by cancelled"
    assert (out / "checkpoints" / "latest.pt").is_file() and process.modelPath is None
    assert not process_exists(engine) and not group_exists(process.pid)


def test_the_cancel_signal_reaches_the_engine_behind_the_launcher(tmp_path, standin):
    """An engine that stops on SIGTERM but never looks at its stop file stops at once: the whole process group is
    signalled, not only the launcher; its own exit status (130, from its status file) is reported."""
    process = EngineProcess("engine_standins", ["polite"], stopFile=tmp_path / "stop", python=str(standin))
    with process.start():
        pump(process, lambda ev: any(e["event"] == "start" for e in ev))
        started = time.monotonic()
        process.cancel(timeout=TIMEOUT_S)
        assert process.wait(TIMEOUT_S) == 130, process.log
    assert time.monotonic() - started < TIMEOUT_S / 2, "it stopped on the kill, not on the signal"
    assert not any(e["event"] == "error" for e in process.poll()) and not group_exists(process.pid)


def test_a_cancel_the_engine_ignores_ends_in_a_kill_of_the_whole_group(tmp_path, standin):
    """The kill that follows an ignored cancel watches the engine, not the launcher (which SIGTERM ended at once):
    it fires, and nothing of the job is left."""
    process = EngineProcess("engine_standins", ["stubborn"], stopFile=tmp_path / "stop", python=str(standin))
    with process.start():
        pump(process, lambda ev: any(e["event"] == "start" for e in ev))
        engine = process.enginePid
        process.cancel(timeout=1.0)
        assert process.wait(TIMEOUT_S) is not None, "the engine was never killed"
    assert not process_exists(engine) and not group_exists(process.pid)
    [error] = [e for e in process.poll() if e["event"] == "error"]
    assert "killed" in error["message"]
