"""Data-parallel training (DistributedDataParallel over gloo, 2 CPU processes) equals one process on the global batch."""
import copy
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ra_engine.training.augment import augment, draw_params
from ra_engine.training.losses import decoder_step_loss, encoder_step_loss
from ra_engine.network.config import ArchConfig
from ra_engine.network.model import set_batchnorm_mode
from ra_engine.runtime.distributed import ProcessGroup
from ra_engine.training.config import TrainConfig
from ra_engine.training.trainer import build_model, set_requires_grad, sharded_noise, step_generator, Trainer

ARCH = ArchConfig(image_size=16, latent_dim=4, widths=(4, 8))
STEPS = 3


def config(batchnorm):
    return TrainConfig(epochs=5, batch_size=4, lr=1e-3, checkpoint_every=0, max_steps=STEPS, batchnorm=batchnorm)


def images():
    rng = np.random.default_rng(1)
    data = rng.random((10, 16, 16), dtype=np.float32)
    return data[:8], data[8:]


def _rank_main(rank, world, tmp, batchnorm):
    os.environ.update(MASTER_ADDR="127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        t = Trainer(*images(), ARCH, config(batchnorm), f"{tmp}/run", torch.device("cpu"))
        t.fit()
        torch.save(t.model.state_dict(), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_two_ranks(tmp_path, batchnorm):
    mp.start_processes(_rank_main, args=(2, str(tmp_path), batchnorm), nprocs=2, join=True, start_method="spawn")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def assert_close_states(a, b, **tol):
    for k in a:
        if a[k].is_floating_point() and "running" not in k:
            torch.testing.assert_close(a[k], b[k], msg=k, **tol)


@pytest.mark.slow
def test_two_ranks_hold_identical_weights_equal_to_one_process_on_the_global_batch(tmp_path):
    rank0, rank1 = run_two_ranks(tmp_path, "reference")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks diverged"
    single = Trainer(*images(), ARCH, config("reference"), tmp_path / "single", torch.device("cpu"))
    single.fit()
    assert_close_states(single.model.state_dict(), rank0, rtol=1e-4, atol=1e-6)
    assert not torch.equal(single.model.state_dict()["encoder.fc.weight"],
                           build_model(ARCH, config("reference"), torch.device("cpu"))[0].state_dict()["encoder.fc.weight"])


@pytest.mark.slow
def test_batch_statistics_mode_equals_one_process_running_the_half_batches_separately(tmp_path):
    rank0, rank1 = run_two_ranks(tmp_path, "batch")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0 if "running" not in k), "ranks diverged"

    cfg = config("batch")
    model, opt_e, opt_d = build_model(ARCH, cfg, torch.device("cpu"))
    model.train()
    set_batchnorm_mode(model, "batch")
    train, _ = images()
    halves = [ProcessGroup(rank=h, world=2) for h in range(2)]
    half_backward = lambda loss: (loss / 2).backward()  # DDP averages the ranks' gradients
    for step in range(STEPS):
        epoch, k = divmod(step, len(train) // 4)
        perm = torch.randperm(len(train), generator=step_generator(cfg.seed, -1 - epoch))  # the epoch's order
        gens = [step_generator(cfg.seed, step) for _ in halves]
        xs, zps = [], []
        for g, h in zip(gens, halves):
            rows = perm[k * 4:(k + 1) * 4][h.rows(2)]
            x = torch.from_numpy(train[rows.numpy()]).unsqueeze(1)
            xs.append(augment(x, draw_params(4, cfg.augment, g)[h.rows(2)]))
            zps.append(torch.randn(4, ARCH.latent_dim, generator=g)[h.rows(2)])
        set_requires_grad(model.decoder, False)
        opt_e.zero_grad()
        zs = [encoder_step_loss(model.encoder, model.decoder, x, zp, cfg.weights, sharded_noise(g, h), half_backward)[2]
              for x, zp, g, h in zip(xs, zps, gens, halves)]
        opt_e.step()
        set_requires_grad(model.decoder, True)
        set_requires_grad(model.encoder, False)
        opt_d.zero_grad()
        for x, z, zp, g, h in zip(xs, zs, zps, gens, halves):
            decoder_step_loss(model.encoder, model.decoder, x, z, zp, cfg.weights, sharded_noise(g, h), half_backward)
        opt_d.step()
        set_requires_grad(model.encoder, True)
    assert_close_states(model.state_dict(), rank0, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_ra_train_under_torchrun_trains_on_two_processes_and_rank0_writes_the_model(tmp_path):
    import json
    import subprocess
    import sys

    import SimpleITK as sitk

    data = tmp_path / "normals"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        sitk.WriteImage(sitk.GetImageFromArray((rng.random((20, 24)) * 60000).astype(np.uint16)), str(data / f"{i}.png"))
    out = tmp_path / "run"
    progress = tmp_path / "progress.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "ra_engine.cli", "train", "--data", str(data), "--preset", "xray", "--out", str(out),
           "--image-size", "16", "--widths", "4,8", "--latent-dim", "4", "--batch-size", "4", "--max-steps", "2",
           "--device", "cpu", "--quiet", "--progress-json", str(progress)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    card = json.loads((out / "model" / "model.json").read_text())
    assert card["training"]["steps"] == 2
    events = [json.loads(line) for line in progress.read_text().splitlines()]
    assert "2 process(es)" in next(e for e in events if e["event"] == "start")["message"]
    assert sum(e["event"] == "step" and "losses" in e for e in events) == 2, "only rank 0 reports"
