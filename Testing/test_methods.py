"""Training methods (issue 5's baselines): ra (default), sivae, vae and ae on the same network, data and iterations."""
import copy

import numpy as np
import pytest
import torch

import ra_engine
from fixtures_io import write_radiographs
from test_trainer import ARCH, data, make  # noqa: F401, F811  (data: the trainer tests' fixture)
from ra_engine.training.checkpoint import load_checkpoint, save_checkpoint
from ra_engine.cli import main
from ra_engine.core.errors import RAError
from ra_engine.training.config import LossWeights
from ra_engine.training.losses import ae_step_loss, vae_step_loss
from ra_engine.network.model import ReversedAutoEncoder, set_batchnorm_mode
from ra_engine.models.card import card_notice, NOTICE
from ra_engine.core.progress import Progress
from ra_engine.training.config import METHODS, TrainConfig
from ra_engine.training.trainer import baseline_iteration

TINY = ["--preset", "xray", "--image-size", "16", "--widths", "4,8", "--latent-dim", "4", "--batch-size", "2",
        "--lr", "1e-3", "--device", "cpu", "--quiet"]




def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def moved(before, module):
    return any(not torch.equal(a, b) for a, b in zip(before, module.parameters()))


def assert_same_weights(a, b):
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), f"{k} differs"


def baseline_setup(seed=3):
    torch.manual_seed(seed)
    model = ReversedAutoEncoder(ARCH)
    model.train()
    set_batchnorm_mode(model, "reference")
    opt_e = torch.optim.Adam(model.encoder.parameters(), lr=1e-3)
    opt_d = torch.optim.Adam(model.decoder.parameters(), lr=1e-3)
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    x = torch.stack([torch.exp(-((yy - c) ** 2 + (xx - 8) ** 2) / 20) for c in (5, 7, 9, 11)]).unsqueeze(1)
    return model, opt_e, opt_d, x  # four blobs in a row


def seeded_noise(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=gen)


@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_trains_both_halves_with_finite_losses(tmp_path, data, method):
    seen = []
    t = make(tmp_path, data, progress=Progress(callback=seen.append), method=method, max_steps=3)
    enc0, dec0 = snapshot(t.model.encoder), snapshot(t.model.decoder)
    t.fit()
    steps = [e["losses"] for e in seen if e["event"] == "step"]
    assert len(steps) == 3 and all(np.isfinite(v) for losses in steps for v in losses.values())
    assert moved(enc0, t.model.encoder) and moved(dec0, t.model.decoder)
    expected_terms = {"loss_e", "loss_d", "embedding"} if method in ("ra", "sivae") else {"rec", "loss"}
    assert expected_terms <= set(steps[0])


@pytest.mark.parametrize("method", ["vae", "ae"])
def test_baselines_lower_their_loss_on_a_fixed_batch(method):
    model, opt_e, opt_d, x = baseline_setup()
    noise = seeded_noise(0)
    losses = [baseline_iteration(model, opt_e, opt_d, x, method, LossWeights(), noise)["loss"] for _ in range(20)]
    assert losses[-1] < 0.85 * losses[0], losses


def test_sivae_is_ra_with_the_embedding_weight_at_zero(tmp_path, data):
    assert TrainConfig(method="sivae").weights == LossWeights(embedding=0.0)
    sivae = make(tmp_path / "sivae", data, method="sivae", max_steps=2)
    sivae.fit()
    ra_without_embedding = make(tmp_path / "ra0", data, weights=LossWeights(embedding=0.0), max_steps=2)
    ra_without_embedding.fit()
    assert_same_weights(sivae.model, ra_without_embedding.model)
    ra = make(tmp_path / "ra", data, max_steps=2)
    ra.fit()
    assert not torch.equal(ra.model.encoder.fc.weight, sivae.model.encoder.fc.weight), \
        "the reversed embedding loss made no difference: the comparison above proves nothing"


def test_the_ae_is_deterministic_and_the_vae_is_not():
    """Two runs with different noise sources on the same batch: the AE ends bitwise equal, the VAE does not."""
    for method, same in (("ae", True), ("vae", False)):
        runs = []
        for seed in (0, 1):
            model, opt_e, opt_d, x = baseline_setup()
            losses = baseline_iteration(model, opt_e, opt_d, x, method, LossWeights(), seeded_noise(seed))
            runs.append((model, losses))
        (a, la), (b, lb) = runs
        assert (la == lb) is same, method
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters())) is same, method


def test_the_ae_reconstructs_the_mean_and_the_vae_a_sample():
    model, _, _, x = baseline_setup()
    w = LossWeights()
    s = 1 / 256
    mu, logvar, _ = model.encoder(x)
    loss, terms = ae_step_loss(model.encoder, model.decoder, x, w)
    torch.testing.assert_close(loss, s * 0.5 * ((x - model.decoder(mu)) ** 2).flatten(1).sum(1).mean())
    assert set(terms) == {"rec", "loss"}
    eps = torch.randn_like(mu)
    loss, terms = vae_step_loss(model.encoder, model.decoder, x, w, lambda shape: eps)
    x_r = model.decoder(mu + (0.5 * logvar).exp() * eps)
    kl = (-0.5 * (1 + logvar - mu ** 2 - logvar.exp()).sum(1)).mean()
    torch.testing.assert_close(terms["kl"], kl)
    torch.testing.assert_close(loss, s * (0.5 * ((x - x_r) ** 2).flatten(1).sum(1).mean() + 1.0 * kl))


