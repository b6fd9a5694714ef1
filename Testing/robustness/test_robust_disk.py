"""Full disks and read-only folders during training (checkpoints, the slice cache, the model), calibration, detection
and model import: each ends in a clear error (an RAError: WriteError, ModelError, ...), with the previous checkpoint,
card and model intact and no half-written output (no temporary files either).

Full disks: a small tmpfs filled with a ballast file (root; skipped elsewhere), and RLIMIT_FSIZE in a subprocess (a
per-process file size limit with SIGXFSZ ignored, so that writes fail with EFBIG; no root needed). Read-only folders:
a read-only bind mount as root (root ignores file modes), the write bits removed otherwise."""
from __future__ import annotations

import errno
import resource
import signal
from dataclasses import replace
from pathlib import Path

import pytest

import ra_engine
from fixtures_io import write_radiographs
from ra_engine.core.errors import ModelError
from ra_engine.core.files import WriteError
from ra_engine.core.progress import Progress
from ra_engine.models.card import read_card
from ra_engine.models.modeldir import load_model
from ra_engine.training.checkpoint import load_checkpoint
from robust_helpers import files_under, fill_disk, no_leftovers
from test_registry import make_model as make_registry_model
from test_registry import zip_of

ARCH = ra_engine.ArchConfig(image_size=16, latent_dim=4, widths=(4, 8))
CONFIG = ra_engine.TrainConfig(epochs=2, batch_size=2, lr=1e-3, checkpoint_every=1,
                               augment=ra_engine.AugmentConfig(flip=False))
PRESET = ra_engine.preset_config("xray", image_size=16)
CLI_TRAIN = ["train", "--preset", "xray", "--image-size", "16", "--widths", "4,8", "--latent-dim", "4",
             "--batch-size", "2", "--lr", "1e-3", "--device", "cpu", "--epochs", "2", "--checkpoint-every", "1",
             "--quiet", "--no-calibrate"]


@pytest.fixture(scope="module")
def radiographs(tmp_path_factory) -> Path:
    return write_radiographs(tmp_path_factory.mktemp("disk") / "normals")


def train(data: Path, out: Path, progress: Progress | None = None, resume: bool = False, **options):
    return ra_engine.train(data, out, preset=PRESET, arch=ARCH, config=replace(CONFIG, **options), device="cpu",
                           resume=resume, progress=progress, calibrate=False)


def temporaries(folder: Path) -> list[str]:
    return sorted(name for name in files_under(folder) if Path(name).name.startswith(".") and ".tmp" in name)


# ---- training ----------------------------------------------------------------------------------------------------


def test_a_disk_that_fills_during_training_keeps_the_last_checkpoint_and_the_run_resumes(radiographs, tmp_path,
                                                                                          mounts):
    disk = mounts.tmpfs(tmp_path / "disk", "2m")
    out, ballast = disk / "run", []

    def fill_after_step_3(event: dict):
        if event["event"] == "checkpoint" and event.get("step") == 3 and not ballast:
            ballast.append(fill_disk(disk))

    with pytest.raises(WriteError, match="checkpoints/(latest|best).pt.*No space left.*previous checkpoint is intact"):
        train(radiographs, out, Progress(callback=fill_after_step_3))
    assert load_checkpoint(out / "checkpoints" / "latest.pt")["state"]["step"] == 3
    assert temporaries(out) == []
    ballast[0].unlink()
    result, model_dir = train(radiographs, out, resume=True)
    assert result.state.step == 6 and load_model(model_dir).card.training.steps == 6


def test_a_file_size_limit_fails_the_checkpoint_write_cleanly_without_root(radiographs, tmp_path, capsys):
    """RLIMIT_FSIZE below a checkpoint's size (130 kB; set for this process for the duration, with SIGXFSZ ignored
    so that the write fails with EFBIG): `ra train --resume` fails at its first checkpoint with a clear error and
    exit code 2; latest.pt is byte for byte the one before."""
    from ra_engine.cli import main

    out = tmp_path / "run"
    argv = [*CLI_TRAIN, "--data", str(radiographs), "--out", str(out)]
    assert main([*argv, "--max-steps", "2"]) == 0
    latest = out / "checkpoints" / "latest.pt"
    before = latest.read_bytes()
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, limits[1]))
        code = main([*argv, "--resume"])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    err = capsys.readouterr().err
    assert code == 2 and "could not write" in err and "File too large" in err, err
    assert "previous checkpoint is intact" in err
    assert latest.read_bytes() == before and temporaries(out) == []


def test_a_full_disk_under_the_slice_cache_is_a_clear_error(radiographs, tmp_path, mounts):
    disk = mounts.tmpfs(tmp_path / "disk", "256k")
    fill_disk(disk, leave=8192)
    out = tmp_path / "run"
    with pytest.raises(WriteError, match="could not write the slice cache.*No space left"):
        ra_engine.train(radiographs, out, preset=PRESET, arch=ARCH, config=CONFIG, device="cpu", calibrate=False,
                        cache_dir=disk / "cache")
    assert not (disk / "cache" / "store.json").exists()
    assert not out.exists(), "a refused run left its run folder"


