"""Trainings killed with SIGKILL at random moments (while preprocessing, training, writing a checkpoint or the model):
every time, `--resume` finds an intact checkpoint, and the finished run equals an uninterrupted one bitwise (weights,
both optimisers' states, the position, the best checkpoint and the model directory's weights). Training is bitwise
reproducible on the CPU with the same thread count, so every child runs with OMP_NUM_THREADS=1.

The default run kills one run 5 times (twice at random moments, twice in the middle of a checkpoint write, once while
it writes its model); RA_ROBUSTNESS=full kills 5 runs so, 25 kills."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures_io import write_radiographs
from ra_engine.core.errors import ModelError
from ra_engine.models.modeldir import load_model
from ra_engine.training.checkpoint import load_checkpoint
from robust_helpers import REPO, child_env, scaled

TRAIN = ["train", "--preset", "xray", "--image-size", "16", "--widths", "4,8", "--latent-dim", "4", "--batch-size",
         "2", "--lr", "1e-3", "--device", "cpu", "--epochs", "3", "--checkpoint-every", "1", "--quiet",
         "--no-calibrate", "--progress-json", "-"]
# A child whose checkpoint writes take 0.3 s, half of the file written: the parent kills it while the temporary file
# is half-written. The bytes written are torch.save's own, so the training it does is unchanged.
SLOW_CHECKPOINTS = """
import io, sys, time
import torch
import ra_engine.training.checkpoint as checkpoint