@pytest.mark.parametrize("method", ["vae", "ae"])
def test_a_baseline_iteration_is_one_step_through_both_halves_and_equals_one_adam(method):
    model, opt_e, opt_d, x = baseline_setup()
    twin = copy.deepcopy(model)
    calls = {"encoder": 0, "decoder": 0}
    model.encoder.register_forward_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    model.decoder.register_forward_hook(lambda *_: calls.__setitem__("decoder", calls["decoder"] + 1))
    enc0, dec0 = snapshot(model.encoder), snapshot(model.decoder)
    baseline_iteration(model, opt_e, opt_d, x, method, LossWeights(), seeded_noise(0))
    assert calls == {"encoder": 1, "decoder": 1}
    assert moved(enc0, model.encoder) and moved(dec0, model.decoder)

    # The two Adams over disjoint halves are one Adam over the whole network.
    one_adam = torch.optim.Adam(twin.parameters(), lr=1e-3)
    step_loss = vae_step_loss if method == "vae" else ae_step_loss
    extra = (seeded_noise(0),) if method == "vae" else ()
    step_loss(twin.encoder, twin.decoder, x, LossWeights(), *extra)[0].backward()
    one_adam.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


@pytest.mark.parametrize("method", ["vae", "ae"])
def test_a_baseline_resumes_bitwise_like_one_run(tmp_path, data, method):
    straight = make(tmp_path / "straight", data, method=method, max_steps=4)
    straight.fit()
    make(tmp_path / "split", data, method=method, max_steps=2).fit()
    resumed = make(tmp_path / "split", data, method=method, max_steps=4)
    resumed.resume()
    assert resumed.state.step == 2
    resumed.fit()
    assert_same_weights(straight.model, resumed.model)
    for oa, ob in ((straight.opt_e, resumed.opt_e), (straight.opt_d, resumed.opt_d)):
        for sa, sb in zip(oa.state_dict()["state"].values(), ob.state_dict()["state"].values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert straight.state == resumed.state


def _vae_rank_main(rank, world, tmp):
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        t = make(f"{tmp}/run", distributed_data(), method="vae", batch_size=4, max_steps=3)
        t.fit()
        torch.save(t.model.state_dict(), f"{tmp}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def distributed_data():
    images = np.random.default_rng(1).random((10, 16, 16), dtype=np.float32)
    return images[:8], images[8:]


@pytest.mark.slow
def test_a_baseline_on_two_ranks_equals_one_process_on_the_global_batch(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(_vae_rank_main, args=(2, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    rank0, rank1 = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0), "ranks diverged"
    single = make(tmp_path / "single", distributed_data(), method="vae", batch_size=4, max_steps=3)
    single.fit()
    for k, v in single.model.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(v, rank0[k], rtol=1e-4, atol=1e-6, msg=k)


def test_resume_with_another_method_is_refused(tmp_path, data):
    make(tmp_path, data, method="vae", max_steps=1).fit()
    with pytest.raises(RAError, match=r"method differ from the checkpoint \(method: 'vae' in the checkpoint, 'ra' now"):
        make(tmp_path, data, max_steps=2).resume()


def test_a_checkpoint_from_before_methods_resumes_as_ra(tmp_path, data):
    t = make(tmp_path, data, max_steps=1)
    t.fit()
    ckpt = load_checkpoint(t.latest_path)
    del ckpt["config"]["method"]
    save_checkpoint(ckpt, t.latest_path)
    make(tmp_path, data, max_steps=2).resume()
    with pytest.raises(RAError, match=r"method differ from the checkpoint \(method: 'ra' in the checkpoint, 'vae'"):
        make(tmp_path, data, method="vae", max_steps=2).resume()


def test_an_unknown_method_is_refused():
    with pytest.raises(ValueError, match="unknown training method 'gan'"):
        TrainConfig(method="gan")


def test_only_baseline_cards_say_they_are_not_ra():
    assert card_notice("ra") == NOTICE
    for method in ("sivae", "vae", "ae"):
        assert card_notice(method).startswith(f"Baseline for comparison (method '{method}'), not a Reversed")
        assert card_notice(method).endswith(NOTICE)


def test_ra_train_method_vae_writes_a_baseline_model_that_detection_accepts(tmp_path, alex_safetensors, monkeypatch,
                                                                            capsys):
    """End to end: `ra train --method vae`, calibration on the held-out scans, then detection on a radiograph."""
    import SimpleITK as sitk

    monkeypatch.setenv("RA_LPIPS_WEIGHTS", str(alex_safetensors))
    folder = write_radiographs(tmp_path / "normals")
    args = [*TINY, "--max-steps", "2", "--val-fraction", "0.4"]
    args[args.index("--image-size") + 1] = "32"
    out = tmp_path / "run"
    assert main(["train", "--method", "vae", "--data", str(folder), "--out", str(out), *args]) == 0

    model = ra_engine.load_model(out / "model")
    card = model.card
    assert card.method == "vae" and card.method_description == METHODS["vae"]
    assert card.training.config["method"] == "vae"
    assert "not a Reversed Auto-Encoder" in card.notice and "not for diagnosis" in card.notice
    assert card.calibration is not None
    scan = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "cxr_0.png"))).astype(np.float32)
    detection = ra_engine.detect(model, scan)
    assert detection.anomaly.array.shape == scan.shape and np.isfinite(detection.scan_score)
    assert detection.detections_at().array.shape == scan.shape
    report = detection.report(detection.detections_at(), detection.threshold_at())
    assert report["notice"] == card.notice, "a baseline's detections say it is not RA"

    capsys.readouterr()
    assert main(["train", "--method", "ae", "--data", str(folder), "--out", str(out), *args, "--resume"]) == 2
    assert "method: 'vae' in the checkpoint, 'ae' now" in capsys.readouterr().err