def test_a_read_only_output_folder_is_a_clear_error(radiographs, tmp_path, mounts, capsys):
    from ra_engine.cli import main

    parent = mounts.read_only(_folder(tmp_path / "read-only"))
    code = main([*CLI_TRAIN, "--data", str(radiographs), "--out", str(parent / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "run" in err and ("Read-only" in err or "Permission denied" in err), err


def test_resuming_a_run_in_a_folder_that_became_read_only_is_a_clear_error(radiographs, tmp_path, mounts,
                                                                          capsys):
    from ra_engine.cli import main

    out = tmp_path / "run" / "inner"
    train(radiographs, out, max_steps=2)
    before = files_under(out)
    mounts.read_only(out.parent)
    code = main([*CLI_TRAIN, "--data", str(radiographs), "--out", str(out), "--resume"])
    err = capsys.readouterr().err
    assert code == 2 and ("Read-only" in err or "Permission denied" in err), err
    assert files_under(out) == before


def test_a_model_whose_card_cannot_be_written_keeps_the_previous_model(radiographs, tmp_path, monkeypatch):
    """The model directory is rewritten (a finished run resumed for more steps) while the disk fills between the
    weights and the card: the previous weights and card stay, matching each other."""
    from ra_engine.models import card as card_module

    out = tmp_path / "run"
    _, model_dir = train(radiographs, out, max_steps=2)
    before = files_under(model_dir)
    real = card_module.atomic_write

    def full(path, write, *args, **kwargs):
        raise WriteError(f"could not write {path}: [Errno {errno.ENOSPC}] No space left on device")

    monkeypatch.setattr(card_module, "atomic_write", full)
    with pytest.raises(WriteError, match="No space left"):
        train(radiographs, out, resume=True, max_steps=4)
    monkeypatch.setattr(card_module, "atomic_write", real)
    assert files_under(model_dir) == before
    load_model(model_dir)


# ---- calibration, detection, import --------------------------------------------------------------------------------


@pytest.fixture
def xray_dir(tmp_path, tiny_models) -> Path:
    """A copy of the tiny xray model (32 x 32) to write into."""
    import shutil

    return Path(shutil.copytree(tiny_models["xray"].path, tmp_path / "model"))


def test_calibration_on_a_full_disk_keeps_the_card(xray_dir, radiographs, tmp_path, mounts):
    import shutil

    disk = mounts.tmpfs(tmp_path / "disk", "512k")
    model = Path(shutil.copytree(xray_dir, disk / "model"))
    fill_disk(disk)
    with no_leftovers(model):
        with pytest.raises(WriteError, match="model.json.*No space left"):
            ra_engine.calibrate(model, radiographs, device="cpu")
    assert read_card(model).calibration is None


def test_calibration_of_a_read_only_model_is_a_clear_error(xray_dir, radiographs, mounts):
    mounts.read_only(xray_dir)
    with no_leftovers(xray_dir):
        with pytest.raises(WriteError, match="model.json"):
            ra_engine.calibrate(xray_dir, radiographs, device="cpu")


@pytest.mark.parametrize("trouble", ["full", "read-only"])
def test_detection_into_a_full_or_read_only_folder_writes_nothing_and_says_why(tiny_models, radiographs, tmp_path,
                                                                              mounts, trouble):
    if trouble == "full":
        out = mounts.tmpfs(tmp_path / "disk", "128k")
        fill_disk(out)
    else:
        out = mounts.read_only(_folder(tmp_path / "out"))
    inputs = sorted(radiographs.glob("*.png"))[:2]
    complaints = []
    with no_leftovers(out):
        result = ra_engine.detect_files(tiny_models["xray"].path, inputs, out, threshold=0.1, device="cpu",
                                        complain=complaints.append)
    assert result.done == 0 and len(result.failed) == 2, result
    assert all(("No space left" if trouble == "full" else "Read-only file system|Permission denied").split("|")[0]
               in reason or "Permission denied" in reason for _, reason in result.failed), result.failed


@pytest.mark.parametrize("trouble", ["full", "read-only"])
@pytest.mark.parametrize("source", ["folder", "zip"])
def test_importing_into_a_full_or_read_only_registry_registers_nothing(tmp_path, mounts, monkeypatch, trouble,
                                                                     source):
    model = make_registry_model(tmp_path / "src")
    given = model if source == "folder" else zip_of(model, tmp_path / "m.zip")
    if trouble == "full":
        registry = mounts.tmpfs(tmp_path / "disk", "64k")
        fill_disk(registry, leave=12_000)  # the card fits, the weights (31 kB) do not
    else:
        registry = mounts.read_only(_folder(tmp_path / "registry"))
    monkeypatch.setenv("RA_MODELS_DIR", str(registry))
    with no_leftovers(registry):
        with pytest.raises(ModelError, match="nothing was imported"):
            ra_engine.import_model(given)
    assert ra_engine.list_models() == [] or all(m["bundled"] for m in ra_engine.list_models())


def _folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path