class SlowTorch:
    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def save(obj, f, *args, **kwargs):
        buffer = io.BytesIO()
        torch.save(obj, buffer, *args, **kwargs)
        data = buffer.getvalue()
        f.write(data[: len(data) // 2])
        f.flush()
        time.sleep(0.3)
        f.write(data[len(data) // 2:])

checkpoint.torch = SlowTorch()
from ra_engine.cli import main
sys.exit(main(sys.argv[1:]))
"""


def command(data: Path, out: Path, slow: bool = False) -> list[str]:
    """`ra train` on `data` into `out`: resumed when it has a checkpoint, overwritten when a kill came before the
    first one (the folder exists but holds no checkpoint), new otherwise."""
    latest = out / "checkpoints" / "latest.pt"
    mode = ["--resume"] if latest.is_file() else ["--overwrite"] if out.exists() else []
    start = [sys.executable, "-c", SLOW_CHECKPOINTS] if slow else [sys.executable, "-m", "ra_engine.cli"]
    return [*start, *TRAIN, "--data", str(data), "--out", str(out), *mode]


class Child:
    """One `ra train` child in a process group of its own, its progress events counted as they arrive."""

    def __init__(self, argv: list[str]):
        self.process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                        env=child_env(), start_new_session=True)
        self.events: list[dict] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                self.events.append(json.loads(line))
            except json.JSONDecodeError:
                pass

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(60)

    def finish(self, timeout: float = 300) -> int:
        code = self.process.wait(timeout)
        self.reader.join(10)
        return code


def temporaries(out: Path) -> list[Path]:
    """atomic_write's temporary files (".<name>.<token>.tmp...") in the run's checkpoints and model folders."""
    return [p for folder in (out / "checkpoints", out / "model") if folder.is_dir()
            for p in folder.iterdir() if p.name.startswith(".") and ".tmp" in p.name]


def kill_at_random_moment(child: Child, rng: random.Random) -> bool:
    """Kills `child` after a random number of its progress events (0 to 7: while it starts, preprocesses, trains or
    checkpoints) and a random delay of up to half a second; False when it finished first."""
    return _kill_after(child, rng.randrange(8), rng.uniform(0, 0.5))


def kill_while_writing_the_model(child: Child, rng: random.Random) -> bool:
    """Kills `child` within 0.3 s of its "done" event: while it exports the model directory."""
    return _kill_after(child, lambda events: any(e.get("event") == "done" for e in events), rng.uniform(0, 0.3))


def _kill_after(child: Child, events, delay: float) -> bool:
    reached = events if callable(events) else lambda seen: len(seen) >= events
    deadline = time.monotonic() + 300
    while not reached(child.events) and child.process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    time.sleep(delay)
    if child.process.poll() is not None:
        return False
    child.kill()
    return True


def kill_during_checkpoint_write(child: Child, out: Path, rng: random.Random, stale: set[Path]) -> bool:
    """Kills `child` while it writes its k-th checkpoint (k from 1 to 3), the temporary file half-written; `stale`:
    the temporary files an earlier kill left (the child removes them when it resumes)."""
    wanted, seen = rng.randrange(1, 4), set()
    deadline = time.monotonic() + 300
    while child.process.poll() is None and time.monotonic() < deadline:
        found = {p for p in temporaries(out) if p.name.startswith((".latest.pt", ".best.pt"))} - stale
        seen |= found
        if found and len(seen) >= wanted:
            child.kill()
            assert any(p.exists() for p in found), "the kill did not land inside the write"
            return True
        time.sleep(0.002)
    return False


def assert_intact(out: Path) -> int | None:
    """The checkpoints on disk after a kill load (weights_only) and hold a full training state; returns the step of
    latest.pt, or None when the kill came before the first checkpoint."""
    latest = out / "checkpoints" / "latest.pt"
    for path in (latest, out / "checkpoints" / "best.pt"):
        if path.is_file():
            state = load_checkpoint(path)
            assert {"model", "opt_e", "opt_d", "state", "arch", "config"} <= set(state)
    return load_checkpoint(latest)["state"]["step"] if latest.is_file() else None


def assert_same_training(a: Path, b: Path) -> None:
    for name in ("latest.pt", "best.pt"):
        x, y = load_checkpoint(a / "checkpoints" / name), load_checkpoint(b / "checkpoints" / name)
        wall_time = ("seconds",)  # how long it trained, the one entry a kill may change
        assert {k: v for k, v in x["state"].items() if k not in wall_time} == \
            {k: v for k, v in y["state"].items() if k not in wall_time}, name
        for part in ("model", "opt_e", "opt_d"):
            flat_x, flat_y = _tensors(x[part]), _tensors(y[part])
            assert flat_x.keys() == flat_y.keys()
            assert all(torch.equal(flat_x[k], flat_y[k]) for k in flat_x), f"{name}: {part} differs"
    weights_a, weights_b = load_file(str(a / "model" / "model.safetensors")), load_file(str(b / "model" /
                                                                                             "model.safetensors"))
    assert weights_a.keys() == weights_b.keys() and all(torch.equal(weights_a[k], weights_b[k]) for k in weights_a)


def _tensors(tree, prefix: str = "") -> dict:
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _tensors(value, f"{prefix}/{key}").items()}
    if isinstance(tree, (list, tuple)):
        return {k: v for i, value in enumerate(tree) for k, v in _tensors(value, f"{prefix}/{i}").items()}
    return {prefix: torch.tensor(float(tree))} if isinstance(tree, (int, float)) else {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The data and one uninterrupted run of the same training."""
    root = tmp_path_factory.mktemp("kills")
    data = write_radiographs(root / "normals")
    out = root / "uninterrupted"
    child = Child(command(data, out))
    assert child.finish() == 0, child.process.stderr.read()
    return data, out


def assert_model_whole_or_refused(model: Path) -> None:
    """After a kill, the model directory is absent, or loads, or is refused with a ModelError (the card written,
    the weights not yet renamed onto it): never anything half-read."""
    if (model / "model.json").is_file():
        try:
            load_model(model)
        except ModelError:
            pass


@pytest.mark.long
def test_killed_trainings_resume_from_an_intact_checkpoint_to_the_uninterrupted_result(reference, tmp_path):
    """Several runs, each killed 5 times (twice at random moments, twice inside a checkpoint write, once while it
    writes its model) and resumed after each kill; each finished run equals the uninterrupted one."""
    data, uninterrupted = reference
    rng = random.Random(2109)
    kills, log = {"random": 0, "in-write": 0, "model-write": 0}, []
    for run in range(scaled(1, 5)):
        out = tmp_path / f"killed-{run}"
        plan = ["random", "random", "in-write", "in-write"]
        rng.shuffle(plan)
        for kind in [*plan, "model-write"]:
            started, stale = time.monotonic(), set(temporaries(out))
            child = Child(command(data, out, slow=kind == "in-write"))
            if kind == "random":
                killed = kill_at_random_moment(child, rng)
            elif kind == "in-write":
                killed = kill_during_checkpoint_write(child, out, rng, stale)
            else:
                killed = kill_while_writing_the_model(child, rng)
            if not killed:  # it ended before the moment came: then the next child resumes a finished run
                assert child.finish() == 0, child.process.stderr.read()
                continue
            kills[kind] += 1
            log.append((kind, assert_intact(out), round(time.monotonic() - started, 1)))
            assert_model_whole_or_refused(out / "model")
        final = Child(command(data, out))
        assert final.finish() == 0, final.process.stderr.read()
        assert_same_training(uninterrupted, out)
        assert temporaries(out) == [], "a killed write's temporary file was left behind after the resume"
    print(f"kills: {kills} (kind, latest step after the kill, seconds): {log}")
    assert sum(kills.values()) >= 4 * scaled(1, 5), f"too few kills landed: {kills}"
