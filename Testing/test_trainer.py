"""Training loop: exact resume, atomic checkpoints, early stopping, cancellation, progress events."""
import errno
import json

import numpy as np
import pytest
import torch

from ra_engine.training import trainer as trainer_module
from ra_engine.training.checkpoint import load_checkpoint
from ra_engine.core.errors import DataError, RAError
from ra_engine.network.config import ArchConfig
from ra_engine.core.progress import Progress
from ra_engine.training.config import TrainConfig
from ra_engine.training.trainer import Trainer

ARCH = ArchConfig(image_size=16, latent_dim=4, widths=(4, 8))


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    images = rng.random((9, 16, 16), dtype=np.float32)
    return images[:6], images[6:]  # 6 training slices at batch 2: 3 steps per epoch


def make(run_dir, data, progress=None, **options):
    config = TrainConfig(**{"epochs": 4, "batch_size": 2, "lr": 1e-3, "checkpoint_every": 0, **options})
    return Trainer(*data, ARCH, config, run_dir, torch.device("cpu"), progress)


def assert_same_run(a: Trainer, b: Trainer):
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), f"{k} differs"
    for oa, ob in ((a.opt_e, b.opt_e), (a.opt_d, b.opt_d)):
        for sa, sb in zip(oa.state_dict()["state"].values(), ob.state_dict()["state"].values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert a.state == b.state


@pytest.mark.parametrize("stop_at", [2, 3])  # inside the first epoch, and at its end
def test_stop_and_resume_gives_bitwise_the_weights_of_one_run(tmp_path, data, stop_at):
    straight = make(tmp_path / "straight", data, max_steps=4)
    straight.fit()

    first = make(tmp_path / "split", data, max_steps=stop_at)
    result = first.fit()
    assert result.stopped_by == "max_steps" and result.state.step == stop_at
    resumed = make(tmp_path / "split", data, max_steps=4)
    resumed.resume()
    assert resumed.state.step == stop_at
    resumed.fit()
    assert_same_run(straight, resumed)


def test_checkpoint_holds_both_optimisers_and_loads_without_pickled_code(tmp_path, data):
    t = make(tmp_path, data, max_steps=3)
    t.fit()
    ckpt = load_checkpoint(t.latest_path)  # weights_only=True inside
    assert set(ckpt) >= {"model", "opt_e", "opt_d", "state", "arch", "config"}
    assert ckpt["state"]["step"] == 3 and ckpt["state"]["epoch"] == 1
    assert len(ckpt["opt_e"]["state"]) == len(list(t.model.encoder.parameters()))
    assert len(ckpt["opt_d"]["state"]) == len(list(t.model.decoder.parameters()))
    torch.load(t.latest_path, weights_only=True)


def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint_intact(tmp_path, data, monkeypatch):
    t = make(tmp_path, data, max_steps=2)
    t.fit()
    before = t.latest_path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(trainer_module.save_checkpoint.__globals__["torch"], "save", disk_full)
    t2 = make(tmp_path, data, max_steps=3)
    t2.resume()
    with pytest.raises(RAError, match="previous checkpoint is intact"):
        t2.fit()
    monkeypatch.undo()
    assert t.latest_path.read_bytes() == before
    assert [p.name for p in t.checkpoint_dir.iterdir()] == ["latest.pt"], "a temporary file was left behind"
    assert load_checkpoint(t.latest_path)["state"]["step"] == 2


def test_early_stopping_after_patience_epochs_without_improvement(tmp_path, data, monkeypatch):
    losses = iter([1.0, 0.5, 0.7, 0.6, 0.9, 0.1])
    monkeypatch.setattr(trainer_module, "validation_loss", lambda *a, **k: next(losses))
    t = make(tmp_path, data, epochs=10, patience=3)
    result = t.fit()
    assert result.stopped_by == "early_stopping"
    assert t.state.epoch == 5 and t.state.best_epoch == 2 and t.state.best_val == 0.5
    assert load_checkpoint(t.best_path)["state"]["best_epoch"] == 2
    assert [h["val_loss"] for h in t.state.history] == [1.0, 0.5, 0.7, 0.6, 0.9]


@pytest.mark.parametrize("bias, collapsed", [(-100.0, True), (100.0, True), (0.0, False)])
def test_a_network_collapsed_onto_its_saturated_sigmoid_is_reported(tmp_path, data, caplog, bias, collapsed):
    events = []
    t = make(tmp_path, data, progress=Progress(callback=events.append), epochs=2)
    with torch.no_grad():  # the output sigmoid pushed to one flat end: all black (-100) or all white (+100)
        t.model.decoder.main[-1].bias.fill_(bias)
    t.fit()
    warnings = [e for e in events if e["event"] == "warning"]
    if collapsed:
        assert [e["epoch"] for e in warnings] == [1, 2]
        assert "collapsed" in warnings[0]["message"] and "--batchnorm batch" in warnings[0]["message"]
        assert "collapsed" in caplog.text
    else:  # a fresh network's output is about 0.5 everywhere: constant, but not collapsed
        assert warnings == [] and "collapsed" not in caplog.text


def test_cancelling_from_the_progress_callback_stops_cleanly_and_can_resume(tmp_path, data):
    seen = []

    def callback(event):
        seen.append(event)
        return not (event["event"] == "step" and event["step"] == 2)

    t = make(tmp_path, data, progress=Progress(callback=callback))
    result = t.fit()
    assert result.stopped_by == "cancelled" and result.state.step == 2
    assert load_checkpoint(t.latest_path)["state"]["step"] == 2
    assert seen[0]["event"] == "start" and seen[-1]["event"] == "done"
    resumed = make(tmp_path, data, max_steps=3)
    resumed.resume()
    assert resumed.fit().state.step == 3


def test_progress_json_lines_follow_the_schema(tmp_path, data):
    path = tmp_path / "progress.jsonl"
    progress = Progress(json_path=path)
    make(tmp_path / "run", data, progress=progress, epochs=2).fit()
    progress.close()
    events = [json.loads(line) for line in path.read_text().splitlines()]
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 6 and kinds.count("epoch") == 2
    step = next(e for e in events if e["event"] == "step")
    assert {"epoch", "step", "total_steps", "losses", "eta_s"} <= set(step)
    assert step["total_steps"] == 6 and {"loss_e", "loss_d", "embedding"} <= set(step["losses"])
    assert all(e["val_loss"] is not None for e in events if e["event"] == "epoch")


def test_resume_refuses_changed_training_options(tmp_path, data):
    make(tmp_path, data, max_steps=1).fit()
    t = make(tmp_path, data, lr=5e-5)
    with pytest.raises(RAError, match="lr differ"):
        t.resume()


def test_bad_training_sets_are_refused(tmp_path, data):
    with pytest.raises(DataError, match="training slices for a batch"):
        Trainer(data[0][:1], data[1], ARCH, TrainConfig(batch_size=2), tmp_path, torch.device("cpu"))
    with pytest.raises(DataError, match="expects 32x32"):
        Trainer(*data, ArchConfig(image_size=32, latent_dim=4, widths=(4, 8)), TrainConfig(batch_size=2), tmp_path,
                torch.device("cpu"))


def test_bf16_autocast_option_trains_with_finite_losses_and_float32_weights(tmp_path, data):
    """--amp is meant for CUDA; on the CPU it runs the same bf16 autocast path, which is what this exercises."""
    seen = []
    t = make(tmp_path, data, progress=Progress(callback=seen.append), amp=True, max_steps=2)
    t.fit()
    steps = [e for e in seen if e["event"] == "step"]
    assert len(steps) == 2 and all(all(v == v and abs(v) < 1e30 for v in e["losses"].values()) for e in steps)
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
